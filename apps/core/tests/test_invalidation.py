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
def test_a_bump_is_not_heard_by_a_deployment_on_another_db(settings, redis_db):
    own_url = settings.REDIS_URL
    other_url = own_url.rsplit("/", 1)[0] + "/15"
    mine = redis.Redis.from_url(own_url).pubsub()
    mine.subscribe(invalidation.channel())
    settings.REDIS_URL = other_url
    theirs = redis.Redis.from_url(other_url).pubsub()
    theirs.subscribe(invalidation.channel())
    settings.REDIS_URL = own_url
    for sub in (mine, theirs):  # the subscribe confirmations
        assert sub.get_message(timeout=2)["type"] == "subscribe"

    invalidation._bump_now(invalidation.KEYS)

    deadline = time.monotonic() + 2
    heard = None
    while heard is None and time.monotonic() < deadline:
        heard = mine.get_message(timeout=0.2)
    assert heard is not None and heard["data"] == b"keys"
    assert theirs.get_message(timeout=0.5) is None
    mine.close()
    theirs.close()
