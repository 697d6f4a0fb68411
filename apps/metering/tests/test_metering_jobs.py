"""The beat schedules, the thin tasks and the rebuild command."""

from __future__ import annotations

from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone
from django_celery_beat.models import PeriodicTask

from apps.metering import tasks
from apps.metering.models import UsageRecord, UsageRollup, UsageRollupHour
from apps.metering.rollups import floor_hour
from apps.metering.tests.factories import make_usage

pytestmark = pytest.mark.django_db


def test_the_migration_schedules_the_metering_passes_hourly() -> None:
    scheduled = {
        t.task: t.crontab.minute
        for t in PeriodicTask.objects.filter(name__startswith="metering:", crontab__isnull=False).select_related(
            "crontab"
        )
    }
    assert scheduled == {
        "apps.metering.tasks.usage_rollups_hourly": "5",
        "apps.metering.tasks.stripe_meter_events_hourly": "15",
        "apps.metering.tasks.usage_records_prune": "35",
    }


def test_the_hourly_task_rolls_up_the_last_complete_hours(tenant, settings) -> None:
    settings.USAGE_ROLLUP_LOOKBACK_HOURS = 3
    current = floor_hour(timezone.now())
    make_usage(tenant=tenant, created_at=current - timedelta(minutes=30))
    make_usage(tenant=tenant, created_at=current - timedelta(days=3))  # first pass: existing usage too

    tasks.usage_rollups_hourly()

    assert set(UsageRollupHour.objects.values_list("hour", flat=True)) == {
        current - timedelta(hours=3),
        current - timedelta(hours=2),
        current - timedelta(hours=1),
        floor_hour(current - timedelta(days=3)),
    }
    assert UsageRollup.objects.get(hour=current - timedelta(hours=1)).requests == 1


def test_the_retention_task_prunes_old_rolled_up_records(tenant, settings) -> None:
    settings.USAGE_RETENTION_DAYS = 2
    make_usage(tenant=tenant, created_at=timezone.now() - timedelta(days=5))
    recent = make_usage(tenant=tenant, created_at=timezone.now() - timedelta(days=1))

    tasks.usage_records_prune()

    assert list(UsageRecord.objects.values_list("pk", flat=True)) == [recent.pk]
    assert UsageRollup.objects.get().requests == 1  # rolled up before it was deleted


def test_rebuild_command_rebuilds_a_range_and_explains_bad_input(tenant) -> None:
    hour = floor_hour(timezone.now()) - timedelta(days=1)
    make_usage(tenant=tenant, created_at=hour + timedelta(minutes=5))
    out = StringIO()

    call_command(
        "rebuild_usage_rollups",
        "--start",
        hour.isoformat(),
        "--end",
        (hour + timedelta(hours=2)).isoformat(),
        stdout=out,
    )

    assert "2 hour(s) rebuilt from 1 records" in out.getvalue()
    assert UsageRollup.objects.get().hour == hour
    with pytest.raises(CommandError, match="end must be after start"):
        call_command("rebuild_usage_rollups", "--start", "2026-11-02", "--end", "2026-11-01")
    with pytest.raises(CommandError, match="start: 'soon' is not an ISO 8601 date"):
        call_command("rebuild_usage_rollups", "--start", "soon", "--end", "2026-11-01")
