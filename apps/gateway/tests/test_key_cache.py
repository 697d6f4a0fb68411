"""The gateway's API-key cache against the real database: one load per key at a time, refresh
ahead, and invalidations that win over a load already running (apps/gateway/auth.py)."""

from __future__ import annotations

import asyncio

import pytest
from asgiref.sync import sync_to_async
from django.db import OperationalError

from apps.gateway.auth import KeyCache, KeyEntry
from apps.gateway.errors import GatewayError
from apps.tenancy.services import api_key_revoke

# The loads run in a thread (sync_to_async), so the rows must be committed: transactional_db.
pytestmark = pytest.mark.usefixtures("transactional_db")


class Counted:
    """Wraps the cache's real loader: counts the loads and can hold each one after it read the
    database (``gate``), the way a slow lookup under load does."""

    def __init__(self, cache: KeyCache) -> None:
        self.real = cache._load
        self.calls = 0
        self.gate: asyncio.Event | None = None
        cache._load = self

    async def __call__(self, prefix: str) -> KeyEntry | None:
        self.calls += 1
        entry = await self.real(prefix)
        if self.gate is not None:
            await self.gate.wait()
        return entry


def test_a_burst_of_requests_on_an_expired_entry_loads_the_key_once(api_key) -> None:
    cache = KeyCache()
    loads = Counted(cache)
    header = f"Bearer {api_key[1]}"

    async def burst() -> list[KeyEntry]:
        loads.gate = asyncio.Event()
        waiting = [asyncio.ensure_future(cache.authenticate(header)) for _ in range(256)]
        await asyncio.sleep(0.05)  # every request is waiting on the held load
        loads.gate.set()
        return await asyncio.gather(*waiting)

    entries = asyncio.run(burst())
    assert loads.calls == 1
    assert {e.key_id for e in entries} == {api_key[0].pk}


def test_a_key_used_late_in_its_entry_s_life_is_reloaded_in_the_background(api_key) -> None:
    cache = KeyCache()
    cache.ttl = 0.4
    loads = Counted(cache)
    header = f"Bearer {api_key[1]}"

    async def scenario() -> tuple[int, int, int]:
        await cache.authenticate(header)
        first = loads.calls
        await asyncio.sleep(0.32)  # past REFRESH_AT (0.3 s), within the TTL
        loads.gate = asyncio.Event()
        await cache.authenticate(header)  # served from the cache; the refresh starts beside it
        await asyncio.sleep(0.02)
        during = loads.calls
        loads.gate.set()
        await asyncio.sleep(0.15)  # the first entry's TTL is over; the refreshed one serves
        await cache.authenticate(header)
        return first, during, loads.calls

    assert asyncio.run(scenario()) == (1, 2, 2)


def test_an_invalidation_during_a_load_is_not_undone_by_it(api_key) -> None:
    key, raw = api_key
    cache = KeyCache()
    loads = Counted(cache)
    header = f"Bearer {raw}"

    async def scenario() -> str:
        loads.gate = asyncio.Event()
        before = asyncio.ensure_future(cache.authenticate(header))
        await asyncio.sleep(0.05)  # the load has read the key, not yet revoked, and is held
        await sync_to_async(api_key_revoke, thread_sensitive=False)(key=key, reason="test")
        cache.clear()  # what the invalidation listener does on the revocation
        loads.gate.set()
        await before  # the request that was already in flight is served as it was read
        with pytest.raises(GatewayError) as err:
            await cache.authenticate(header)  # a new load, not the stale one
        return err.value.message

    assert asyncio.run(scenario()) == "This API key has been revoked."
    assert loads.calls == 2


def test_a_waiter_that_leaves_does_not_cancel_the_load_the_others_wait_for(api_key) -> None:
    cache = KeyCache()
    loads = Counted(cache)
    header = f"Bearer {api_key[1]}"

    async def scenario() -> KeyEntry:
        loads.gate = asyncio.Event()
        leaving = asyncio.ensure_future(cache.authenticate(header))
        staying = asyncio.ensure_future(cache.authenticate(header))
        await asyncio.sleep(0.05)
        leaving.cancel()
        loads.gate.set()
        return await staying

    assert asyncio.run(scenario()).key_id == api_key[0].pk
    assert loads.calls == 1


def test_a_failed_load_reaches_every_waiter_and_is_not_cached(api_key) -> None:
    cache = KeyCache()
    loads = Counted(cache)
    real = loads.real
    header = f"Bearer {api_key[1]}"

    async def unreachable(prefix: str) -> KeyEntry | None:
        await asyncio.sleep(0.05)
        raise OperationalError("connection refused")

    async def scenario() -> KeyEntry:
        loads.real = unreachable
        outcomes = await asyncio.gather(*(cache.authenticate(header) for _ in range(3)), return_exceptions=True)
        assert [type(o) for o in outcomes] == [OperationalError] * 3
        loads.real = real  # the database is back: the next request loads again
        return await cache.authenticate(header)

    assert asyncio.run(scenario()).key_id == api_key[0].pk
    assert loads.calls == 2
