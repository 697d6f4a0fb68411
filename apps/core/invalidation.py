"""Cross-process cache invalidation.

Writers bump a per-topic version counter in Redis (and publish it) after their transaction
commits; every gateway worker compares versions and reloads what changed. Topics: ``keys``
(API keys and tenants) and ``routing`` (models and nodes).
"""

from __future__ import annotations

import functools
import logging

from django.conf import settings
from django.db import transaction
from redis.connection import parse_url

from apps.core import redis as redis_lib

log = logging.getLogger(__name__)

KEYS = "keys"
ROUTING = "routing"


@functools.cache
def _channel_for(url: str) -> str:
    db = parse_url(url).get("db", 0) if url else 0
    return f"crosslogic:invalidate:{db}"


def channel() -> str:
    """Pub/sub channels are server-wide, not per Redis db: two deployments (or two test runs)
    sharing a server on different dbs must not clear each other's caches."""
    return _channel_for(settings.REDIS_URL)


def version_key(topic: str) -> str:
    return f"crosslogic:version:{topic}"


def _bump_now(topic: str) -> None:
    client = redis_lib.client()
    if client is None:
        return
    try:
        client.incr(version_key(topic))
        client.publish(channel(), topic)
    except Exception:
        log.warning("could not publish %s invalidation; gateways fall back to their TTL", topic)


def bump(topic: str) -> None:
    """Announce a change to ``topic`` once the current transaction commits."""
    transaction.on_commit(lambda: _bump_now(topic))
