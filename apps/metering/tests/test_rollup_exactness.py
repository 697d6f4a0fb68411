"""Totals are exact: rollups built while writers insert records (some late, into old hours) add up,
after a final rollup, to exactly the sum of the raw records, over 100k+ records."""

from __future__ import annotations

import random
import threading
from datetime import timedelta
from typing import Any

import pytest
from django.db import connection
from django.db.models import Count, Q, Sum
from django.db.models.functions import TruncHour
from django.utils import timezone

from apps.metering import histograms
from apps.metering.models import UsageRecord, UsageRollup
from apps.metering.rollups import HOUR, floor_hour, rollups_build_range, rollups_catch_up
from apps.metering.services import usage_records_create
from apps.metering.summary import usage_summary
from apps.tenancy.services import api_key_issue, tenant_create

pytestmark = [pytest.mark.slow, pytest.mark.django_db(transaction=True)]

HOURS = 8
BULK = 100_000
WRITERS = 4
WRITER_BATCHES = 20
BATCH = 250


def _record(rng: random.Random, *, n: str, start, tenants, keys, models) -> dict:
    tenant = rng.choice(tenants)
    status = rng.choices([200, 400, 429, 499, 500, 502], weights=[80, 4, 6, 3, 4, 3])[0]
    streamed = rng.random() < 0.7
    return {
        "request_id": n,
        "tenant_id": tenant.pk,
        "api_key_id": rng.choice([*keys[tenant.pk], None]),
        "model_name": rng.choice(models),
        "prompt_tokens": rng.randrange(0, 4000),
        "completion_tokens": rng.randrange(0, 2000) if status == 200 else 0,
        "estimated": rng.random() < 0.05,
        "streamed": streamed,
        "status_code": status,
        "ttft_ms": rng.lognormvariate(4, 1.2) if streamed and status == 200 else None,
        "latency_ms": rng.lognormvariate(6, 1.0),
        "cost_micros": rng.randrange(0, 50_000),
        "created_at": start + timedelta(seconds=rng.uniform(0, HOURS * 3600 - 0.001)),
    }


