"""Rate limits are exact under concurrency, all-or-nothing across subjects, corrected at settle,
and never break a request when Redis is gone. Against the real Redis (REDIS_URL)."""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import socket

import pytest

from apps.core import redis as redis_lib
from apps.gateway.limits import Admission, Budget, Limit, RateLimiter, format_duration

PREFIX = "crosslogic:rl:"


@pytest.fixture
async def clients(redis_db):
    """Five independent Redis clients: five gateway workers competing for the same limits."""
    made = [redis_lib.multiplexed() for _ in range(5)]
    yield made
    for client in made:
        await client.aclose()


@pytest.fixture
def limiter(clients):
    return RateLimiter(clients[0])


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def admit_concurrently(clients, limits, *, n=50, reserve=0) -> list[Admission]:
    workers = [RateLimiter(c) for c in clients]
    return await asyncio.gather(
        *(
            workers[i % len(workers)].admit(limits=limits, reserve_tokens=reserve, request_id=f"req-{i}")
            for i in range(n)
        )
    )


async def remaining_tokens(limiter: RateLimiter, limit: Limit) -> int:
    probe = await limiter.admit(limits=[limit], reserve_tokens=0, request_id="probe")
    return int(probe.headers["x-ratelimit-remaining-tokens"])


# --- exactness under concurrency --------------------------------------------------------------


async def test_fifty_simultaneous_requests_against_ten_per_minute_admit_exactly_ten(clients):
    results = await admit_concurrently(clients, [Limit("key:1", 10, None, None)])

    assert sum(a.allowed for a in results) == 10
    refused = [a for a in results if not a.allowed]
    assert {a.reason for a in refused} == {"requests"}
    assert all(0 < a.retry_after_s <= 6.0 for a in refused)  # one request per 6 s refills


async def test_fifty_simultaneous_requests_against_ten_concurrent_admit_exactly_ten(clients, limiter):
    limit = Limit("key:1", None, None, 10)
    results = await admit_concurrently(clients, [limit])

    assert sum(a.allowed for a in results) == 10
    assert {a.reason for a in results if not a.allowed} == {"concurrency"}
    late = await limiter.admit(limits=[limit], reserve_tokens=0, request_id="late")
    assert not late.allowed and late.reason == "concurrency"
    await limiter.settle(next(a for a in results if a.allowed), used_tokens=0)
    assert (await limiter.admit(limits=[limit], reserve_tokens=0, request_id="after-release")).allowed
    assert not (await limiter.admit(limits=[limit], reserve_tokens=0, request_id="one-too-many")).allowed


async def test_fifty_simultaneous_reservations_against_a_token_budget_admit_exactly_ten(clients):
    results = await admit_concurrently(clients, [Limit("key:1", None, 1000, None)], reserve=100)

    assert sum(a.allowed for a in results) == 10
    assert {a.reason for a in results if not a.allowed} == {"tokens"}


# --- all or nothing across subjects -----------------------------------------------------------


async def test_a_subject_that_refuses_charges_no_other_subject(limiter, redis_db):
    key, tenant = Limit("key:1", 10, None, None), Limit("tenant:1", 3, None, None)

    results = [await limiter.admit(limits=[key, tenant], reserve_tokens=0, request_id=f"r{i}") for i in range(8)]
    key_only = await limiter.admit(limits=[key], reserve_tokens=0, request_id="key-only")

    assert [a.allowed for a in results] == [True] * 3 + [False] * 5
    assert {a.reason for a in results[3:]} == {"requests"}
    # the key was charged 3 times by the pair and once now: the refused five cost it nothing
    assert key_only.headers["x-ratelimit-remaining-requests"] == "6"


async def test_a_token_refusal_takes_no_concurrency_slot(limiter, redis_db):
    key, tenant = Limit("key:1", None, None, 1), Limit("tenant:1", None, 100, None)
    first = await limiter.admit(limits=[key, tenant], reserve_tokens=100, request_id="first")
    await limiter.settle(first, used_tokens=100)

    second = await limiter.admit(limits=[key, tenant], reserve_tokens=50, request_id="second")

    assert first.allowed and not second.allowed and second.reason == "tokens"
    assert redis_db.zcard(f"{PREFIX}conc:key:1") == 0


