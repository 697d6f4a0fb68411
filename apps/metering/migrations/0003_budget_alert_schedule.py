"""Beat looks for crossed budget thresholds in django-celery-beat's tables, so staff can edit the
interval in the admin (Periodic tasks). Created once here; later edits in the admin are kept."""

from django.conf import settings
from django.db import migrations

NAME = "metering: budget alerts"


def create(apps, schema_editor):
    IntervalSchedule = apps.get_model("django_celery_beat", "IntervalSchedule")
    PeriodicTask = apps.get_model("django_celery_beat", "PeriodicTask")
    every = settings.BUDGET_ALERT_INTERVAL_S
    interval, _ = IntervalSchedule.objects.get_or_create(every=every, period="seconds")
    PeriodicTask.objects.get_or_create(
        name=NAME,
        defaults={
            "task": "apps.metering.periodic.budget_alerts_check",
            "interval": interval,
            "enabled": True,
            "expire_seconds": every,
            "description": "Created by apps.metering; edit the interval here.",
        },
    )


def remove(apps, schema_editor):
    apps.get_model("django_celery_beat", "PeriodicTask").objects.filter(name=NAME).delete()


class Migration(migrations.Migration):
    dependencies = [
        ("metering", "0002_budget_alerts"),
        ("django_celery_beat", "0019_alter_periodictasks_options"),
    ]

    operations = [migrations.RunPython(create, remove)]
