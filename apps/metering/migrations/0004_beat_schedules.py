"""Periodic metering work lives in django-celery-beat's tables, so staff can change the times in
the admin (Periodic tasks). Created once here; later edits in the admin are kept.

Crontab, not an interval: the rollup runs a few minutes after each hour has ended, Stripe after
the rollup, retention away from both."""

from django.db import migrations


def _schedules():
    # (name, task, minute of every hour, UTC)
    return [
        ("metering: hourly rollups", "apps.metering.tasks.usage_rollups_hourly", "5"),
        ("metering: Stripe meter events", "apps.metering.tasks.stripe_meter_events_hourly", "15"),
        ("metering: raw usage retention", "apps.metering.tasks.usage_records_prune", "35"),
    ]


def create(apps, schema_editor):
    CrontabSchedule = apps.get_model("django_celery_beat", "CrontabSchedule")
    PeriodicTask = apps.get_model("django_celery_beat", "PeriodicTask")
    for name, task, minute in _schedules():
        crontab, _ = CrontabSchedule.objects.get_or_create(
            minute=minute, hour="*", day_of_week="*", day_of_month="*", month_of_year="*", timezone="UTC"
        )
        PeriodicTask.objects.get_or_create(
            name=name,
            defaults={"task": task, "crontab": crontab, "enabled": True, "expire_seconds": 3000,
                      "description": "Created by apps.metering; edit the time here."},
        )


def remove(apps, schema_editor):
    PeriodicTask = apps.get_model("django_celery_beat", "PeriodicTask")
    PeriodicTask.objects.filter(name__in=[name for name, _, _ in _schedules()]).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("metering", "0003_stripe_meter_events"),
        ("django_celery_beat", "0019_alter_periodictasks_options"),
    ]

    operations = [migrations.RunPython(create, remove)]
