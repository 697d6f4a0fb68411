"""The one place metering work is queued, once the caller's transaction commits."""

from __future__ import annotations

from django.db import transaction

from apps.metering.tasks import budget_alert_notify_task


def enqueue_budget_alert_notify(*, alert_id: int) -> None:
    transaction.on_commit(lambda: budget_alert_notify_task.delay(alert_id))