# --- settle ---------------------------------------------------------------------------------


async def test_settle_refunds_an_unused_reservation(limiter):
    limit = Limit("key:1", None, 1000, None)
    big = await limiter.admit(limits=[limit], reserve_tokens=800, request_id="big")
    refused_before = await limiter.admit(limits=[limit], reserve_tokens=800, request_id="too-early")

    await limiter.settle(big, used_tokens=100)

    assert big.allowed and not refused_before.allowed
    assert 899 <= await remaining_tokens(limiter, limit) <= 902  # 1000 - 100 used, plus a little refill
    assert (await limiter.admit(limits=[limit], reserve_tokens=800, request_id="now-fits")).allowed


async def test_settle_charges_an_overrun_as_debt(limiter):
    limit = Limit("key:1", None, 1000, None)
    small = await limiter.admit(limits=[limit], reserve_tokens=100, request_id="small")

    await limiter.settle(small, used_tokens=1500)
    after = await limiter.admit(limits=[limit], reserve_tokens=0, request_id="in-debt")

    assert not after.allowed and after.reason == "tokens"
    assert 29.0 <= after.retry_after_s <= 30.0  # 500 tokens of debt at 1000 per minute


async def test_settle_is_idempotent_even_from_another_worker(limiter, clients):
    limit = Limit("key:1", None, 1000, 1)
    admission = await limiter.admit(limits=[limit], reserve_tokens=100, request_id="once")

    await limiter.settle(admission, used_tokens=600)
    await limiter.settle(admission, used_tokens=600)
    await RateLimiter(clients[1]).settle(dataclasses.replace(admission, settled=False), used_tokens=600)

    assert 399 <= await remaining_tokens(limiter, limit) <= 402  # charged 600 once, not 1100 or 1600


async def test_settled_requests_leave_no_key_behind_in_redis(limiter, redis_db):
    limits = [Limit("key:1", 10_000, 1_000_000, 50), Limit("tenant:1", 10_000, 1_000_000, None)]
    budget = Budget.monthly(tenant_id=1, limit=10**9)
    per_subject = {
        f"{PREFIX}{kind}:{subject}".encode() for kind in ("rpm", "tpm", "conc") for subject in ("key:1", "tenant:1")
    }

    for i in range(300):
        admission = await limiter.admit(limits=limits, reserve_tokens=10, request_id=f"req-{i}", budgets=[budget])
        await limiter.settle(admission, used_tokens=5)

    # Memory follows the requests in flight, not the requests served (no marker per request).
    assert set(redis_db.keys(PREFIX + "*")) <= per_subject | {limiter.open_key.encode()}
    assert not redis_db.keys("*settled*")
    assert redis_db.zcard(limiter.open_key) == 0


async def test_a_settle_long_after_admission_still_corrects_the_reservation(clients, redis_db):
    # Entries of requests in flight live for the settle window, far beyond the concurrency TTL.
    limiter = RateLimiter(clients[0], concurrency_ttl_s=0.05)
    limit = Limit("key:1", None, 1000, 1)
    admission = await limiter.admit(limits=[limit], reserve_tokens=500, request_id="long")
    await asyncio.sleep(0.2)  # the concurrency slot expired; the request is still open

    await limiter.settle(admission, used_tokens=100)

    assert 899 <= await remaining_tokens(limiter, limit) <= 910  # 400 refunded (plus the refill meanwhile)


async def test_settle_releases_the_concurrency_slot(limiter, redis_db):
    limit = Limit("key:1", None, None, 1)
    held = await limiter.admit(limits=[limit], reserve_tokens=0, request_id="held")
    blocked = await limiter.admit(limits=[limit], reserve_tokens=0, request_id="blocked")

    await limiter.settle(held, used_tokens=0)

    assert held.allowed and not blocked.allowed and blocked.reason == "concurrency"
    assert blocked.retry_after_s == 1.0
    assert redis_db.zcard(f"{PREFIX}conc:key:1") == 0
    assert (await limiter.admit(limits=[limit], reserve_tokens=0, request_id="next")).allowed


