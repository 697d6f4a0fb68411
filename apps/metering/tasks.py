"""Budget alerts: beat looks for crossed thresholds; a task per alert notifies the tenant."""

from __future__ import annotations

from celery import shared_task
from django.utils import timezone

from apps.metering.models import BudgetAlert
from apps.metering.notify import budget_alert_notify


@shared_task(ignore_result=True)
def budget_alert_notify_task(alert_id: int) -> None:
    # Claim first: a re-delivered task (acks_late) or a second worker does not notify twice.
    claimed = BudgetAlert.objects.filter(pk=alert_id, notified_at__isnull=True).update(notified_at=timezone.now())
    if claimed != 1:
        return
    budget_alert_notify(alert=BudgetAlert.objects.select_related("tenant", "api_key").get(pk=alert_id))
