"""Atomic rate limits in Redis: requests/min, tokens/min and concurrent requests, per subject
(an API key, a tenant), checked and charged for every subject of a request in ONE Lua call.

Algorithm (why it is exact under concurrency):
- requests/min and tokens/min are token buckets kept as GCRA: one number per subject and
  dimension, the "theoretical arrival time" (TAT, ms). Capacity = the limit, refilled
  continuously at limit/60 s (OpenAI's semantics). A request of cost ``c`` fits when
  ``max(TAT, now) + c·T - 60 s <= now`` with ``T = 60 s / limit``; admitting it sets
  ``TAT = max(TAT, now) + c·T``. So at most ``limit`` units pass in any burst, then ``limit/60``
  per second. Tokens are reserved up front (``reserve_tokens``, clamped to the bucket's size so
  a large ``max_tokens`` waits for a full bucket instead of never passing) and corrected at
  ``settle()``: the difference moves TAT (a refund never fills the bucket past its capacity;
  an overrun leaves debt that refuses later requests until it has drained).
- concurrency is a sorted set per subject: request_id → deadline (now + ``concurrency_ttl_s``).
  Expired entries are pruned on every admit, so a crashed worker's slots free themselves;
  ``settle()`` removes the entry; ``refresh()`` extends it for streams longer than the TTL.
- The admit script first checks every dimension of every subject, and writes only when all
  pass: either everything is charged or nothing is. Redis's clock (``TIME``) is the only clock,
  so workers with skewed clocks agree. ``settle()`` is idempotent: admit enters the request in
  one sorted set of open requests (request_id → deadline), settle applies only if it removed the
  entry. So Redis holds one entry per request *in flight*, not a key per request for minutes
  after it (at 1k req/s a 15-minute marker per request was ~900k keys).
- Monthly budgets ride in the same two calls: a tenant's tokens, and a tenant's or a key's
  micro-dollars (US$ 1e-6). Admit refuses once a month's counter (used + reserved) has reached
  its limit and otherwise adds the request's reservation (tokens: ``reserve_tokens``; dollars:
  ``reserve_micros``, the worst-case cost); settle adds the difference to the real usage.
  Reserving makes it exact under concurrency: fifty simultaneous requests against a budget of
  ten reservations admit exactly ten, and the overshoot is at most the reservations in flight.
- A month's counter that Redis does not have (a new month, a flushed or restarted Redis) is
  seeded before it is used: admit reports it missing, the limiter asks its ``seeder`` (the
  gateway sums the month's usage records in PostgreSQL) and sets it with SET NX (so workers
  racing to seed agree), then admits again. Without a seeder a missing counter starts at 0.
- Admission leases (apps/gateway/leases.py): for a busy subject, the admit script also grants
  this worker a slice on top of the request (only if the request and the whole slice fit), and
  the worker admits the next requests from it without Redis while it is fresh (``lease_s``);
  the unused part goes back through the settle batch. Budgets are in apps/gateway/budgets.py.
- Redis down, slow (``timeout_s``) or absent: never an exception to the caller. ``fail_open``
  admits (warning logged at most every 30 s), otherwise refuses with reason "unavailable".
  After a failure Redis is not retried for ``backoff_s``, so an outage adds no latency per request.
Keys span several subjects in one script: a single Redis (or keys in one cluster slot) is assumed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from apps.core.redis import RedisReplyError
from apps.gateway.batching import SettleBatch
from apps.gateway.budgets import MICROS as MICROS  # re-exported: spend.py and tests import them here
from apps.gateway.budgets import TOKENS as TOKENS
from apps.gateway.budgets import Budget as Budget
from apps.gateway.budgets import Seeder as Seeder
from apps.gateway.budgets import month_of as month_of
from apps.gateway.leases import BUCKET, BUDGET, SLOTS, Leases, Plan, Slot
from apps.gateway.limit_scripts import ADMIT_SCRIPT, REFRESH_SCRIPT, SETTLE_SCRIPT, Script

if TYPE_CHECKING:
    from apps.core.redis import Multiplexed

log = logging.getLogger(__name__)

WINDOW_MS = 60_000
_NO_LIMIT = -1
_REASONS = {1: "requests", 2: "tokens", 3: "concurrency", 4: "budget"}
_MISSING = 5  # admit's answer when a budget counter must be seeded first
BUDGET_TTL_MS = 40 * 86_400_000  # a month's counter outlives its month, then goes


@dataclass(frozen=True)
class Limit:
    """The limits of one subject (an API key or a tenant); None means unlimited."""

    subject: str  # e.g. "key:12" / "tenant:3"
    requests_per_minute: int | None
    tokens_per_minute: int | None
    max_concurrent: int | None

    @property
    def unlimited(self) -> bool:
        return self.requests_per_minute is None and self.tokens_per_minute is None and self.max_concurrent is None


@dataclass(frozen=True, slots=True)
class Handle:
    """What settle() needs of an admission (kept in memory: no serialisation per request)."""

    request_id: str
    reserve: int
    limits: tuple[Limit, ...]
    budgets: tuple[Budget, ...] = ()
    reserve_micros: int = 0
    leased: bool = False  # admitted from this worker's slices alone: no open entry in Redis
    slots: tuple[Slot | None, ...] = ()  # per subject, a concurrency slot taken from a slice


@dataclass
class Admission:
    allowed: bool
    retry_after_s: float | None  # when refused
    reason: str | None  # "requests" | "tokens" | "concurrency" | "budget" | "unavailable"
    headers: dict[str, str]  # OpenAI's x-ratelimit-*, for the most constraining subject
    token: Handle | None  # for settle(); None when there is nothing to settle
    settled: bool = field(default=False, compare=False)
    budget: Budget | None = None  # the budget that refused, for reason "budget"


def format_duration(ms: float) -> str:
    """OpenAI's (Go's) duration format: "20ms", "1s", "1.5s", "6m0s", "1h2m3s"."""
    ms = max(0, math.ceil(ms))
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{seconds}s"
    if minutes:
        return f"{minutes}m{seconds}s"
    return f"{seconds}s"


def _headers(limits: list[Limit], values: list[int]) -> dict[str, str]:
    """Per dimension, the subject with the least remaining (ties: the smaller limit) speaks."""
    headers: dict[str, str] = {}
    for dim, name, attr in ((0, "requests", "requests_per_minute"), (1, "tokens", "tokens_per_minute")):
        best: tuple[int, int, int] | None = None
        for i, lim in enumerate(limits):
            limit = getattr(lim, attr)
            remaining, reset_ms = values[i * 4 + dim * 2], values[i * 4 + dim * 2 + 1]
            if limit is None or remaining < 0:
                continue
            candidate = (remaining, limit, reset_ms)
            if best is None or candidate[:2] < best[:2]:
                best = candidate
        if best is not None:
            headers[f"x-ratelimit-limit-{name}"] = str(best[1])
            headers[f"x-ratelimit-remaining-{name}"] = str(best[0])
            headers[f"x-ratelimit-reset-{name}"] = format_duration(best[2])
    return headers


def _arg(value: int | None) -> int:
    return _NO_LIMIT if value is None else max(0, int(value))


class RateLimiter:
    def __init__(
        self,
        redis: Multiplexed | None,
        *,
        fail_open: bool = True,
        key_prefix: str = "crosslogic:rl:",
        concurrency_ttl_s: float = 900.0,
        concurrency_retry_s: float = 1.0,
        timeout_s: float = 0.5,
        backoff_s: float = 1.0,
        unavailable_retry_s: float = 1.0,
        settle_window_s: float = 6 * 3600.0,
        seeder: Seeder | None = None,
        lease_s: float = 1.0,
    ) -> None:
        self.redis = redis
        self.seeder = seeder
        self._settles = SettleBatch(self._call_settle)
        # Slices of busy subjects' allowances, admitted from without Redis (0: off; leases.py).
        self.leases = Leases(lease_s=lease_s, post=self._settles.post, slot_age_s=concurrency_ttl_s / 2)
        self.fail_open = fail_open
        self.prefix = key_prefix
        self.concurrency_ttl_ms = int(concurrency_ttl_s * 1000)
        self.concurrency_retry_ms = int(concurrency_retry_s * 1000)
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.unavailable_retry_s = unavailable_retry_s
        # How long an admitted request may take to be settled; far longer than any generation.
        self.settle_window_ms = int(settle_window_s * 1000)
        self.open_key = f"{key_prefix}open"
        self._key_cache: dict[str, list[str]] = {}
        self._down_until = 0.0
        self._last_warning = 0.0
        self._last_seed_warning = -1e9
        self._suppressed = 0

    def _keys(self, subject: str) -> list[str]:
        keys = self._key_cache.get(subject)
        if keys is None:
            if len(self._key_cache) > 100_000:  # bounded: subjects are keys, tenants and tenant-model pairs
                self._key_cache.clear()
            keys = [f"{self.prefix}rpm:{subject}", f"{self.prefix}tpm:{subject}", f"{self.prefix}conc:{subject}"]
            self._key_cache[subject] = keys
        return keys

    # --- Redis trouble: never raise, log rarely ----------------------------------------
    def _redis_usable(self) -> bool:
        return self.redis is not None and time.monotonic() >= self._down_until

    def _failed(self, exc: BaseException | None) -> None:
        now = time.monotonic()
        self._down_until = now + self.backoff_s
        if now - self._last_warning >= 30.0:
            extra = f" ({self._suppressed} more since the last warning)" if self._suppressed else ""
            what = "no Redis configured" if exc is None else f"Redis unavailable: {type(exc).__name__}: {exc}"
            log.warning(
                "rate limiter: %s; %s%s", what, "admitting (fail-open)" if self.fail_open else "refusing", extra
            )
            self._last_warning, self._suppressed = now, 0
        else:
            self._suppressed += 1

    def _unavailable(self) -> Admission:
        if self.fail_open:
            return Admission(allowed=True, retry_after_s=None, reason=None, headers={}, token=None)
        return Admission(
            allowed=False, retry_after_s=self.unavailable_retry_s, reason="unavailable", headers={}, token=None
        )

    async def _call(self, script: Script, keys: list[str], args: list[object]) -> object:
        assert self.redis is not None
        try:
            return await self.redis.execute("EVALSHA", script.sha, len(keys), *keys, *args, timeout_s=self.timeout_s)
        except RedisReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        # First use on this Redis (or after SCRIPT FLUSH / a restart): load it, once.
        await self.redis.execute("SCRIPT", "LOAD", script.source, timeout_s=self.timeout_s)
        return await self.redis.execute("EVALSHA", script.sha, len(keys), *keys, *args, timeout_s=self.timeout_s)

    # --- the interface -------------------------------------------------------------------
    def _dims(
        self, limits: list[Limit], budgets: tuple[Budget, ...], reserve: int, micros: int
    ) -> list[tuple[str, str, int | None, int]]:
        """Every dimension a request is charged on: (key, kind, limit, cost); see leases.Plan."""
        dims: list[tuple[str, str, int | None, int]] = []
        for lim in limits:
            rpm_key, tpm_key, conc_key = self._keys(lim.subject)
            tpm = lim.tokens_per_minute
            dims += [
                (rpm_key, BUCKET, lim.requests_per_minute, 1),
                (tpm_key, BUCKET, tpm, min(reserve, tpm) if tpm else 0),
                (conc_key, SLOTS, lim.max_concurrent, 1),
            ]
        dims += [(b.key, BUDGET, b.limit, micros if b.unit == MICROS else reserve) for b in budgets]
        return dims

    def _values(self, limits: list[Limit], now: float) -> list[int]:
        return [v for lim in limits for v in self.leases.values(lim.subject, self._keys(lim.subject), now)]

    async def admit(
        self,
        *,
        limits: list[Limit],
        reserve_tokens: int,
        request_id: str,
        budgets: Sequence[Budget] = (),
        reserve_micros: int = 0,
    ) -> Admission:
        """Check and charge every limit and budget at once. ``reserve_tokens`` is charged to the
        tokens/min buckets and token budgets, ``reserve_micros`` (the worst-case cost) to the
        dollar budgets. Covered entirely by this worker's leased slices: no Redis call."""
        limits = [lim for lim in limits if not lim.unlimited]
        if not limits and not budgets:
            return Admission(allowed=True, retry_after_s=None, reason=None, headers={}, token=None)
        reserve = max(0, int(reserve_tokens))
        micros = max(0, int(reserve_micros))
        budgets = tuple(budgets)
        now = time.monotonic()
        dims = self._dims(limits, budgets, reserve, micros)
        plan = self.leases.plan(dims, now)
        while plan.pending and not plan.local and not plan.asked:
            # A lease of this worker is on its way and may cover this request: wait for it rather
            # than make a call of our own (a burst would otherwise send one call per request).
            # Each pass waits for one answer; requests the slice did not cover carry the next.
            self.leases.undo(plan)
            await asyncio.wait(plan.pending)
            now = time.monotonic()
            plan = self.leases.plan(dims, now, count=False)
        if plan.local:
            return self._local(limits, budgets, plan, reserve, micros, request_id, now)
        try:
            return await self._admit_remote(limits, budgets, plan, reserve, micros, request_id)
        finally:
            self.leases.done(plan)

    def _local(
        self,
        limits: list[Limit],
        budgets: tuple[Budget, ...],
        plan: Plan,
        reserve: int,
        micros: int,
        request_id: str,
        now: float,
    ) -> Admission:
        self.leases.local += 1
        return self._allowed(limits, budgets, plan, reserve, micros, request_id, now, leased=True)

    def _allowed(
        self,
        limits: list[Limit],
        budgets: tuple[Budget, ...],
        plan: Plan,
        reserve: int,
        micros: int,
        request_id: str,
        now: float,
        *,
        leased: bool,
    ) -> Admission:
        handle = Handle(
            request_id=request_id,
            reserve=reserve,
            limits=tuple(limits),
            budgets=budgets,
            reserve_micros=micros,
            leased=leased,
            slots=tuple(plan.slots),
        )
        headers = _headers(limits, self._values(limits, now))
        return Admission(allowed=True, retry_after_s=None, reason=None, headers=headers, token=handle)

    async def _admit_remote(
        self, limits: list[Limit], budgets: tuple[Budget, ...], plan: Plan, reserve: int, micros: int, request_id: str
    ) -> Admission:
        if not self._redis_usable():
            self.leases.undo(plan)
            if self.redis is None:
                self._failed(None)
            return self._unavailable()
        prefix = self.leases.prefix() if any(plan.extra) else ""
        try:
            result = await self._admit(limits, budgets, plan, reserve, micros, request_id, prefix, seeded=())
            if result[1] == _MISSING:
                missing = [budgets[i] for i in result[3:]]
                usable = await self._seed(missing)
                # A counter that could not be seeded (database away) is left out of this request.
                kept = [b not in missing or b in usable for b in budgets]
                first = 3 * len(limits)
                for name in ("charge", "extra"):
                    column = getattr(plan, name)
                    setattr(plan, name, column[:first] + [v for v, k in zip(column[first:], kept, strict=True) if k])
                budgets = tuple(b for b, k in zip(budgets, kept, strict=True) if k)
                result = await self._admit(limits, budgets, plan, reserve, micros, request_id, prefix, seeded=budgets)
        except Exception as exc:  # never raise to the caller: Redis down, slow or confused
            self.leases.undo(plan)
            self._failed(exc)
            return self._unavailable()
        allowed, reason, retry_ms, *rest = result
        now = time.monotonic()
        for i, lim in enumerate(limits):
            self.leases.remember(lim.subject, rest[i * 4 : i * 4 + 4], now)
        if not allowed:
            self.leases.undo(plan)
            # Refused, but a slice this worker leased meanwhile (another request's answer) may
            # cover it: those units are this worker's to give, and unused they would sit idle.
            retry = self.leases.plan(self._dims(limits, budgets, reserve, micros), now, count=False)
            if retry.local:
                return self._local(limits, budgets, retry, reserve, micros, request_id, now)
            self.leases.undo(retry)
            self.leases.done(retry)
            headers = _headers(limits, self._values(limits, now))
            if reason == 4:
                return Admission(
                    allowed=False,
                    retry_after_s=None,
                    reason="budget",
                    headers=headers,
                    token=None,
                    budget=budgets[retry_ms],
                )
            return Admission(
                allowed=False, retry_after_s=retry_ms / 1000, reason=_REASONS[reason], headers=headers, token=None
            )
        grants = rest[4 * len(limits) :]
        if any(grants):
            self.leases.grant(self._dims(limits, budgets, reserve, micros), grants, prefix)
        return self._allowed(limits, budgets, plan, reserve, micros, request_id, now, leased=False)

    async def _admit(
        self,
        limits: list[Limit],
        budgets: tuple[Budget, ...],
        plan: Plan,
        reserve: int,
        micros: int,
        request_id: str,
        prefix: str,
        *,
        seeded: tuple[Budget, ...],
    ) -> list[int]:
        keys: list[str] = [self.open_key]
        args: list[object] = [
            request_id,
            reserve,
            self.concurrency_ttl_ms,
            len(limits),
            self.concurrency_retry_ms,
            BUDGET_TTL_MS,
            self.settle_window_ms,
            prefix,
        ]
        for i, lim in enumerate(limits):
            keys += self._keys(lim.subject)
            args += [_arg(lim.requests_per_minute), _arg(lim.tokens_per_minute), _arg(lim.max_concurrent)]
            args += plan.charge[i * 3 : i * 3 + 3] + plan.extra[i * 3 : i * 3 + 3]
        # Seeding is asked for once: a counter gone again by the second call counts from 0.
        seed = 0 if self.seeder is None or seeded else 1
        first = 3 * len(limits)
        for j, budget in enumerate(budgets):
            keys.append(budget.key)
            reserved = micros if budget.unit == MICROS else reserve
            args += [budget.limit, reserved, seed, plan.charge[first + j], plan.extra[first + j]]
        result = await self._call(ADMIT_SCRIPT, keys, args)
        return [int(v) for v in cast("list[int]", result)]  # the script returns integers

    async def _seed(self, budgets: list[Budget]) -> list[Budget]:
        """Set each missing counter to the month's usage so far (SET NX: the first seeder wins)."""
        assert self.seeder is not None and self.redis is not None  # admit asks only then
        done = []
        for budget in budgets:
            try:
                used = max(0, int(await self.seeder(budget)))
            except Exception as exc:
                # Every request retries while the database is away: warn at most every 30 s.
                now = time.monotonic()
                if now - self._last_seed_warning >= 30.0:
                    log.warning("rate limiter: could not seed budget %s (%s); not enforced for now", budget.key, exc)
                    self._last_seed_warning = now
                continue
            await self.redis.execute("SET", budget.key, used, "NX", "PX", BUDGET_TTL_MS, timeout_s=self.timeout_s)
            done.append(budget)
        return done

    def _members(self, handle: Handle) -> list[tuple[str, str]]:
        """Per concurrency-limited subject: its slot set and the member this request holds there."""
        slots = handle.slots or (None,) * len(handle.limits)
        return [
            (self._keys(lim.subject)[2], slot.member if slot is not None else handle.request_id)
            for lim, slot in zip(handle.limits, slots, strict=True)
            if lim.max_concurrent is not None
        ]

    async def settle(self, admission: Admission, *, used_tokens: int, used_micros: int = 0) -> None:
        """Charge the real usage (tokens, and cost in micro-dollars) instead of the reservation,
        and free the concurrency slot. Idempotent."""
        if admission.settled or not admission.allowed or not admission.token:
            return
        admission.settled = True
        handle = admission.token
        now = time.monotonic()
        keys = [self.open_key]
        args: list[object] = ["s", "" if handle.leased else handle.request_id, len(handle.limits), BUDGET_TTL_MS]
        work = not handle.leased  # a request admitted from slices alone settles only what changed
        used = max(0, int(used_tokens))
        slots = handle.slots or (None,) * len(handle.limits)
        for lim, slot in zip(handle.limits, slots, strict=True):
            _rpm_key, tpm_key, conc_key = self._keys(lim.subject)
            keys += [tpm_key, conc_key]
            tpm = lim.tokens_per_minute
            diff = used - min(handle.reserve, tpm) if tpm else 0
            if slot is not None:  # back to its slice if that is fresh; otherwise out of Redis
                member = "" if self.leases.release(slot, now) else slot.member
            else:
                member = "" if lim.max_concurrent is None else handle.request_id
            args += [_arg(tpm), diff, member]
            work = work or diff != 0 or member != ""
        cost = max(0, int(used_micros))
        for budget in handle.budgets:
            keys.append(budget.key)
            diff = cost - handle.reserve_micros if budget.unit == MICROS else used - handle.reserve
            args.append(diff)
            work = work or diff != 0
        if self.redis is None or not work:
            return
        try:
            await self._settles.submit(keys, args)
        except Exception as exc:  # never raise to the caller: Redis down, slow or confused
            # The reservation stands and the slot expires by itself after concurrency_ttl_s.
            self._failed(exc)

    async def drain(self) -> None:
        """Give every unused slice back and send the settles still queued (shutdown)."""
        if self.redis is not None:
            self.leases.return_all()
        await self._settles.drain()

    async def _call_settle(self, keys: list[str], args: list[object]) -> object:
        return await self._call(SETTLE_SCRIPT, keys, args)

    async def refresh(self, admission: Admission) -> None:
        """Extend a long-running request's concurrency slot by another ``concurrency_ttl_s``."""
        if admission.settled or not admission.allowed or not admission.token or self.redis is None:
            return
        members = self._members(admission.token)
        if not members:
            return
        try:
            await self._call(
                REFRESH_SCRIPT, [k for k, _ in members], [self.concurrency_ttl_ms, *(m for _, m in members)]
            )
        except Exception as exc:  # never raise to the caller: Redis down, slow or confused
            self._failed(exc)