async def test_settles_in_one_loop_pass_share_one_script_call_and_each_is_applied(limiter, redis_db):
    limits = [Limit("key:1", None, 6_000, 40), Limit("tenant:1", None, None, 40)]
    admitted = [
        await limiter.admit(limits=limits, reserve_tokens=100, request_id=f"batch-{i}", budgets=[budget])
        for i, budget in enumerate([Budget.monthly(tenant_id=1, limit=1_000_000)] * 30)
    ]
    assert all(a.allowed for a in admitted)
    tokens_only = Limit("key:1", None, 6_000, None)  # the same bucket, probed without taking a slot
    before = await remaining_tokens(limiter, tokens_only)

    await asyncio.gather(*(limiter.settle(a, used_tokens=40) for a in admitted))

    assert limiter._settles.calls == 1 and limiter._settles.entries == 30
    # Busy subjects lease slices (apps/gateway/leases.py): their unused parts go back to Redis
    # when they expire or at shutdown; give them back now to read Redis exactly.
    await limiter.drain()
    assert redis_db.zcard(f"{PREFIX}conc:key:1") == redis_db.zcard(f"{PREFIX}conc:tenant:1") == 0
    # Each refunded 100 - 40; the bucket also refills 100 tokens a second meanwhile.
    assert 0 <= await remaining_tokens(limiter, tokens_only) - (before + 30 * 60) <= 100
    assert int(redis_db.get(Budget.monthly(tenant_id=1, limit=1).key)) == 30 * 40
    await asyncio.gather(*(limiter.settle(a, used_tokens=40) for a in admitted))  # idempotent
    assert int(redis_db.get(Budget.monthly(tenant_id=1, limit=1).key)) == 30 * 40


async def test_a_failed_batch_fails_no_request_and_the_slots_expire(clients, redis_db):
    limiter = RateLimiter(clients[0], concurrency_ttl_s=0.3)
    limit = Limit("key:1", None, None, 5)
    admitted = [await limiter.admit(limits=[limit], reserve_tokens=0, request_id=f"f-{i}") for i in range(5)]
    await clients[0].aclose()
    limiter.redis = redis_lib.Multiplexed(f"redis://127.0.0.1:{closed_port()}/0")

    await asyncio.gather(*(limiter.settle(a, used_tokens=0) for a in admitted))  # never raises

    await asyncio.sleep(0.4)
    assert redis_db.zcard(f"{PREFIX}conc:key:1") == 5  # not settled: they expire by deadline instead
    fresh = RateLimiter(redis_lib.multiplexed())
    assert (await fresh.admit(limits=[limit], reserve_tokens=0, request_id="after-expiry")).allowed
    await fresh.redis.aclose()


async def test_a_crashed_workers_slots_expire_by_themselves(clients):
    limiter = RateLimiter(clients[0], concurrency_ttl_s=0.2)
    limit = Limit("key:1", None, None, 1)
    assert (await limiter.admit(limits=[limit], reserve_tokens=0, request_id="crashed")).allowed
    assert not (await limiter.admit(limits=[limit], reserve_tokens=0, request_id="waiting")).allowed

    await asyncio.sleep(0.3)  # the worker never settles

    assert (await limiter.admit(limits=[limit], reserve_tokens=0, request_id="waiting")).allowed


async def test_refresh_keeps_a_long_stream_in_its_slot(clients):
    limiter = RateLimiter(clients[0], concurrency_ttl_s=0.3)
    limit = Limit("key:1", None, None, 1)
    streaming = await limiter.admit(limits=[limit], reserve_tokens=0, request_id="long")

    for _ in range(3):
        await asyncio.sleep(0.15)
        await limiter.refresh(streaming)

    assert not (await limiter.admit(limits=[limit], reserve_tokens=0, request_id="other")).allowed


# --- monthly budgets ---------------------------------------------------------------------------


