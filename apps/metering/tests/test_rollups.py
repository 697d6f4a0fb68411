"""Hourly rollups: what a row holds, idempotent rebuilds, late records, percentiles, retention."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from apps.metering import histograms
from apps.metering.models import RollupCursor, UsageRecord, UsageRollup, UsageRollupHour
from apps.metering.rollups import rollups_build, rollups_build_range, rollups_catch_up, usage_records_prune
from apps.metering.summary import parse_group_by, usage_summary
from apps.metering.tests.factories import make_usage
from apps.tenancy.services import api_key_issue, tenant_create

pytestmark = pytest.mark.django_db

H0 = datetime(2026, 11, 30, 10, tzinfo=UTC)
NOW = datetime(2026, 11, 30, 14, 20, tzinfo=UTC)


def test_an_hour_rolls_up_into_one_row_per_tenant_key_and_model(tenant, api_key, catalog_model) -> None:
    key = api_key[0]
    make_usage(tenant=tenant, api_key=key, model=catalog_model, created_at=H0, ttft_ms=40.0, latency_ms=250.0)
    make_usage(
        tenant=tenant,
        api_key=key,
        model=catalog_model,
        created_at=H0 + timedelta(minutes=59, seconds=59),
        status_code=429,
        prompt_tokens=0,
        completion_tokens=0,
        cost_micros=0,
        ttft_ms=None,
        latency_ms=3.0,
    )
    make_usage(
        tenant=tenant,
        api_key=key,
        model=catalog_model,
        created_at=H0 + timedelta(minutes=5),
        status_code=502,
        estimated=True,
        prompt_tokens=5,
        completion_tokens=1,
        cost_micros=2,
    )
    make_usage(tenant=tenant, api_key=key, model=catalog_model, created_at=H0 + timedelta(minutes=6), status_code=499)
    make_usage(tenant=tenant, api_key=key, model=catalog_model, created_at=H0 + timedelta(minutes=7), status_code=400)
    make_usage(tenant=tenant, api_key=None, model=catalog_model, created_at=H0 + timedelta(minutes=8))
    make_usage(tenant=tenant, api_key=key, model=catalog_model, created_at=H0 + timedelta(hours=1))  # next hour

    result = rollups_build(hour=H0 + timedelta(minutes=30), now=NOW)

    assert (result.hour, result.records, result.groups) == (H0, 6, 2)
    row = UsageRollup.objects.get(hour=H0, api_key_prefix=key.prefix)
    assert (row.model_id, row.model_name, row.api_key_id) == (catalog_model.pk, catalog_model.name, key.pk)
    assert (row.requests, row.errors_4xx, row.errors_429, row.errors_5xx, row.cancelled) == (5, 1, 1, 1, 1)
    assert (row.prompt_tokens, row.completion_tokens) == (12 + 0 + 5 + 12 + 12, 30 + 0 + 1 + 30 + 30)
    assert (row.estimated_requests, row.estimated_tokens, row.cost_micros) == (1, 6, 7 + 0 + 2 + 7 + 7)
    assert sum(row.ttft_hist) == 4 and sum(row.latency_hist) == 5
    assert row.latency_hist[histograms.bucket_of(3.0)] == 1
    keyless = UsageRollup.objects.get(hour=H0, api_key_prefix="")
    assert keyless.api_key_id is None and keyless.requests == 1
    book = UsageRollupHour.objects.get(hour=H0)
    assert book.records == 6 and book.built_at is not None


def test_rebuilding_an_hour_is_idempotent_and_picks_up_late_records(tenant) -> None:
    make_usage(tenant=tenant, created_at=H0 + timedelta(minutes=1))
    rollups_build(hour=H0, now=NOW)
    rollups_build(hour=H0, now=NOW)
    assert list(UsageRollup.objects.values_list("requests", flat=True)) == [1]

    make_usage(tenant=tenant, created_at=H0 + timedelta(minutes=2))  # arrives after the build
    rollups_build(hour=H0, now=NOW)
    assert list(UsageRollup.objects.values_list("requests", flat=True)) == [2]


def test_an_hour_that_has_not_ended_is_refused() -> None:
    with pytest.raises(ValueError, match="has not ended"):
        rollups_build(hour=NOW, now=NOW)


def test_catch_up_rebuilds_recent_hours_and_old_hours_that_got_late_records(tenant, settings) -> None:
    settings.USAGE_ROLLUP_LOOKBACK_HOURS = 2
    make_usage(tenant=tenant, created_at=NOW - timedelta(hours=1))  # 13:xx
    built = rollups_catch_up(now=NOW)
    current = NOW.replace(minute=0)
    assert [r.hour for r in built] == [current - timedelta(hours=2), current - timedelta(hours=1)]
    assert RollupCursor.objects.get().last_record_id == UsageRecord.objects.get().pk

    late = make_usage(tenant=tenant, created_at=H0 - timedelta(days=2))  # a record from two days ago, written now
    built = rollups_catch_up(now=NOW)
    assert H0 - timedelta(days=2) in [r.hour for r in built]
    assert UsageRollup.objects.get(hour=H0 - timedelta(days=2)).requests == 1
    assert RollupCursor.objects.get().last_record_id == late.pk


def test_percentiles_come_from_merged_buckets_across_hours(tenant) -> None:
    for minute, latency in enumerate([10.0] * 50 + [100.0] * 45 + [1000.0] * 5):
        make_usage(tenant=tenant, created_at=H0 + timedelta(hours=minute % 2, minutes=minute % 60), latency_ms=latency)
    rollups_build_range(start=H0, end=H0 + timedelta(hours=2), now=NOW)

    [row] = usage_summary(start=H0, end=H0 + timedelta(hours=2), group_by="", now=NOW, live=False)
    data = row.as_dict(dimensions=())
    assert data["requests"] == 100
    assert data["latency_ms"] == {"p50": 10.0, "p95": 100.0, "p99": 1000.0}
    [hour0, hour1] = usage_summary(start=H0, end=H0 + timedelta(hours=2), group_by="hour", now=NOW, live=False)
    assert histograms.merge(list(hour0.latency_hist), hour1.latency_hist) == row.latency_hist


def test_summary_groups_by_model_key_day_and_reads_the_unrolled_hours_live(tenant, api_key, catalog_model) -> None:
    other = tenant_create(slug="other")
    other_key = api_key_issue(tenant=other, name="k", scopes=["inference"])[0]
    make_usage(tenant=tenant, api_key=api_key[0], model=catalog_model, created_at=H0)
    make_usage(tenant=tenant, api_key=api_key[0], model_name="other-model", created_at=H0 + timedelta(hours=1))
    make_usage(tenant=other, api_key=other_key, created_at=H0)
    make_usage(tenant=tenant, api_key=api_key[0], model=catalog_model, created_at=NOW - timedelta(minutes=5))  # live
    rollups_build_range(start=H0, end=H0 + timedelta(hours=2), now=NOW)

    start, end = H0 - timedelta(hours=3), NOW
    by_model = usage_summary(tenant=tenant, start=start, end=end, group_by="model", now=NOW)
    assert [(r.model_name, r.requests) for r in by_model] == [(catalog_model.name, 2), ("other-model", 1)]
    assert by_model[0].model_id == catalog_model.pk
    by_key = usage_summary(start=start, end=end, group_by=["key", "tenant"], now=NOW)
    assert sorted((r.tenant, r.api_key_prefix, r.requests) for r in by_key) == [
        ("acme", api_key[0].prefix, 3),
        ("other", other_key.prefix, 1),
    ]
    by_day = usage_summary(tenant=tenant, start=start, end=end, group_by="day", now=NOW)
    assert [(r.day.isoformat(), r.requests) for r in by_day] == [("2026-11-30", 3)]
    rolled_only = usage_summary(tenant=tenant, start=start, end=end, now=NOW, live=False)
    assert rolled_only[0].requests == 2
    empty = usage_summary(tenant=tenant, start=H0 - timedelta(days=9), end=H0 - timedelta(days=8), now=NOW)
    assert [r.requests for r in empty] == [0]


def test_group_by_is_validated() -> None:
    assert parse_group_by("model, day") == ("model", "day")
    with pytest.raises(ValueError, match="unknown nodes"):
        parse_group_by("nodes")
    with pytest.raises(ValueError, match="hour and day"):
        parse_group_by(["hour", "day"])


def test_retention_prunes_rolled_up_hours_in_batches_and_never_an_unrolled_one(tenant, settings) -> None:
    settings.USAGE_RETENTION_DAYS = 1
    settings.USAGE_PRUNE_BATCH = 3
    old = H0 - timedelta(days=3)
    for minute in range(7):
        make_usage(tenant=tenant, created_at=old + timedelta(minutes=minute))
    make_usage(tenant=tenant, created_at=old + timedelta(hours=1))  # an hour never rolled up
    keep = make_usage(tenant=tenant, created_at=NOW - timedelta(hours=2))  # inside retention
    rollups_build(hour=old, now=NOW)

    result = usage_records_prune(now=NOW, max_rows=5)
    assert result.deleted == 5 and result.hours == []
    result = usage_records_prune(now=NOW)
    assert result.deleted == 3 and result.hours == [old, old + timedelta(hours=1)]

    assert list(UsageRecord.objects.values_list("pk", flat=True)) == [keep.pk]
    # The unrolled hour was rolled up before its records went: nothing was lost.
    assert UsageRollup.objects.get(hour=old).requests == 7
    assert UsageRollup.objects.get(hour=old + timedelta(hours=1)).requests == 1
    assert UsageRollupHour.objects.get(hour=old).pruned_at == NOW
