"""The gateway worker's background tasks, started by Gateway.startup and cancelled at shutdown:
routing refresh, cache invalidation from other processes, and load sharing between workers."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import TYPE_CHECKING

from django.conf import settings

from apps.core import invalidation
from apps.core import redis as redis_lib
from apps.gateway.routing import LOADBOARD_PERIOD_S, aload_table

if TYPE_CHECKING:
    from apps.gateway.app import Gateway

log = logging.getLogger("apps.gateway.app")


async def refresh_routing(gw: Gateway, dirty: asyncio.Event) -> None:
    """Reload the routing table when told to (``dirty``) or every ROUTING_REFRESH_S."""
    while True:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(dirty.wait(), timeout=settings.ROUTING_REFRESH_S)
        dirty.clear()
        try:
            gw.table = await aload_table()
            gw.cold.table_changed()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            log.warning("gateway: routing refresh failed (%s); serving the last table", exc)
            await asyncio.sleep(1)


async def listen_invalidations(gw: Gateway, dirty: asyncio.Event) -> None:
    """Drop cached keys / reload routing when another process changes them."""
    if gw.redis is None:
        gw.keys.ttl = 1.0
        return
    while True:
        client = redis_lib.async_client(socket_timeout=None)
        assert client is not None  # gw.redis is set, so REDIS_URL is
        try:
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            await pubsub.subscribe(invalidation.channel())
            # Anything may have changed while we were not listening.
            gw.keys.ttl = settings.GATEWAY_KEY_CACHE_TTL_S
            gw.keys.clear()
            dirty.set()
            async for message in pubsub.listen():
                topic = message.get("data")
                topic = topic.decode() if isinstance(topic, bytes) else topic
                if topic == invalidation.KEYS:
                    gw.keys.clear()
                elif topic == invalidation.ROUTING:
                    dirty.set()
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            gw.keys.ttl = 1.0
            log.warning("gateway: invalidation listener lost Redis (%s); key cache TTL now 1s", exc)
            await asyncio.sleep(1)
        finally:
            await client.aclose()


async def sync_load(gw: Gateway) -> None:
    """Share this worker's in-flight counts per node through Redis, read the other workers'."""
    if gw.redis is None:
        return
    failures = 0
    while True:
        await asyncio.sleep(LOADBOARD_PERIOD_S)
        try:
            await asyncio.wait_for(gw.board.sync(gw.redis), timeout=1.0)
            failures = 0
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failures += 1
            gw.board.others = {}
            if failures == 1:
                log.warning("gateway: cannot share load through Redis (%s)", exc)
            await asyncio.sleep(min(5.0, failures * 0.5))