async def test_fifty_simultaneous_requests_against_a_budget_of_ten_reservations_admit_exactly_ten(clients, redis_db):
    workers = [RateLimiter(c) for c in clients]
    budget = Budget(key="crosslogic:budget:1:2026-11", limit=1000)

    results = await asyncio.gather(
        *(
            workers[i % 5].admit(limits=[], reserve_tokens=100, request_id=f"req-{i}", budgets=[budget])
            for i in range(50)
        )
    )

    assert sum(a.allowed for a in results) == 10
    assert {a.reason for a in results if not a.allowed} == {"budget"}
    assert int(redis_db.get(budget.key)) == 1000


async def test_settle_charges_the_budget_what_was_used_and_a_refused_request_charges_nothing(limiter, redis_db):
    budget = Budget(key="crosslogic:budget:1:2026-11", limit=100)
    tpm = Limit("key:1", None, 10, None)  # a tokens/min refusal must leave the budget alone
    first = await limiter.admit(limits=[tpm], reserve_tokens=8, request_id="a", budgets=[budget])
    refused = await limiter.admit(limits=[tpm], reserve_tokens=8, request_id="b", budgets=[budget])
    assert first.allowed and not refused.allowed and refused.reason == "tokens"
    assert int(redis_db.get(budget.key)) == 8

    await limiter.settle(first, used_tokens=130)  # overran its reservation
    await limiter.settle(first, used_tokens=130)  # idempotent

    assert int(redis_db.get(budget.key)) == 130
    assert 0 < redis_db.pttl(budget.key) <= 40 * 86_400_000
    late = await limiter.admit(limits=[], reserve_tokens=1, request_id="c", budgets=[budget])
    assert not late.allowed and late.reason == "budget"


def test_monthly_budget_keys_change_with_the_utc_month():
    nov = Budget.monthly(tenant_id=7, limit=5, now=1_796_000_000)  # 2026-11-29 UTC
    dec = Budget.monthly(tenant_id=7, limit=5, now=1_796_000_000 + 5 * 86_400)

    assert nov.key == "crosslogic:budget:7:2026-11" and dec.key == "crosslogic:budget:7:2026-12"


async def test_fifty_simultaneous_requests_against_a_dollar_budget_overshoot_by_at_most_the_reservations(
    clients, redis_db
):
    # $0.001 a month; each request may cost at most $0.00007 (its reservation) and really costs $0.00003.
    workers = [RateLimiter(c) for c in clients]
    budget = Budget.dollars(owner="tenant:1", limit_micros=1000, month="2026-11")

    results = await asyncio.gather(
        *(
            workers[i % 5].admit(
                limits=[], reserve_tokens=100, reserve_micros=70, request_id=f"req-{i}", budgets=[budget]
            )
            for i in range(50)
        )
    )
    admitted = [a for a in results if a.allowed]

    # Admitted while used + reserved < $0.001: 15 reservations (0 .. 980), so 1050 at most.
    assert len(admitted) == 15
    assert {a.reason for a in results if not a.allowed} == {"budget"}
    assert {a.budget for a in results if not a.allowed} == {budget}
    assert int(redis_db.get(budget.key)) == 15 * 70
    await asyncio.gather(*(workers[0].settle(a, used_tokens=50, used_micros=30) for a in admitted))
    assert int(redis_db.get(budget.key)) == 15 * 30  # exactly the real spend once all are settled
    more = await asyncio.gather(
        *(
            workers[i % 5].admit(
                limits=[], reserve_tokens=100, reserve_micros=70, request_id=f"more-{i}", budgets=[budget]
            )
            for i in range(50)
        )
    )
    assert sum(a.allowed for a in more) == 8  # 450 + 8 * 70 = 1010: the next one finds it spent


