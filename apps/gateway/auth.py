"""API-key verification for the gateway, from an in-process cache.

A key is looked up in the database once (by its visible prefix) and then served from memory.
Writers bump the ``keys`` version in Redis (apps.core.invalidation); every worker listens and
drops its cache, so a revoked key stops working everywhere within a second. Should Redis be
unreachable, entries expire after GATEWAY_KEY_CACHE_TTL_S instead.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass
from datetime import datetime

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections, connection

from apps.core import secrets as tokens
from apps.gateway.errors import GatewayError
from apps.gateway.limits import Limit
from apps.tenancy.models import ApiKey, SecretStatus, TenantStatus, secret_status

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class KeyEntry:
    key_id: int
    tenant_id: int
    digest: str
    prefix: str
    scopes: frozenset[str]
    allowed_models: frozenset[str]
    expires_at: datetime | None
    revoked_at: datetime | None
    tenant_active: bool
    key_limit: Limit
    tenant_limit: Limit
    monthly_token_budget: int | None = None
    tenant_spend_limit_micros: int | None = None
    key_spend_limit_micros: int | None = None

    @property
    def has_budgets(self) -> bool:
        return (
            self.monthly_token_budget is not None
            or self.tenant_spend_limit_micros is not None
            or self.key_spend_limit_micros is not None
        )

    def allows_model(self, name: str) -> bool:
        return not self.allowed_models or name in self.allowed_models


def _unauthorized(message: str) -> GatewayError:
    return GatewayError(401, message, type="authentication_error", code="invalid_api_key")


def _load(prefix: str) -> KeyEntry | None:
    close_old_connections()
    try:
        key = ApiKey.objects.select_related("tenant").filter(prefix=prefix).first()
    finally:
        # No connection is kept by the gateway between lookups: streams must not pin one.
        connection.close()
    if key is None:
        return None
    tenant = key.tenant
    return KeyEntry(
        key_id=key.pk,
        tenant_id=tenant.pk,
        digest=key.digest,
        prefix=key.prefix,
        scopes=frozenset(key.scopes),
        allowed_models=frozenset(key.allowed_models or ()),
        expires_at=key.expires_at,
        revoked_at=key.revoked_at,
        tenant_active=tenant.status == TenantStatus.ACTIVE,
        key_limit=Limit(
            subject=f"key:{key.pk}",
            requests_per_minute=key.requests_per_minute,
            tokens_per_minute=key.tokens_per_minute,
            max_concurrent=key.max_concurrent_requests,
        ),
        tenant_limit=Limit(
            subject=f"tenant:{tenant.pk}",
            requests_per_minute=tenant.requests_per_minute,
            tokens_per_minute=tenant.tokens_per_minute,
            max_concurrent=tenant.max_concurrent_requests,
        ),
        monthly_token_budget=tenant.monthly_token_budget,
        tenant_spend_limit_micros=tenant.monthly_spend_limit_micros,
        key_spend_limit_micros=key.monthly_spend_limit_micros,
    )


class KeyCache:
    """Entries live GATEWAY_KEY_CACHE_TTL_S. Two things keep a burst of requests off the database:

    - one load per prefix at a time: every request that misses while a load is running waits for
      that load. Before, 256 requests arriving together when the entry had just expired each ran
      their own lookup (a new PostgreSQL connection each, through a thread pool of a few threads)
      and the last waited ~0.9 s: that was the +1.2 s p99 TTFT of the 256-lockstep bench
      (docs/benchmarks.md, "What remains (issue #14)");
    - refresh ahead: a key used in the last quarter of its entry's life is reloaded in the
      background while the entry still serves, so a busy key never misses at all. No entry is
      served past its TTL.
    """

    REFRESH_AT = 0.75  # of the TTL

    def __init__(self) -> None:
        self._entries: dict[str, tuple[float, KeyEntry | None]] = {}
        # Lowered to ~1 s while invalidations cannot be heard (Redis away).
        self.ttl = settings.GATEWAY_KEY_CACHE_TTL_S
        self._load = sync_to_async(_load, thread_sensitive=False)
        # Verified raw keys, so the HMAC runs once per key and worker, not once per request.
        self._verified: dict[str, str] = {}
        self._loading: dict[str, asyncio.Task[KeyEntry | None]] = {}
        # Bumped by clear(): a load that began before an invalidation must not be stored after it,
        # nor be joined by requests that arrive after it.
        self._generation = 0

    def clear(self) -> None:
        self._entries.clear()
        self._verified.clear()
        self._loading.clear()
        self._generation += 1

    async def entry(self, prefix: str) -> KeyEntry | None:
        now = time.monotonic()
        cached = self._entries.get(prefix)
        if cached is not None:
            age = now - cached[0]
            if age < self.ttl:
                if age >= self.ttl * self.REFRESH_AT and prefix not in self._loading:
                    self._start_load(prefix).add_done_callback(_log_failed_refresh)
                return cached[1]
        task = self._loading.get(prefix) or self._start_load(prefix)
        # Shielded: a waiter whose client left must not cancel the load the others wait for.
        return await asyncio.shield(task)

    def _start_load(self, prefix: str) -> asyncio.Task[KeyEntry | None]:
        task = asyncio.ensure_future(self._load_and_store(prefix, self._generation))
        # Retrieved here, so a failure no request awaited (every waiter gone) is not reported as
        # "never retrieved"; the requests that wait get it raised (a 503 when the database is away).
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        self._loading[prefix] = task
        return task

    async def _load_and_store(self, prefix: str, generation: int) -> KeyEntry | None:
        started = time.monotonic()
        try:
            entry = await self._load(prefix)
        finally:
            if generation == self._generation:
                self._loading.pop(prefix, None)
        if generation == self._generation:
            if len(self._entries) > 100_000:  # bounded under a flood of made-up prefixes
                self._entries.clear()
            self._entries[prefix] = (started, entry)
        return entry

    async def authenticate(self, authorization: str | None) -> KeyEntry:
        if not authorization:
            raise _unauthorized("Missing API key: send 'Authorization: Bearer <key>'.")
        scheme, _, raw = authorization.partition(" ")
        raw = raw.strip()
        if scheme.lower() != "bearer" or not raw:
            raise _unauthorized("Malformed Authorization header: use 'Bearer <key>'.")
        prefix = tokens.split_prefix(raw, settings.API_KEY_PREFIX)
        if prefix is None:
            raise _unauthorized("Incorrect API key provided.")
        entry = await self.entry(prefix)
        if entry is None:
            raise _unauthorized("Incorrect API key provided.")
        if self._verified.get(raw) != entry.digest:
            if not tokens.matches(raw, entry.digest):
                raise _unauthorized("Incorrect API key provided.")
            self._verified[raw] = entry.digest
        status = secret_status(revoked_at=entry.revoked_at, expires_at=entry.expires_at)
        if status is SecretStatus.REVOKED:
            raise _unauthorized("This API key has been revoked.")
        if status is SecretStatus.EXPIRED:
            raise _unauthorized("This API key has expired.")
        if not entry.tenant_active:
            raise _unauthorized("This account is suspended.")
        return entry


def _log_failed_refresh(task: asyncio.Task[KeyEntry | None]) -> None:
    """A failed refresh ahead leaves the entry serving until its TTL; the first request after that
    loads it again, and fails visibly if the database is still away."""
    if not task.cancelled() and (exc := task.exception()) is not None:
        log.warning("gateway: refreshing a cached API key failed (%s: %s)", type(exc).__name__, exc)
