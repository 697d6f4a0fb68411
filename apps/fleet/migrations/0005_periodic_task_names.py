"""The beat passes moved from apps.fleet.tasks to apps.fleet.periodic (the reconciler enqueues node
tasks, so it cannot be run from the module that defines them). Point the schedules at the new
names; intervals staff edited in the admin are kept."""

from django.db import migrations
from django.utils import timezone

RENAMES = [
    ("apps.fleet.tasks.fleet_health_check", "apps.fleet.periodic.fleet_health_check"),
    ("apps.fleet.tasks.fleet_reconcile", "apps.fleet.periodic.fleet_reconcile"),
]


def forwards(apps, schema_editor):
    PeriodicTask = apps.get_model("django_celery_beat", "PeriodicTask")
    for old, new in RENAMES:
        PeriodicTask.objects.filter(task=old).update(task=new)
    _schedule_changed(apps)


def backwards(apps, schema_editor):
    PeriodicTask = apps.get_model("django_celery_beat", "PeriodicTask")
    for old, new in RENAMES:
        PeriodicTask.objects.filter(task=new).update(task=old)
    _schedule_changed(apps)


def _schedule_changed(apps):
    # A bulk update() skips PeriodicTask.save(), which is what tells a running beat to reload.
    PeriodicTasks = apps.get_model("django_celery_beat", "PeriodicTasks")
    PeriodicTasks.objects.update_or_create(ident=1, defaults={"last_update": timezone.now()})


class Migration(migrations.Migration):
    dependencies = [
        ("fleet", "0004_seal_static_node_keys"),
        ("django_celery_beat", "0019_alter_periodictasks_options"),
    ]

    operations = [migrations.RunPython(forwards, backwards)]
