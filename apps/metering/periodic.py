"""Celery beat's metering passes (scheduled in django-celery-beat's tables, migration 0003)."""

from __future__ import annotations

import logging

from celery import shared_task

from apps.metering.notify import budget_webhooks_retry
from apps.metering.services import budget_alerts_raise

log = logging.getLogger(__name__)


@shared_task(ignore_result=True)
def budget_alerts_check() -> None:
    raised = budget_alerts_raise()
    if raised:
        log.info("budget alerts raised: %s", ", ".join(str(a) for a in raised))
    retried = budget_webhooks_retry()
    if retried:
        log.info("budget webhooks: %d retried", retried)
