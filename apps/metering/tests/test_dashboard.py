"""The staff dashboard: staff only, numbers that add up, and a number of queries that does not grow
with the data (tenants, models, nodes, records, rollup hours)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from django.contrib.auth.models import User
from django.core.cache import cache
from django.db import connection
from django.db.models import Sum
from django.test.utils import CaptureQueriesContext
from django.utils import timezone

from apps.catalog.models import ServedModel
from apps.fleet.models import Node, NodeEvent, NodeLoadHour, NodeStatus
from apps.metering.dashboard import dashboard_data
from apps.metering.models import UsageRecord
from apps.metering.rollups import rollups_build_range
from apps.metering.tests.factories import make_usage
from apps.tenancy.models import Tenant

pytestmark = pytest.mark.django_db


@pytest.fixture(autouse=True)
def _empty_cache():
    cache.clear()  # closed days are cached across calls (and the test Redis db across tests)
    yield
    cache.clear()


CHART_IDS = ("chart-traffic", "chart-tokens", "chart-spend", "chart-latency", "chart-fleet")
TABLE_IDS = ("table-top-tenants", "table-top-models", "table-fleet-nodes", "table-cold-starts", "table-economics")


def _populate(scale: int, now: datetime) -> dict[str, int]:
    """``scale`` tenants x models x nodes, records over 3 days; rollups built for every ended hour."""
    start = now - timedelta(days=3)
    cost = 0
    for i in range(scale):
        model = ServedModel.objects.create(name=f"m{scale}-{i}", hf_repo=f"org/m{i}", total_bytes=10**9 * (i + 1))
        tenant = Tenant.objects.create(slug=f"t{scale}-{i}", name=f"T {i}")
        node = Node.objects.create(
            model=model,
            accelerator="L4:1",
            hourly_cost=Decimal("0.5"),
            status=NodeStatus.READY,
            cloud="aws",
            region="us-east-1",
            requested_at=start,
            ready_at=start + timedelta(minutes=3),
            kv_cache_usage=0.25,
            requests_running=2,
        )
        NodeEvent.objects.create(
            node=node, created_at=start, kind=NodeEvent.Kind.ACTION, to_status="pending", message="requested (local)"
        )
        NodeLoadHour.objects.create(
            node=node,
            hour=now.replace(minute=0, second=0, microsecond=0) - timedelta(hours=1),
            samples=4,
            busy_samples=2,
        )
        for j in range(scale * 4):
            at = now - timedelta(minutes=37 * j + i)
            make_usage(
                tenant=tenant, model=model, created_at=at, cost_micros=1000 + j, status_code=200 if j % 5 else 502
            )
            cost += 1000 + j
    rollups_build_range(start=start, end=now, now=now)
    return {"cost": cost}


def _count_queries(now: datetime) -> int:
    cache.clear()  # the worst case: closed days not cached yet
    with CaptureQueriesContext(connection) as queries:
        dashboard_data(now=now)
    return len(queries)


def test_the_number_of_queries_does_not_grow_with_the_data():
    now = timezone.now()
    _populate(2, now)
    small = _count_queries(now)
    _populate(6, now)
    large = _count_queries(now)
    assert small == large
    # Rollups of the last 24 h (sums, histograms, tenant slugs) and of the closed days (sums), the
    # newest rolled hour and the closed days' cache key; per minute; node spans; load history;
    # fleet (2); cold starts; models.
    assert large <= 13
    with CaptureQueriesContext(connection) as warm:
        dashboard_data(now=now)
    assert len(warm) < large  # closed days from the cache


def test_a_closed_day_rebuilt_for_a_late_record_is_not_served_stale_from_the_cache():
    now = timezone.now()
    _populate(1, now)
    before = dashboard_data(now=now)["per_day"]["spend_micros"][-2]  # yesterday
    late_at = (now - timedelta(days=1)).replace(minute=30)
    make_usage(tenant=Tenant.objects.get(), model=ServedModel.objects.get(), created_at=late_at, cost_micros=5_000)
    rollups_build_range(start=late_at, end=late_at + timedelta(minutes=1), now=now)
    assert dashboard_data(now=now)["per_day"]["spend_micros"][-2] == before + 5_000


def test_numbers_add_up_to_the_raw_records():
    now = datetime.now(UTC).replace(hour=12, minute=30)
    facts = _populate(3, now)
    data = dashboard_data(now=now)

    end = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
    last_24h = UsageRecord.objects.filter(created_at__gte=end - timedelta(hours=24), created_at__lt=end)
    assert data["per_minute"]["totals"] == {
        "requests": last_24h.count(),
        "errors": last_24h.filter(status_code__gte=400).count(),
        "tokens": last_24h.count() * (12 + 30),
    }
    assert data["per_minute"]["totals"]["requests"] > 0
    assert len(data["per_minute"]["labels"]) == 24 * 60
    # Rollups only: everything up to the hour in progress (3 days, inside the 30).
    current_hour = now.replace(minute=0, second=0, microsecond=0)
    rolled = UsageRecord.objects.filter(created_at__lt=current_hour).aggregate(c=Sum("cost_micros"))["c"]
    assert sum(data["per_day"]["spend_micros"]) == rolled > 0
    assert rolled <= facts["cost"]
    assert data["rollups_until"] == current_hour.isoformat().replace("+00:00", "Z")
    assert len(data["per_day"]["labels"]) == 30
    assert sum(data["per_day"]["gpu_cost_micros"]) > 0
    assert data["fleet"]["live"] == 3 and data["fleet"]["cost_per_hour_micros"] == 1_500_000
    assert [r["model"] for r in data["cold_starts"]] == ["m3-0", "m3-1", "m3-2"]
    assert data["cold_starts"][0]["median_seconds"] == 180.0
    assert {r["model"] for r in data["top_models"]} == {"m3-0", "m3-1", "m3-2"}
    assert all(r["ttft_p50_ms"] is not None for r in data["top_models"])
    economics = {r["model"]: r for r in data["economics"]["rows"]}
    assert set(economics) == {"m3-0", "m3-1", "m3-2"}
    assert economics["m3-0"]["storage_month_micros"] == 15_000  # 1 GB at $0.015
    json.dumps(data)  # the JSON endpoint serialises exactly this


def test_every_tenant_spend_on_the_dashboard_equals_its_raw_records():
    now = timezone.now()
    _populate(2, now)
    data = dashboard_data(now=now)
    day_ago = now - timedelta(hours=24)
    for row in data["top_tenants"]:
        # Rollups cover whole hours: from the hour holding now - 24 h to the hour in progress.
        start = day_ago.replace(minute=0, second=0, microsecond=0)
        end = now.replace(minute=0, second=0, microsecond=0)
        expected = UsageRecord.objects.filter(
            tenant__slug=row["tenant"], created_at__gte=start, created_at__lt=end
        ).aggregate(s=Sum("cost_micros"))["s"]
        assert row["spend_micros"] == expected


def test_the_page_is_for_staff_only_and_names_its_charts(client):
    _populate(1, timezone.now())
    response = client.get("/admin/dashboard/")
    assert response.status_code == 302 and "/admin/login/" in response["Location"]
    assert client.get("/admin/dashboard/data.json").status_code == 302

    User.objects.create_user("viewer", password="pw-viewer-1234", is_staff=False)
    client.login(username="viewer", password="pw-viewer-1234")
    assert client.get("/admin/dashboard/").status_code == 302

    User.objects.create_user("ops", password="pw-ops-123456", is_staff=True)
    client.login(username="ops", password="pw-ops-123456")
    page = client.get("/admin/dashboard/")
    assert page.status_code == 200
    html = page.content.decode()
    for element in (*CHART_IDS, *TABLE_IDS, "dashboard-data", "cl-dashboard"):
        assert f'id="{element}"' in html
    assert "vendor/chartjs/chart.umd.min.js" in html and "cdn" not in html.lower()
    data = client.get("/admin/dashboard/data.json")
    assert data.status_code == 200 and data["Content-Type"] == "application/json"
    assert data.json()["fleet"]["live"] == 1


def test_the_admin_index_links_to_the_dashboard(admin_client):
    assert 'href="/admin/dashboard/"' in admin_client.get("/admin/").content.decode()


def test_per_minute_reads_only_unsettled_minutes_once_the_day_is_cached():
    from apps.metering.dashboard import PER_MINUTE_SETTLE, per_minute

    now = timezone.now()
    _populate(1, now)
    first = per_minute(now=now)["totals"]["requests"]
    tenant, model = Tenant.objects.get(), ServedModel.objects.get()
    # A record in a recent minute is counted at once; one that lands late for a settled minute is
    # counted when the cache expires (PER_MINUTE_CACHE_S): the documented trade-off.
    make_usage(tenant=tenant, model=model, created_at=now - timedelta(seconds=30))
    make_usage(tenant=tenant, model=model, created_at=now - PER_MINUTE_SETTLE - timedelta(minutes=10))
    with CaptureQueriesContext(connection) as queries:
        assert per_minute(now=now)["totals"]["requests"] == first + 1
    assert len(queries) == 1
    cache.clear()
    assert per_minute(now=now)["totals"]["requests"] == first + 2
