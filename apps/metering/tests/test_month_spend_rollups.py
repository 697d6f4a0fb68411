"""Month spend (budget alerts, the admin's spend bars, the gateway's counter seed) reads the hourly
rollups plus only the raw records not rolled up yet: the totals equal the plain sum of raw records
whatever the state of the rollups, and the work does not grow with the month's records."""

from __future__ import annotations

import random
from datetime import UTC, datetime, timedelta

import pytest
from django.db import connection
from django.db.models import F, Sum
from django.db.models.functions import Coalesce

from apps.metering.models import RollupCursor, UsageRecord, UsageRollupHour
from apps.metering.rollups import HOUR, floor_hour, rollups_build, rollups_catch_up
from apps.metering.selectors import month_spend, month_spend_subquery, owner_month_usage
from apps.metering.tests.factories import make_usage
from apps.tenancy.models import ApiKey, Tenant
from apps.tenancy.services import api_key_issue, tenant_create

pytestmark = pytest.mark.django_db

NOW = datetime(2026, 11, 20, 12, 30, tzinfo=UTC)
MONTH = "2026-11"
MONTH_START, MONTH_END = datetime(2026, 11, 1, tzinfo=UTC), datetime(2026, 12, 1, tzinfo=UTC)


@pytest.fixture
def owners(db) -> tuple[Tenant, Tenant, ApiKey]:
    acme, other = tenant_create(slug="acme"), tenant_create(slug="other")
    key, _ = api_key_issue(tenant=acme, name="batch")
    return acme, other, key


def _raw(**owner: int) -> dict[str, int]:
    """The plain truth: the month's raw records summed, no rollups involved."""
    rows = UsageRecord.objects.filter(created_at__gte=MONTH_START, created_at__lt=MONTH_END, **owner)
    return rows.aggregate(
        micros=Coalesce(Sum("cost_micros"), 0), tokens=Coalesce(Sum(F("prompt_tokens") + F("completion_tokens")), 0)
    )


def _scatter(rng: random.Random, owners: tuple[Tenant, Tenant, ApiKey], n: int, *, start: datetime, end: datetime):
    acme, other, key = owners
    span = (end - start).total_seconds()
    for _ in range(n):
        tenant, api_key = rng.choice([(acme, None), (acme, key), (other, None)])
        make_usage(
            tenant=tenant,
            api_key=api_key,
            created_at=start + timedelta(seconds=rng.uniform(0, span - 1)),
            cost_micros=rng.randint(1, 50_000),
            prompt_tokens=rng.randint(0, 900),
            completion_tokens=rng.randint(0, 900),
        )


def _assert_every_reader_equals_the_raw_sum(owners: tuple[Tenant, Tenant, ApiKey]) -> None:
    acme, other, key = owners
    truth = {
        "tenant": {t.pk: _raw(tenant_id=t.pk) for t in (acme, other)},
        "key": {key.pk: _raw(api_key_id=key.pk)},
    }
    spend = month_spend(tenant_ids=[acme.pk, other.pk], key_ids=[key.pk], month=MONTH)
    expected = {f"{kind}:{pk}": t["micros"] for kind, by_id in truth.items() for pk, t in by_id.items()}
    assert spend == {owner: micros for owner, micros in expected.items() if micros}  # owners with no usage: absent
    for kind, by_id in truth.items():
        for pk, t in by_id.items():
            assert owner_month_usage(owner=f"{kind}:{pk}", month=MONTH, unit="micros") == t["micros"]
            assert owner_month_usage(owner=f"{kind}:{pk}", month=MONTH, unit="tokens") == t["tokens"]
    # The admin's bars: the same numbers through the correlated subqueries.
    from unittest import mock

    with mock.patch("apps.metering.selectors.month_key", return_value=MONTH):
        bars = dict(Tenant.objects.annotate(s=month_spend_subquery(owner_field="tenant")).values_list("pk", "s"))
        key_bar = ApiKey.objects.annotate(s=month_spend_subquery(owner_field="api_key")).get(pk=key.pk).s
    assert bars == {pk: t["micros"] for pk, t in truth["tenant"].items()}
    assert key_bar == truth["key"][key.pk]["micros"]