async def test_a_dollar_refusal_charges_no_token_budget_and_names_the_budget(limiter, redis_db):
    tokens = Budget.monthly(tenant_id=1, limit=10**6, month="2026-11")
    tenant_usd = Budget.dollars(owner="tenant:1", limit_micros=10**6, month="2026-11")
    key_usd = Budget.dollars(owner="key:7", limit_micros=100, month="2026-11")
    budgets = [tokens, tenant_usd, key_usd]
    first = await limiter.admit(limits=[], reserve_tokens=10, reserve_micros=100, request_id="a", budgets=budgets)

    refused = await limiter.admit(limits=[], reserve_tokens=10, reserve_micros=100, request_id="b", budgets=budgets)

    assert first.allowed and not refused.allowed and refused.reason == "budget" and refused.budget == key_usd
    assert [int(redis_db.get(b.key)) for b in budgets] == [10, 100, 100]
    await limiter.settle(first, used_tokens=4, used_micros=40)
    assert [int(redis_db.get(b.key)) for b in budgets] == [4, 40, 40]


async def test_a_missing_counter_is_seeded_once_from_the_seeder_then_enforced(clients, redis_db):
    calls = []

    async def seeder(budget):
        calls.append(budget.key)
        await asyncio.sleep(0.01)  # a database query: the other workers' admits overtake it
        return 950

    workers = [RateLimiter(c, seeder=seeder) for c in clients]
    budget = Budget.dollars(owner="key:3", limit_micros=1000, month="2026-11")

    results = await asyncio.gather(
        *(
            workers[i % 5].admit(limits=[], reserve_tokens=0, reserve_micros=10, request_id=f"r{i}", budgets=[budget])
            for i in range(50)
        )
    )

    assert sum(a.allowed for a in results) == 5  # 950 seeded, then 5 reservations of 10
    assert int(redis_db.get(budget.key)) == 1000
    calls_after_seeding = len(calls)
    assert 1 <= calls_after_seeding <= 50  # workers racing to seed agree through SET NX
    await workers[0].admit(limits=[], reserve_tokens=0, reserve_micros=10, request_id="later", budgets=[budget])
    assert len(calls) == calls_after_seeding  # a counter Redis has is never seeded again


async def test_a_seeder_that_fails_leaves_the_budget_out_and_the_request_admitted(clients, redis_db, caplog):
    async def broken(budget):
        raise OSError("database unavailable")

    limiter = RateLimiter(clients[0], seeder=broken)
    budget = Budget.dollars(owner="tenant:9", limit_micros=0, month="2026-11")

    with caplog.at_level(logging.WARNING, logger="apps.gateway.limits"):
        admitted = await limiter.admit(limits=[], reserve_tokens=0, reserve_micros=10, request_id="r", budgets=[budget])
    await limiter.settle(admitted, used_tokens=1, used_micros=5)

    assert admitted.allowed and redis_db.get(budget.key) is None
    assert "could not seed" in caplog.text


def test_dollar_budget_keys_are_per_owner_and_utc_month():
    nov = Budget.dollars(owner="key:12", limit_micros=5, now=1_796_000_000)
    dec = Budget.dollars(owner="tenant:12", limit_micros=5, now=1_796_000_000 + 5 * 86_400)

    assert nov.key == "crosslogic:budget:usd:key:12:2026-11" and nov.unit == "micros"
    assert dec.key == "crosslogic:budget:usd:tenant:12:2026-12" and dec.month == "2026-12"


# --- edges --------------------------------------------------------------------------------------


async def test_a_reservation_larger_than_the_budget_waits_for_a_full_bucket(limiter):
    limit = Limit("key:1", None, 100, None)

    first = await limiter.admit(limits=[limit], reserve_tokens=5000, request_id="huge")
    second = await limiter.admit(limits=[limit], reserve_tokens=1, request_id="next")

    assert first.allowed and not second.allowed


async def test_a_zero_limit_refuses_everything(limiter):
    refused = await limiter.admit(limits=[Limit("key:1", 0, None, None)], reserve_tokens=0, request_id="r")

    assert not refused.allowed and refused.reason == "requests" and refused.retry_after_s == 60.0


async def test_unlimited_subjects_need_no_redis():
    limiter = RateLimiter(None, fail_open=False)

    admission = await limiter.admit(limits=[Limit("key:1", None, None, None)], reserve_tokens=10, request_id="r")

    assert admission.allowed and admission.headers == {}
    await limiter.settle(admission, used_tokens=10)


# --- headers ------------------------------------------------------------------------------------


