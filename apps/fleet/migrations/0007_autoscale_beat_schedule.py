"""The autoscaler's beat schedule (apps.fleet.periodic.fleet_autoscale), editable in the admin
(Periodic tasks) like the health checks and the reconciler (0003)."""

from django.conf import settings
from django.db import migrations
from django.utils import timezone

NAME = "fleet: autoscale"
TASK = "apps.fleet.periodic.fleet_autoscale"


def create(apps, schema_editor):
    IntervalSchedule = apps.get_model("django_celery_beat", "IntervalSchedule")
    PeriodicTask = apps.get_model("django_celery_beat", "PeriodicTask")
    every = settings.FLEET_AUTOSCALE_INTERVAL_S
    interval, _ = IntervalSchedule.objects.get_or_create(every=every, period="seconds")
    PeriodicTask.objects.get_or_create(
        name=NAME,
        defaults={
            "task": TASK,
            "interval": interval,
            "enabled": True,
            "expire_seconds": every,
            "description": "Created by apps.fleet; edit the interval here.",
        },
    )
    _schedule_changed(apps)


def remove(apps, schema_editor):
    PeriodicTask = apps.get_model("django_celery_beat", "PeriodicTask")
    PeriodicTask.objects.filter(name=NAME).delete()
    _schedule_changed(apps)


def _schedule_changed(apps):
    PeriodicTasks = apps.get_model("django_celery_beat", "PeriodicTasks")
    PeriodicTasks.objects.update_or_create(ident=1, defaults={"last_update": timezone.now()})


class Migration(migrations.Migration):
    dependencies = [
        ("fleet", "0006_warm_pool_model_scale"),
        ("django_celery_beat", "0019_alter_periodictasks_options"),
    ]

    operations = [migrations.RunPython(create, remove)]
