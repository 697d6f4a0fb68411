"""Invalidation messages reach only the deployment (Redis db) that sent them."""

from __future__ import annotations

import time

import pytest
import redis

from apps.core import invalidation


def test_the_channel_is_per_redis_db(settings):
    settings.REDIS_URL = "redis://127.0.0.1:6379/3"
    assert invalidation.channel() == "crosslogic:invalidate:3"
    settings.REDIS_URL = "unix:///run/redis.sock?db=7"
    assert invalidation.channel() == "crosslogic:invalidate:7"


@pytest.mark.django_db(transaction=True)
def test_a_bump_is_published_on_this_dbs_channel_only(settings, redis_db):
    """Before, every deployment on a Redis server shared one channel, so two deployments (or two
    test runs) on different dbs cleared each other's caches. Nothing publishes on that old name now."""
    client = redis.Redis.from_url(settings.REDIS_URL)
    mine, shared = client.pubsub(), client.pubsub()
    mine.subscribe(invalidation.channel())
    shared.subscribe("crosslogic:invalidate")
    for sub in (mine, shared):  # the subscribe confirmations
        assert sub.get_message(timeout=2)["type"] == "subscribe"

    invalidation._bump_now(invalidation.KEYS)

    deadline = time.monotonic() + 2
    heard = None
    while heard is None and time.monotonic() < deadline:
        heard = mine.get_message(timeout=0.2)
    assert heard is not None and heard["data"] == b"keys"
    assert shared.get_message(timeout=0.5) is None
    mine.close()
    shared.close()