def test_totals_equal_the_raw_sum_with_records_before_and_after_the_cursor(owners) -> None:
    rng = random.Random(12)
    acme, _, key = owners
    current = floor_hour(NOW)
    # Last month and next month: never counted.
    make_usage(tenant=acme, api_key=key, created_at=MONTH_START - timedelta(seconds=1), cost_micros=10**9)
    make_usage(tenant=acme, api_key=key, created_at=MONTH_END, cost_micros=10**9)
    _assert_every_reader_equals_the_raw_sum(owners)  # nothing rolled up yet: all raw

    # Before the cursor: a month of traffic, including the current hour, then the beat's pass.
    _scatter(rng, owners, 150, start=MONTH_START, end=NOW)
    rollups_catch_up(now=NOW)
    cursor = RollupCursor.objects.get()
    assert cursor.covered_before == current and cursor.last_record_id == UsageRecord.objects.latest("id").pk
    _assert_every_reader_equals_the_raw_sum(owners)

    # After the cursor: more in the current hour, records landing late in long-built hours (the
    # gateway's buffer waited out an outage), and in the last hour after its build.
    _scatter(rng, owners, 20, start=current, end=NOW)
    _scatter(rng, owners, 15, start=MONTH_START, end=current - HOUR * 5)
    _scatter(rng, owners, 5, start=current - HOUR, end=current)
    _assert_every_reader_equals_the_raw_sum(owners)

    # Staff rebuild one hour by hand (its late records now in its rollup, above the cursor).
    late_hour = floor_hour(UsageRecord.objects.filter(id__gt=cursor.last_record_id).earliest("created_at").created_at)
    rollups_build(hour=late_hour, now=NOW)
    _assert_every_reader_equals_the_raw_sum(owners)

    # The next passes, one of them an hour later: still the raw sum at every step.
    rollups_catch_up(now=NOW)
    _assert_every_reader_equals_the_raw_sum(owners)
    later = NOW + HOUR
    _scatter(rng, owners, 10, start=current, end=later)
    rollups_catch_up(now=later)
    _assert_every_reader_equals_the_raw_sum(owners)


def test_the_rollups_are_what_is_read_for_rolled_up_hours(owners) -> None:
    acme, _, _ = owners
    make_usage(tenant=acme, created_at=NOW - timedelta(days=3), cost_micros=1_000)
    make_usage(tenant=acme, created_at=NOW, cost_micros=20)  # the current hour: raw
    rollups_catch_up(now=NOW)
    UsageRecord.objects.filter(created_at__lt=floor_hour(NOW)).delete()  # as retention does, after the rollup

    assert month_spend(tenant_ids=[acme.pk], month=MONTH) == {f"tenant:{acme.pk}": 1_020}


def test_a_beat_away_longer_than_the_lookback_leaves_no_hole(owners, settings) -> None:
    settings.USAGE_ROLLUP_LOOKBACK_HOURS = 1
    acme, _, _ = owners
    rollups_catch_up(now=NOW)
    make_usage(tenant=acme, created_at=NOW, cost_micros=300)  # the current hour of that pass
    rollups_catch_up(now=NOW)  # same hour: the record is below the cursor, its hour not built
    rollups_catch_up(now=NOW + HOUR * 6)  # beat was away for hours

    assert UsageRollupHour.objects.get(hour=floor_hour(NOW)).records == 1
    assert month_spend(tenant_ids=[acme.pk], month=MONTH) == {f"tenant:{acme.pk}": 300}


def _usage_rows_read() -> int:
    with connection.cursor() as cursor:
        cursor.execute(
            "SELECT coalesce(seq_tup_read, 0) + coalesce(idx_tup_fetch, 0) FROM pg_stat_xact_user_tables "
            "WHERE relname = %s",
            [UsageRecord._meta.db_table],
        )
        return int(cursor.fetchone()[0])


@pytest.mark.parametrize("rolled_up", [40, 400])
def test_the_work_does_not_grow_with_the_months_records(owners, rolled_up, django_assert_num_queries) -> None:
    rng = random.Random(rolled_up)
    acme, other, key = owners
    _scatter(rng, owners, rolled_up, start=MONTH_START, end=floor_hour(NOW))
    rollups_catch_up(now=NOW)
    _scatter(rng, owners, 6, start=floor_hour(NOW), end=NOW)  # the current hour: read raw

    # The same queries for 40 or 400 records: the cursor, rollups per kind, the raw rows not rolled up.
    with django_assert_num_queries(4):
        spend = month_spend(tenant_ids=[acme.pk, other.pk], key_ids=[key.pk], month=MONTH)
    assert sum(v for k, v in spend.items() if k.startswith("tenant:")) == _raw()["micros"]

    if connection.vendor != "postgresql":
        return
    # And the raw rows it touches are the current hour's, not the month's: counted by PostgreSQL
    # itself, with the plans it picks on a big table (a tiny test table would be scanned whole).
    with connection.cursor() as cursor:
        cursor.execute("SET LOCAL enable_seqscan = off")
        cursor.execute("ANALYZE metering_usagerecord")  # what autovacuum keeps up to date on a real table
    before = _usage_rows_read()
    month_spend(tenant_ids=[acme.pk, other.pk], key_ids=[key.pk], month=MONTH)
    assert _usage_rows_read() - before <= 6 * 4  # at most a few reads of each unrolled record


def test_the_first_pass_after_the_upgrade_builds_hours_older_passes_left_unbuilt(owners) -> None:
    acme, _, _ = owners
    hole = make_usage(tenant=acme, created_at=NOW - timedelta(days=2), cost_micros=500)
    # What a pass before covered_before existed could leave: the cursor past a record never built.
    RollupCursor.objects.create(name="rollups", last_record_id=hole.pk)

    rollups_catch_up(now=NOW)

    assert UsageRollupHour.objects.get(hour=floor_hour(hole.created_at)).records == 1
    assert month_spend(tenant_ids=[acme.pk], month=MONTH) == {f"tenant:{acme.pk}": 500}
