"""Demand the gateway sees and the database does not: requests it holds for a model with no ready
node, and its in-flight requests per node. Redis only (no ORM), so the gateway imports it freely.

Held requests: one hash, field ``<model_id>:<worker_id>`` = ``<held>:<unix_ts>``. Each gateway
worker reports its own count (0 included, so a drained queue is seen at once); a report older than
HELD_MAX_AGE_S belongs to a worker that stopped reporting (it died or has held nothing for a while)
and is ignored, then removed.

In-flight per node: the gateway's LoadBoard (apps.gateway.routing) already shares it:
``crosslogic:inflight:workers`` (sorted set of worker ids by last report) and one hash per worker
``crosslogic:inflight:<worker_id>`` (node id → count, expiring after 3 s).

Key names carry the Redis database like apps.core.invalidation's channel, so two deployments or
test runs that share a Redis server never read each other's demand, whatever they share.
"""

from __future__ import annotations

import functools
import logging
import time
from collections import defaultdict
from typing import TYPE_CHECKING, Any

from django.conf import settings
from redis.connection import parse_url

if TYPE_CHECKING:
    import redis
    import redis.asyncio as aioredis

log = logging.getLogger(__name__)

HELD_MAX_AGE_S = 10.0
# The gateway's LoadBoard keys (apps.gateway.routing writes them; read here for the autoscaler).
INFLIGHT_WORKERS_KEY = "crosslogic:inflight:workers"
INFLIGHT_MAX_AGE_S = 3.0
# enqueue_autoscale: at most one triggered run per model per this many seconds.
TRIGGER_TTL_S = 2


@functools.cache
def _db_for(url: str) -> int:
    return int(parse_url(url).get("db", 0) or 0) if url else 0


def _namespace() -> str:
    return f"crosslogic:{_db_for(settings.REDIS_URL)}"


def held_key() -> str:
    """The hash of held requests (``HELD_KEY`` in the brief; a function because the database
    comes from settings, which tests change)."""
    return f"{_namespace()}:held"


def trigger_key(model_id: int | None) -> str:
    return f"{_namespace()}:autoscale-trigger:{model_id if model_id is not None else 'all'}"


def inflight_key(worker_id: str) -> str:
    return f"crosslogic:inflight:{worker_id}"


async def report_held(redis: aioredis.Redis, *, model_id: int, worker_id: str, held: int) -> None:
    """The gateway worker ``worker_id`` holds ``held`` requests for ``model_id`` right now.

    Report on every change and at least every few seconds while holding (a report expires after
    HELD_MAX_AGE_S). Raises what redis-py raises when Redis is down: the caller decides.
    """
    if held < 0:
        raise ValueError("held must be 0 or more")
    await redis.hset(held_key(), f"{int(model_id)}:{worker_id}", f"{int(held)}:{time.time():.3f}")


def _decode(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def parse_held(
    raw: dict[Any, Any], *, now: float, max_age_s: float = HELD_MAX_AGE_S
) -> tuple[dict[int, int], list[str]]:
    """(held per model from fresh reports, fields too old or unreadable to keep)."""
    held: dict[int, int] = defaultdict(int)
    stale: list[str] = []
    for field, value in raw.items():
        name = _decode(field)
        try:
            model_part, _, _worker = name.partition(":")
            count_part, _, ts_part = _decode(value).partition(":")
            model_id, count, ts = int(model_part), int(count_part), float(ts_part)
        except ValueError:
            stale.append(name)
            continue
        if now - ts > max_age_s:
            stale.append(name)
            continue
        if count > 0:
            held[model_id] += count
    return dict(held), stale


def held_by_model(client: redis.Redis | None) -> dict[int, int]:
    """Requests held by all gateway workers, per model id (fresh reports only). {} without Redis."""
    if client is None:
        return {}
    key = held_key()
    try:
        raw = client.hgetall(key)
    except Exception:
        log.warning("could not read held requests from Redis; scaling on node load alone")
        return {}
    held, stale = parse_held(raw, now=time.time())
    if stale:
        try:
            client.hdel(key, *stale)
        except Exception:
            log.info("could not remove %d stale held-request reports", len(stale))
    return held


def inflight_by_node(client: redis.Redis | None) -> dict[int, int]:
    """The gateway's in-flight requests per node id, summed over its live workers. {} without Redis."""
    if client is None:
        return {}
    try:
        workers = client.zrangebyscore(INFLIGHT_WORKERS_KEY, time.time() - INFLIGHT_MAX_AGE_S, "+inf")
        if not workers:
            return {}
        pipe = client.pipeline(transaction=False)
        for worker in workers:
            pipe.hgetall(inflight_key(_decode(worker)))
        mappings = pipe.execute()
    except Exception:
        log.warning("could not read the gateway's in-flight counts from Redis")
        return {}
    counts: dict[int, int] = defaultdict(int)
    for mapping in mappings:
        for node_id, count in mapping.items():
            try:
                counts[int(_decode(node_id))] += max(0, int(_decode(count)))
            except ValueError:
                continue
    return dict(counts)


def claim_trigger(client: redis.Redis | None, *, model_id: int | None) -> bool:
    """True if a triggered autoscale run for ``model_id`` may be queued now (deduplicated over
    TRIGGER_TTL_S). Without Redis: always (development with the embedded broker)."""
    if client is None:
        return True
    try:
        return bool(client.set(trigger_key(model_id), "1", nx=True, ex=TRIGGER_TTL_S))
    except Exception:
        log.warning("could not deduplicate an autoscale trigger; the beat tick scales instead")
        return False
