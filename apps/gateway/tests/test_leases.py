"""Admission leases (apps/gateway/leases.py): two workers leasing slices of the same limits never
admit more than the limit together, an idle slice's unused part goes back within its expiry,
and the headers follow local use. Against the real Redis (REDIS_URL)."""

from __future__ import annotations

import asyncio
import math
import time

import pytest

from apps.core import redis as redis_lib
from apps.gateway.limits import Admission, Budget, Limit, RateLimiter

PREFIX = "crosslogic:rl:"
CONC_KEY = f"{PREFIX}conc:key:1"


def patient(redis, **options) -> RateLimiter:
    """A limiter that waits for Redis (5 s, not the gateway's 0.5 s): these tests count what Redis
    admits, and a reply delayed on a loaded CI machine must not turn into a fail-open admission."""
    return RateLimiter(redis, timeout_s=5.0, **options)


@pytest.fixture
async def workers(redis_db):
    """Two gateway workers: independent limiters, each with its own Redis connection."""
    clients = [redis_lib.multiplexed() for _ in range(2)]
    yield [patient(c) for c in clients]
    for client in clients:
        await client.aclose()


async def hammer(
    workers: list[RateLimiter], limits: list[Limit], *, waves: int, per_wave: int, budgets=(), reserve=0, micros=0
) -> list[Admission]:
    """Waves of simultaneous requests from every worker: the rate rises, so slices grow."""
    admitted: list[Admission] = []
    for wave in range(waves):
        results = await asyncio.gather(
            *(
                w.admit(
                    limits=limits,
                    reserve_tokens=reserve,
                    reserve_micros=micros,
                    budgets=budgets,
                    request_id=f"w{n}-{wave}-{i}",
                )
                for n, w in enumerate(workers)
                for i in range(per_wave)
            )
        )
        admitted += [a for a in results if a.allowed]
    return admitted


def owner(workers: list[RateLimiter], admission: Admission) -> RateLimiter:
    """The worker that admitted a request of ``hammer``: it holds the slices the request used."""
    assert admission.token is not None
    return workers[int(admission.token.request_id[1])]


def refill(limit: int, started: float) -> int:
    """What a bucket of ``limit`` per minute refills while the test ran (a bound, rounded up)."""
    return math.ceil((time.monotonic() - started + 0.05) * limit / 60)


@pytest.mark.parametrize(
    ("limit", "reserve"),
    [(Limit("key:1", 400, None, None), 0), (Limit("key:1", None, 40_000, None), 100)],
    ids=["requests-per-minute", "tokens-per-minute"],
)
async def test_two_workers_leasing_the_same_bucket_never_admit_more_than_it_holds(workers, limit, reserve):
    started = time.monotonic()
    admitted = await hammer(workers, [limit], waves=12, per_wave=50, reserve=reserve)

    assert sum(w.leases.local for w in workers) > 100  # most were admitted from slices
    bound = 400 + refill(400, started)  # 400 requests (or 400 x 100 tokens) per minute
    assert len(admitted) <= bound
    # Nothing is lost either: once the slices are back, what Redis still has is the rest.
    for w in workers:
        await w.drain()
    probe = await patient(workers[0].redis, lease_s=0).admit(limits=[limit], reserve_tokens=0, request_id="p")
    if reserve == 0:  # the probe takes a request itself when it is admitted
        remaining = int(probe.headers["x-ratelimit-remaining-requests"]) + probe.allowed
    else:
        remaining = int(probe.headers["x-ratelimit-remaining-tokens"]) // reserve
    assert 400 <= len(admitted) + remaining <= bound


