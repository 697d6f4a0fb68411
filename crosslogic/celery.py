"""The Celery app. Tasks live in each app's tasks.py (and the fleet's beat passes in
apps/fleet/periodic.py) and are found by autodiscovery."""

from __future__ import annotations

import os

from celery import Celery
from celery.signals import beat_init, before_task_publish, worker_init

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "crosslogic.settings")

app = Celery("crosslogic")
app.config_from_object("django.conf:settings", namespace="CELERY")
app.autodiscover_tasks()
# periodic.py: beat passes that enqueue an app's tasks, which tasks.py cannot import back.
app.autodiscover_tasks(related_name="periodic")


@worker_init.connect
@beat_init.connect
@before_task_publish.connect
def _make_broker_folders(**_: object) -> None:
    # kombu's filesystem transport (development without Redis) does not create its folders, and
    # the web process, the worker and beat may each be the first to touch them.
    from django.conf import settings

    for key in ("data_folder_in", "data_folder_out", "processed_folder", "control_folder"):
        folder = settings.CELERY_BROKER_TRANSPORT_OPTIONS.get(key)
        if folder:
            os.makedirs(folder, exist_ok=True)
