"""The periodic fleet work is scheduled in django-celery-beat's tables (editable in the admin)."""

from __future__ import annotations

import pytest
from django_celery_beat.models import PeriodicTask

from crosslogic.celery import app

pytestmark = pytest.mark.django_db


def test_health_every_15s_and_reconcile_every_60s_point_at_registered_tasks() -> None:
    app.loader.import_default_modules()
    tasks = {t.name: t for t in PeriodicTask.objects.filter(name__startswith="fleet: ").select_related("interval")}
    health, reconcile = tasks["fleet: health checks"], tasks["fleet: reconcile"]
    assert (health.interval.every, health.interval.period, health.enabled) == (15, "seconds", True)
    assert (reconcile.interval.every, reconcile.interval.period) == (60, "seconds")
    for task in (health, reconcile):
        assert task.task in app.tasks, task.task
        assert task.expire_seconds == task.interval.every  # a run that could not start in time is dropped


def test_the_autoscaler_runs_every_5s_and_points_at_a_registered_task() -> None:
    app.loader.import_default_modules()
    task = PeriodicTask.objects.select_related("interval").get(name="fleet: autoscale")
    assert (task.interval.every, task.interval.period, task.enabled) == (5, "seconds", True)
    assert task.task in app.tasks and task.expire_seconds == 5
