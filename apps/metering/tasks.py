"""Celery beat's metering passes (scheduled in django-celery-beat's tables, migration 0004):
the hourly rollup, raw-record retention and the Stripe meter events; and the budget alert
notification (one task per alert, claimed before it notifies). Each is thin (the work is in
apps.metering.rollups and apps.metering.billing), safe to run twice, and never overlaps itself.
"""

from __future__ import annotations

import logging
from datetime import timedelta

from celery import shared_task
from django.utils import timezone

from apps.core import redis as redis_lib
from apps.metering import billing, rollups, stripe_billing
from apps.metering.models import BudgetAlert
from apps.metering.notify import budget_alert_notify

log = logging.getLogger(__name__)

# How far back the hourly Stripe pass looks for rolled-up hours not sent yet (e.g. the beat was
# down for a day); older gaps are for `manage.py stripe_backfill`.
STRIPE_PLAN_LOOKBACK = timedelta(hours=48)


def _single_flight(name: str, ttl_s: int) -> bool:
    client = redis_lib.client()
    if client is None:
        return True
    try:
        return bool(client.set(f"crosslogic:metering:{name}", "1", nx=True, ex=ttl_s))
    except Exception:  # Redis down: the services are safe to run twice
        return True


def _release(name: str) -> None:
    client = redis_lib.client()
    if client is not None:
        try:
            client.delete(f"crosslogic:metering:{name}")
        except Exception:
            log.warning("could not release the metering %s lock; it expires by itself", name)


@shared_task(ignore_result=True)
def usage_rollups_hourly() -> None:
    if not _single_flight("rollups", 3000):
        return
    try:
        built = rollups.rollups_catch_up()
        log.info("rollups: %d hour(s) built, %d records", len(built), sum(b.records for b in built))
    finally:
        _release("rollups")


@shared_task(ignore_result=True)
def usage_records_prune() -> None:
    if not _single_flight("prune", 3000):
        return
    try:
        rollups.usage_records_prune()
    finally:
        _release("prune")


@shared_task(ignore_result=True)
def stripe_meter_events_hourly() -> None:
    if not stripe_billing.enabled() or not _single_flight("stripe", 3000):
        return
    try:
        now = timezone.now()
        billing.meter_events_plan(start=now - STRIPE_PLAN_LOOKBACK, end=now, now=now)
        result = billing.meter_events_send(now=now)
        log.info("stripe: %d meter events sent, %d failed", result.sent, result.failed)
    finally:
        _release("stripe")


@shared_task(ignore_result=True)
def budget_alert_notify_task(alert_id: int) -> None:
    # Claim first: a re-delivered task (acks_late) or a second worker does not notify twice.
    claimed = BudgetAlert.objects.filter(pk=alert_id, notified_at__isnull=True).update(notified_at=timezone.now())
    if claimed != 1:
        return
    budget_alert_notify(alert=BudgetAlert.objects.select_related("tenant", "api_key").get(pk=alert_id))
