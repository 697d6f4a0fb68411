"""Stripe Billing Meter events from the hourly rollups: what to send, and the record of what was sent.

Two steps, both safe to run again (docs/metering.md, "Stripe"):

1. ``meter_events_plan(start=, end=)``: for every rolled-up hour in the range and every tenant with
   a Stripe customer, each meter's total for the tenant-hour (from UsageRollup) minus what rows
   already carry for it. A difference above zero becomes a new ``StripeMeterEvent`` row, frozen
   with its value and a deterministic identifier (``cl-<tenant id>-<YYYYMMDDHH>-<meter>``, then
   ``-r1``, ``-r2``... for late records). Nothing is sent yet.
2. ``meter_events_send()``: every pending row, and every failed row whose backoff has passed, is
   sent through apps.metering.stripe_billing; a success marks it sent, a failure records the error
   and schedules the resend.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from django.conf import settings
from django.db import IntegrityError, transaction
from django.db.models import Sum
from django.utils import timezone

from apps.metering import stripe_billing
from apps.metering.models import (
    MeterEventStatus,
    StripeCustomer,
    StripeMeterEvent,
    UsageRollup,
    UsageRollupHour,
)
from apps.metering.rollups import ceil_hour, floor_hour

log = logging.getLogger(__name__)

# Stripe refuses meter events with a timestamp more than 35 days old; keep a margin.
STRIPE_MAX_AGE = timedelta(days=35) - timedelta(hours=1)
_RETRY_FIRST = timedelta(minutes=5)
_RETRY_MAX = timedelta(hours=6)


def meters() -> dict[str, str]:
    """Our meter -> the Stripe meter's event_name, for the meters configured (non-empty names)."""
    configured = {
        "prompt_tokens": settings.STRIPE_METER_PROMPT_TOKENS,
        "completion_tokens": settings.STRIPE_METER_COMPLETION_TOKENS,
        "cost_micros": settings.STRIPE_METER_COST_MICROS,
    }
    return {meter: name for meter, name in configured.items() if name}


def identifier_for(*, tenant_id: int, hour: datetime, meter: str, revision: int) -> str:
    base = f"cl-{tenant_id}-{hour:%Y%m%d%H}-{meter}"
    return base if revision == 0 else f"{base}-r{revision}"


@dataclass
class PlanResult:
    created: list[StripeMeterEvent] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)


def meter_events_plan(*, start: datetime, end: datetime, now: datetime | None = None) -> PlanResult:
    """Create the rows for what rolled-up hours in [start, end) have not yet sent (see the module)."""
    now = now or timezone.now()
    start, end = floor_hour(max(start, now - STRIPE_MAX_AGE)), ceil_hour(end)
    result = PlanResult()
    names = meters()
    customers = dict(StripeCustomer.objects.values_list("tenant_id", "customer_id"))
    if not names or not customers or start >= end:
        return result
    built = UsageRollupHour.objects.filter(hour__gte=start, hour__lt=end, built_at__isnull=False)
    totals = (
        UsageRollup.objects.filter(hour__in=built.values("hour"), tenant_id__in=customers)
        .order_by()
        .values("tenant_id", "hour")
        .annotate(**{meter: Sum(meter) for meter in names})
    )
    accounted: dict[tuple[int, datetime, str], tuple[int, int]] = {}
    for tenant_id, hour, meter, value, revision in StripeMeterEvent.objects.filter(
        hour__gte=start, hour__lt=end
    ).values_list("tenant_id", "hour", "meter", "value", "revision"):
        sent, last = accounted.get((tenant_id, hour, meter), (0, -1))
        accounted[(tenant_id, hour, meter)] = (sent + value, max(last, revision))
    rows: list[dict[str, Any]] = list(totals)  # type: ignore[arg-type]  # annotated meter columns
    for row in rows:
        for meter, event_name in names.items():
            total = int(row[meter] or 0)
            sent, last = accounted.get((row["tenant_id"], row["hour"], meter), (0, -1))
            if total == sent:
                continue
            if total < sent:
                # Meter events only add; a smaller rebuild (records deleted by hand) needs a
                # Stripe meter event adjustment, which staff make in Stripe's dashboard.
                where = f"tenant {row['tenant_id']} {row['hour']:%Y-%m-%d %H}:00 {meter}"
                result.skipped.append(f"{where}: {total} < sent {sent}")
                log.warning("stripe: %s; not sent", result.skipped[-1])
                continue
            revision = last + 1
            event = StripeMeterEvent(
                tenant_id=row["tenant_id"],
                hour=row["hour"],
                meter=meter,
                revision=revision,
                event_name=event_name,
                customer_id=customers[row["tenant_id"]],
                value=total - sent,
                identifier=identifier_for(tenant_id=row["tenant_id"], hour=row["hour"], meter=meter, revision=revision),
                next_attempt_at=now,
            )
            try:
                with transaction.atomic():
                    event.save(force_insert=True)
            except IntegrityError:
                continue  # a concurrent plan created it: theirs stands
            result.created.append(event)
    return result


@dataclass
class SendResult:
    sent: int = 0
    failed: int = 0
    errors: list[str] = field(default_factory=list)


def meter_events_send(*, now: datetime | None = None, limit: int = 5000) -> SendResult:
    """Send the due rows, oldest hour first. Stops at an authentication failure (every other
    request would fail the same way); any other failure is recorded on its row and retried."""
    now = now or timezone.now()
    result = SendResult()
    if not stripe_billing.enabled():
        return result
    due = StripeMeterEvent.objects.filter(
        status__in=[MeterEventStatus.PENDING, MeterEventStatus.FAILED],
        next_attempt_at__lte=now,
        hour__gte=now - STRIPE_MAX_AGE,
    ).order_by("hour", "tenant_id", "meter", "revision")
    for event_id in list(due.values_list("id", flat=True)[:limit]):
        event = StripeMeterEvent.objects.get(id=event_id)
        try:
            stripe_billing.meter_event_create(
                event_name=event.event_name,
                customer_id=event.customer_id,
                value=event.value,
                identifier=event.identifier,
                timestamp=int(event.hour.timestamp()),
            )
        except stripe_billing.StripeSendError as exc:
            attempts = event.attempts + 1
            wait = _RETRY_MAX if not exc.retry else min(_RETRY_MAX, _RETRY_FIRST * 2 ** (attempts - 1))
            StripeMeterEvent.objects.filter(id=event.id).update(
                status=MeterEventStatus.FAILED, attempts=attempts, last_error=str(exc), next_attempt_at=now + wait
            )
            result.failed += 1
            result.errors.append(f"{event.identifier}: {exc}")
            if exc.status == 401:
                break
            continue
        StripeMeterEvent.objects.filter(id=event.id).update(
            status=MeterEventStatus.SENT, attempts=event.attempts + 1, last_error="", sent_at=timezone.now()
        )
        result.sent += 1
    if result.failed:
        log.warning("stripe: %d meter events failed (will be resent): %s", result.failed, "; ".join(result.errors[:5]))
    return result