async def test_two_workers_leasing_concurrency_slots_never_hold_more_than_the_limit(workers, redis_db):
    limit = Limit("key:1", None, None, 190)  # not a multiple of the slices: one would not fit

    admitted = await hammer(workers, [limit], waves=8, per_wave=50)

    assert sum(w.leases.local for w in workers) > 20
    assert len(admitted) <= 190
    assert redis_db.zcard(CONC_KEY) <= 190  # in flight and leased together: never past the limit
    assert len(admitted) >= 190 - 2 * (190 // 8)  # at most a slice of 1/8 of the limit idle per worker
    await asyncio.gather(*(owner(workers, a).settle(a, used_tokens=0) for a in admitted))
    for w in workers:
        await w.drain()
    assert redis_db.zcard(CONC_KEY) == 0  # every slot, leased or not, is back


async def test_two_workers_leasing_a_dollar_budget_never_reserve_past_it_and_meter_exactly(workers, redis_db):
    budget = Budget.dollars(owner="tenant:1", limit_micros=40_000, month="2026-11")

    admitted = await hammer(workers, [], waves=12, per_wave=50, budgets=[budget], reserve=10, micros=100)

    assert sum(w.leases.local for w in workers) > 100
    assert len(admitted) <= 400  # 400 reservations of 100 fill $0.04
    assert int(redis_db.get(budget.key)) <= 40_000  # slices included: never past the limit
    await asyncio.gather(*(owner(workers, a).settle(a, used_tokens=5, used_micros=37) for a in admitted))
    for w in workers:
        await w.drain()
    assert int(redis_db.get(budget.key)) == 37 * len(admitted)  # exactly what was spent


async def test_a_small_limit_or_a_quiet_key_is_never_leased(workers, redis_db):
    small = Limit("key:1", None, None, 10)  # 1/8 of 10 is less than one slot
    results = await hammer(workers, [small], waves=3, per_wave=25)
    assert len(results) == 10
    assert all(not m.startswith(b"lease:") for m in redis_db.zrange(CONC_KEY, 0, -1))

    quiet = patient(workers[0].redis, lease_s=0.05)
    for i in range(4):
        await asyncio.sleep(0.06)  # one request per slice's lifetime: k stays 1
        assert (
            await quiet.admit(limits=[Limit("key:2", 600, None, 600)], reserve_tokens=0, request_id=f"q{i}")
        ).allowed
    assert quiet.leases.local == 0
    assert redis_db.zcard(f"{PREFIX}conc:key:2") == 4


async def test_an_idle_slice_goes_back_within_its_expiry(redis_db):
    clients = [redis_lib.multiplexed() for _ in range(2)]
    # The other worker leases nothing, so what Redis holds after the expiry is easy to name.
    busy, other = patient(clients[0], lease_s=0.2), patient(clients[1], lease_s=0)
    limits = [Limit("key:1", 120, None, 200)]
    budget = Budget.dollars(owner="key:1", limit_micros=1_000_000, month="2026-11")
    try:
        started = time.monotonic()
        first = [
            await busy.admit(limits=limits, reserve_tokens=0, reserve_micros=100, budgets=[budget], request_id=f"b{i}")
            for i in range(20)
        ]
        assert all(a.allowed for a in first) and busy.leases.local > 0
        for a in first:
            await busy.settle(a, used_tokens=0, used_micros=40)
        held = busy.leases.held(f"{PREFIX}rpm:key:1")
        assert held > 0  # leased and not used: unavailable to the other worker for now
        assert redis_db.zcard(CONC_KEY) > 0 and int(redis_db.get(budget.key)) > 20 * 40

        async def take_all(tag: str) -> int:
            n = 0
            while (await other.admit(limits=limits, reserve_tokens=0, request_id=f"{tag}{n}")).allowed:
                n += 1
            return n

        while_held = await take_all("o")  # the busy worker's idle slice is not available yet
        await asyncio.sleep(0.35)  # past the slice's expiry: its unused part went back to Redis

        assert redis_db.zcard(CONC_KEY) == while_held  # the idle leased slots are gone
        assert int(redis_db.get(budget.key)) == 20 * 40  # unused reservations subtracted
        after = await take_all("p")
        assert after >= held  # the returned requests are admitted elsewhere
        assert 120 <= 20 + while_held + after <= 120 + refill(120, started)  # bounded, then none lost
    finally:
        for client in clients:
            await client.aclose()


async def test_headers_count_down_with_local_admissions(redis_db):
    limiter = patient(redis_lib.multiplexed())
    limit = Limit("key:1", 6000, 600_000, None)
    try:
        started = time.monotonic()
        remaining = []
        for i in range(60):
            admission = await limiter.admit(limits=[limit], reserve_tokens=100, request_id=f"h{i}")
            remaining.append(
                (
                    int(admission.headers["x-ratelimit-remaining-requests"]),
                    admission.headers["x-ratelimit-limit-requests"],
                )
            )
        assert limiter.leases.local > 30
        slack = refill(6000, started)
        for i, (left, limit_header) in enumerate(remaining):
            assert limit_header == "6000"
            assert 6000 - (i + 1) <= left <= 6000 - (i + 1) + slack  # Redis's last answer minus local use
    finally:
        await limiter.redis.aclose()


async def test_a_burst_at_a_busy_key_costs_few_redis_calls(redis_db):
    limiter = patient(redis_lib.multiplexed())
    calls = []
    real_call = limiter._call

    async def counting(script, keys, args):  # a spy on the real call: Redis still answers
        calls.append(script)
        return await real_call(script, keys, args)

    limiter._call = counting
    limits = [Limit("tenant:1", 100_000, 10_000_000, 10_000)]
    try:
        for wave in range(5):
            results = await asyncio.gather(
                *(limiter.admit(limits=limits, reserve_tokens=100, request_id=f"{wave}-{i}") for i in range(200))
            )
            assert all(a.allowed for a in results)
            await asyncio.gather(*(limiter.settle(a, used_tokens=100) for a in results))
    finally:
        await limiter.redis.aclose()

    # Requests waiting for the lease their worker already asked for make no call of their own.
    assert limiter.leases.local > 900
    assert len(calls) <= 1000 / 10
