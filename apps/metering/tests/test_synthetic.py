"""bootstrap_demo --synthetic-usage-days: charts that are not empty on a fresh `make run`."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO
from itertools import pairwise

import pytest
from django.core.cache import cache
from django.core.management import call_command
from django.core.management.base import CommandError
from django.db.models import Sum

from apps.fleet.models import Node, NodeLoadHour, NodeStatus
from apps.metering.dashboard import dashboard_data
from apps.metering.models import UsageRecord, UsageRollup

pytestmark = pytest.mark.django_db
HOUR = timedelta(hours=1)


@pytest.fixture
def development(settings, monkeypatch):
    cache.clear()  # the dashboard caches closed days
    settings.DEBUG = True
    settings.FLEET_DEFAULT_LAUNCHER = "skypilot"  # no demo node launch in this test
    monkeypatch.setenv("DJANGO_SUPERUSER_USERNAME", "root")
    monkeypatch.setenv("DJANGO_SUPERUSER_PASSWORD", "s3cret-Passw0rd")


def _run(*args: str) -> str:
    out = StringIO()
    call_command("bootstrap_demo", *args, stdout=out, stderr=StringIO())
    return out.getvalue()


def test_a_quarter_day_of_synthetic_usage_fills_the_dashboard_and_is_idempotent(development):
    out = _run("--synthetic-usage-days", "0.25")
    assert "synthetic usage:" in out and "priced at $0.10 / $0.40" in out
    records = UsageRecord.objects.count()
    assert records > 6 * 60 * 0.15  # at least the night-time rate over 6 hours
    assert set(UsageRecord.objects.values_list("tenant__slug", flat=True)) <= {"demo", "demo-acme", "demo-globex"}
    history = Node.objects.get(cluster_name__startswith="synthetic-history-")
    assert history.status == NodeStatus.TERMINATED and history.hourly_cost > 0
    assert NodeLoadHour.objects.filter(node=history).count() >= 6

    # Every complete hour is rolled up, and the rollups add up to the raw records they cover.
    hours = sorted(set(UsageRollup.objects.values_list("hour", flat=True)))
    assert len(hours) >= 6 and all(b - a == HOUR for a, b in pairwise(hours))
    covered = UsageRecord.objects.filter(created_at__gte=hours[0], created_at__lt=hours[-1] + HOUR)
    rolled = UsageRollup.objects.aggregate(n=Sum("requests"), cost=Sum("cost_micros"))
    assert (rolled["n"], rolled["cost"]) == (covered.count(), covered.aggregate(c=Sum("cost_micros"))["c"])

    data = dashboard_data()
    assert data["per_minute"]["totals"]["requests"] == records
    rolled = UsageRecord.objects.filter(created_at__lt=hours[-1] + HOUR).aggregate(c=Sum("cost_micros"))["c"]
    assert sum(data["per_day"]["spend_micros"]) == rolled > 0  # rollups only: the hour in progress is not in
    assert sum(data["per_day"]["gpu_cost_micros"]) > 0
    assert data["top_models"] and data["top_models"][0]["ttft_p50_ms"] is not None
    assert data["economics"]["rows"][0]["gpu_hours"] > 0

    last = UsageRecord.objects.latest("created_at").created_at
    _run("--synthetic-usage-days", "0.25")
    # The same minutes give the same request ids: a re-run adds only minutes that were not there.
    assert UsageRecord.objects.filter(created_at__lte=last).count() == records
    assert Node.objects.filter(cluster_name__startswith="synthetic-history-").count() == 1


def test_synthetic_usage_is_refused_outside_development(development, settings):
    settings.DEBUG = False
    with pytest.raises(CommandError, match="development only"):
        _run("--synthetic-usage-days", "1")
    assert not UsageRecord.objects.exists()


def test_synthetic_usage_days_out_of_range_is_a_readable_error(development):
    with pytest.raises(CommandError, match="between 0 and 31"):
        _run("--synthetic-usage-days", "40")
