"""The one place that builds Redis clients, so every part shares settings and pools."""

from __future__ import annotations

from functools import lru_cache

import redis
import redis.asyncio as aioredis
from django.conf import settings

_TIMEOUTS = {"socket_connect_timeout": 0.5, "socket_timeout": 1.0}


@lru_cache(maxsize=1)
def client() -> redis.Redis | None:
    """A synchronous client, or None when no REDIS_URL is configured (embedded dev mode)."""
    if not settings.REDIS_URL:
        return None
    return redis.Redis.from_url(settings.REDIS_URL, **_TIMEOUTS)


def async_client(**overrides: object) -> aioredis.Redis | None:
    """A new asyncio client; each event loop needs its own, so the caller keeps it.

    ``overrides`` adjust connection options, e.g. ``socket_timeout=None`` for a pub/sub listener
    that legitimately waits for minutes.
    """
    if not settings.REDIS_URL:
        return None
    return aioredis.Redis.from_url(settings.REDIS_URL, **{**_TIMEOUTS, **overrides})
