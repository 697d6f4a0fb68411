"""Periodic fleet work lives in django-celery-beat's tables, so staff can edit the intervals in the
admin (Periodic tasks). Created once here; later edits in the admin are kept."""

from django.conf import settings
from django.db import migrations


def _schedules():
    # (name, task, every seconds); a run that could not start within one interval is dropped.
    return [
        ("fleet: health checks", "apps.fleet.tasks.fleet_health_check", settings.FLEET_HEALTH_INTERVAL_S),
        ("fleet: reconcile", "apps.fleet.tasks.fleet_reconcile", settings.FLEET_RECONCILE_INTERVAL_S),
    ]


def create(apps, schema_editor):
    IntervalSchedule = apps.get_model("django_celery_beat", "IntervalSchedule")
    PeriodicTask = apps.get_model("django_celery_beat", "PeriodicTask")
    for name, task, every in _schedules():
        interval, _ = IntervalSchedule.objects.get_or_create(every=every, period="seconds")
        PeriodicTask.objects.get_or_create(
            name=name,
            defaults={"task": task, "interval": interval, "enabled": True, "expire_seconds": every,
                      "description": "Created by apps.fleet; edit the interval here."},
        )


def remove(apps, schema_editor):
    PeriodicTask = apps.get_model("django_celery_beat", "PeriodicTask")
    PeriodicTask.objects.filter(name__in=[name for name, _, _ in _schedules()]).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("fleet", "0002_launch_profile"),
        ("django_celery_beat", "0019_alter_periodictasks_options"),
    ]

    operations = [migrations.RunPython(create, remove)]