async def test_headers_follow_openai_for_the_most_constraining_subject(limiter):
    key, tenant = Limit("key:1", 100, 5000, None), Limit("tenant:1", 10, 1000, None)

    admission = await limiter.admit(limits=[key, tenant], reserve_tokens=100, request_id="r")

    assert admission.headers == {
        "x-ratelimit-limit-requests": "10",
        "x-ratelimit-remaining-requests": "9",
        "x-ratelimit-reset-requests": "6s",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "900",
        "x-ratelimit-reset-tokens": "6s",
    }


async def test_a_refusal_reports_the_other_subjects_uncharged(limiter):
    key, tenant = Limit("key:1", 10, None, None), Limit("tenant:1", None, 100, None)
    await limiter.admit(limits=[tenant], reserve_tokens=100, request_id="uses-the-tenant-up")

    refused = await limiter.admit(limits=[key, tenant], reserve_tokens=50, request_id="r")

    assert not refused.allowed and refused.reason == "tokens"
    assert refused.headers["x-ratelimit-remaining-tokens"] == "0"
    assert refused.headers["x-ratelimit-remaining-requests"] == "10"  # the key was not charged
    assert refused.headers["x-ratelimit-reset-requests"] == "0ms"


async def test_refusals_carry_headers_too(limiter):
    limit = Limit("key:1", 1, None, None)
    await limiter.admit(limits=[limit], reserve_tokens=0, request_id="a")

    refused = await limiter.admit(limits=[limit], reserve_tokens=0, request_id="b")

    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.headers["x-ratelimit-reset-requests"].endswith("s")
    assert 59.0 < refused.retry_after_s <= 60.0


@pytest.mark.parametrize(
    ("ms", "text"),
    [
        (0, "0ms"),
        (20, "20ms"),
        (999.2, "1s"),
        (1000, "1s"),
        (1500, "1.5s"),
        (360_000, "6m0s"),
        (61_250, "1m1.25s"),
        (3_723_000, "1h2m3s"),
    ],
)
def test_durations_use_openais_format(ms, text):
    assert format_duration(ms) == text


# --- Redis unavailable ---------------------------------------------------------------------------


async def test_without_redis_fail_open_admits_and_fail_closed_refuses_without_raising(caplog):
    dead = redis_lib.Multiplexed(f"redis://127.0.0.1:{closed_port()}")
    limits = [Limit("key:1", 10, 1000, 5)]
    try:
        with caplog.at_level(logging.WARNING, logger="apps.gateway.limits"):
            open_limiter = RateLimiter(dead, fail_open=True, backoff_s=0)
            admitted = [
                await open_limiter.admit(limits=limits, reserve_tokens=10, request_id=f"o{i}") for i in range(20)
            ]
            await open_limiter.settle(admitted[0], used_tokens=10)
            closed = await RateLimiter(dead, fail_open=False).admit(limits=limits, reserve_tokens=10, request_id="c")
    finally:
        await dead.aclose()

    assert all(a.allowed for a in admitted)
    assert not closed.allowed and closed.reason == "unavailable" and closed.retry_after_s > 0
    warnings = [r for r in caplog.records if r.name == "apps.gateway.limits"]
    assert len(warnings) == 2  # one per limiter, not one per request


@pytest.mark.slow  # listens on a socket
async def test_a_hanging_redis_is_given_up_on_quickly(redis_db):
    # A listening socket that never answers: connect succeeds, the script call hangs.
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        server.listen()
        hung = redis_lib.Multiplexed(f"redis://127.0.0.1:{server.getsockname()[1]}")
        limiter = RateLimiter(hung, fail_open=True, timeout_s=0.2)
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()
            first = await limiter.admit(limits=[Limit("key:1", 10, None, None)], reserve_tokens=0, request_id="a")
            second = await limiter.admit(limits=[Limit("key:1", 10, None, None)], reserve_tokens=0, request_id="b")
            elapsed = loop.time() - started
        finally:
            await hung.aclose()

    assert first.allowed and second.allowed
    assert elapsed < 0.5  # the second did not wait: Redis is skipped for backoff_s after a failure