def test_rollup_totals_equal_the_raw_records_under_concurrent_writes() -> None:
    now = timezone.now()
    start = floor_hour(now) - HOUR * HOURS  # HOURS complete hours before the current one
    tenants = [tenant_create(slug=f"t{i}") for i in range(3)]
    keys = {
        t.pk: [api_key_issue(tenant=t, name=f"k{j}", scopes=["inference"])[0].pk for j in range(3)] for t in tenants
    }
    models = ["llama-3-8b", "qwen-2.5-7b", "mistral-7b"]
    rng = random.Random(12)
    rows = [_record(rng, n=f"bulk-{i}", start=start, tenants=tenants, keys=keys, models=models) for i in range(BULK)]
    for offset in range(0, BULK, 5000):
        usage_records_create(rows=rows[offset : offset + 5000])
    del rows

    errors: list[BaseException] = []
    writers_done = threading.Event()
    passes_during_writes: list[int] = []  # rollup passes that finished while writers were writing
    written: list[int] = []

    def writer(index: int) -> None:
        local = random.Random(index)
        try:
            batch = 0
            # At least WRITER_BATCHES, and on until a rollup pass ran entirely in the middle of the writes.
            while batch < WRITER_BATCHES or (not passes_during_writes and batch < 50 * WRITER_BATCHES):
                usage_records_create(
                    rows=[
                        _record(
                            local, n=f"w{index}-{batch}-{i}", start=start, tenants=tenants, keys=keys, models=models
                        )
                        for i in range(BATCH)
                    ]
                )
                written.append(BATCH)
                batch += 1
        except BaseException as exc:  # surfaced by the main thread
            errors.append(exc)
        finally:
            connection.close()

    def roller() -> None:
        try:
            # What beat does: rebuild the recent hours and every hour that got records since.
            while not writers_done.is_set():
                rollups_catch_up(now=now)
                if not writers_done.is_set():
                    passes_during_writes.append(1)
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(WRITERS)]
    rolling = threading.Thread(target=roller)
    rolling.start()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(300)
    writers_done.set()
    rolling.join(300)
    assert not errors, errors
    assert not rolling.is_alive() and not any(t.is_alive() for t in threads)
    assert passes_during_writes  # a rollup pass really ran against concurrent inserts

    rollups_build_range(start=start, end=start + HOUR * HOURS, now=now)  # the final rollup

    total_records = BULK + sum(written)
    assert sum(written) >= WRITERS * WRITER_BATCHES * BATCH
    assert UsageRecord.objects.count() == total_records
    # Every group, by an independent SQL aggregate over the raw records.
    raw = {
        (r["hour"], r["tenant_id"], r["api_key__prefix"] or "", r["model_name"]): r
        for r in UsageRecord.objects.annotate(hour=TruncHour("created_at"))
        .values("hour", "tenant_id", "api_key__prefix", "model_name")
        .annotate(
            requests=Count("id"),
            errors_4xx=Count(
                "id", filter=Q(status_code__gte=400, status_code__lt=500) & ~Q(status_code__in=[429, 499])
            ),
            errors_429=Count("id", filter=Q(status_code=429)),
            errors_5xx=Count("id", filter=Q(status_code__gte=500)),
            cancelled=Count("id", filter=Q(status_code=499)),
            prompt_tokens=Sum("prompt_tokens"),
            completion_tokens=Sum("completion_tokens"),
            estimated_requests=Count("id", filter=Q(estimated=True)),
            cost_micros=Sum("cost_micros"),
            ttft_count=Count("ttft_ms"),
            latency_count=Count("latency_ms"),
        )
    }
    rolled = {(r.hour, r.tenant_id, r.api_key_prefix, r.model_name): r for r in UsageRollup.objects.all()}
    assert set(rolled) == set(raw)
    fields = [
        "requests",
        "errors_4xx",
        "errors_429",
        "errors_5xx",
        "cancelled",
        "prompt_tokens",
        "completion_tokens",
        "estimated_requests",
        "cost_micros",
    ]
    for group, found in raw.items():
        expected: dict[str, Any] = dict(found)
        row = rolled[group]
        assert {f: getattr(row, f) for f in fields} == {f: expected[f] for f in fields}, group
        assert (sum(row.ttft_hist), sum(row.latency_hist)) == (expected["ttft_count"], expected["latency_count"])

    # The summary (rollups only) equals the raw totals, and its percentiles the raw values' buckets.
    for tenant in tenants:
        [summary] = usage_summary(tenant=tenant, start=start, end=start + HOUR * HOURS, live=False, now=now)
        records = UsageRecord.objects.filter(tenant=tenant)
        sums = records.aggregate(
            requests=Count("id"),
            prompt=Sum("prompt_tokens"),
            completion=Sum("completion_tokens"),
            cost=Sum("cost_micros"),
        )
        assert (summary.requests, summary.prompt_tokens, summary.completion_tokens, summary.cost_micros) == (
            sums["requests"],
            sums["prompt"],
            sums["completion"],
            sums["cost"],
        )
        latencies = histograms.from_values(records.values_list("latency_ms", flat=True))
        assert summary.latency_hist == latencies
        values = sorted(v for v in records.values_list("latency_ms", flat=True) if v is not None)
        true_p95 = values[-(-len(values) * 95 // 100) - 1]
        p95 = histograms.quantile(summary.latency_hist, 0.95)
        assert p95 is not None and true_p95 <= p95 < true_p95 * 1.26  # within one bucket, never below


def test_concurrent_builds_of_one_hour_queue_and_agree() -> None:
    now = timezone.now()
    hour = floor_hour(now) - HOUR * 2
    tenant = tenant_create(slug="same-hour")
    rng = random.Random(3)
    rows = [
        _record(rng, n=f"same-{i}", start=hour, tenants=[tenant], keys={tenant.pk: []}, models=["m"])
        for i in range(2000)
    ]
    for row in rows:
        row["created_at"] = hour + (row["created_at"] - hour) / HOURS  # all inside the one hour
    usage_records_create(rows=rows)
    errors: list[BaseException] = []
    barrier = threading.Barrier(4)

    def build() -> None:
        try:
            barrier.wait(10)
            for _ in range(3):
                rollups_build_range(start=hour, end=hour + HOUR, now=now)
        except BaseException as exc:
            errors.append(exc)
        finally:
            connection.close()

    threads = [threading.Thread(target=build) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(120)

    assert not errors, errors
    [built] = UsageRollup.objects.filter(hour=hour)
    assert built.requests == 2000
    assert built.prompt_tokens == sum(r["prompt_tokens"] for r in rows)
