"""Telling a tenant that a dollar budget crossed its soft threshold or its limit: a signed webhook
(if the tenant has one; apps.metering.webhooks) and an email to its contact address. Runs in a
Celery task, never on the request path; a failure is recorded on the alert and never affects
requests; a failed webhook is retried with backoff from beat's budget pass."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta
from typing import Any

from django.core.mail import send_mail
from django.utils import timezone

from apps.metering import webhooks
from apps.metering.models import BudgetAlert, BudgetAlertLevel

log = logging.getLogger(__name__)

# A failed webhook (no answer, or not a 2xx) is tried again after these waits, then given up: five
# attempts over about 2.5 hours, so a receiver down for a deploy or a short outage still gets it.
WEBHOOK_RETRY_DELAYS = (timedelta(minutes=1), timedelta(minutes=5), timedelta(minutes=30), timedelta(hours=2))
WEBHOOK_MAX_ATTEMPTS = len(WEBHOOK_RETRY_DELAYS) + 1


def dollars(micros: int) -> str:
    return f"${micros / 1_000_000:,.2f}"


def alert_payload(alert: BudgetAlert) -> dict[str, Any]:
    return {
        "type": "budget.limit_reached" if alert.level == BudgetAlertLevel.HARD else "budget.threshold_reached",
        "id": f"budget_alert_{alert.pk}",
        "tenant": alert.tenant.slug,
        "api_key": alert.api_key.prefix if alert.api_key else None,
        "month": alert.month.strftime("%Y-%m"),
        "threshold_percent": alert.threshold_percent,
        # Exact decimal strings from integer micro-dollars: no float rounding in a money field.
        "spend_usd": f"{alert.spend_micros // 1_000_000}.{alert.spend_micros % 1_000_000:06d}",
        "limit_usd": f"{alert.limit_micros // 1_000_000}.{alert.limit_micros % 1_000_000:06d}",
        "created_at": alert.created_at.isoformat(),
    }


def _message(alert: BudgetAlert) -> tuple[str, str]:
    whose = f"API key {alert.api_key.prefix}…" if alert.api_key else f"account {alert.tenant.slug}"
    month = alert.month.strftime("%B %Y")
    if alert.level == BudgetAlertLevel.HARD:
        subject = f"CrossLogic: spend limit reached for {whose}"
        body = (
            f"The monthly spend limit of {dollars(alert.limit_micros)} for {whose} is reached "
            f"({dollars(alert.spend_micros)} spent in {month}). Requests are refused with HTTP 429 "
            "insufficient_quota until the limit is raised or the month ends."
        )
    else:
        subject = f"CrossLogic: {alert.threshold_percent}% of the spend limit used for {whose}"
        body = (
            f"{whose} has spent {dollars(alert.spend_micros)} in {month}, {alert.threshold_percent}% or more "
            f"of its monthly limit of {dollars(alert.limit_micros)}. Requests are refused once the limit is reached."
        )
    return subject, body


def budget_alert_notify(*, alert: BudgetAlert, now: datetime | None = None) -> BudgetAlert:
    """Send the alert's email and the webhook's first attempt and record how each went (the
    caller claimed the row). A failed webhook is tried again by ``budget_webhooks_retry``."""
    tenant = alert.tenant
    updates: list[str] = []
    if tenant.budget_webhook_url:
        _webhook_attempt(alert, now=now or timezone.now())
        updates += ["webhook_result", "webhook_attempts", "webhook_next_attempt_at"]
    if tenant.contact_email:
        subject, body = _message(alert)
        try:
            send_mail(subject, body, None, [tenant.contact_email], fail_silently=False)
            alert.email_result = "sent"
        except Exception as exc:  # SMTP away or refusing: recorded, never raised to the worker loop
            alert.email_result = f"failed: {type(exc).__name__}"[:200]
        updates.append("email_result")
    if updates:
        alert.save(update_fields=updates)
    log.info("budget alert %s: webhook %s, email %s", alert, alert.webhook_result or "-", alert.email_result or "-")
    return alert


def _webhook_attempt(alert: BudgetAlert, *, now: datetime) -> None:
    """One signed delivery; sets the alert's result, attempts and next attempt (not saved)."""
    from apps.tenancy.services import tenant_webhook_secret

    tenant = alert.tenant
    delivery = webhooks.post_json(
        url=tenant.budget_webhook_url,
        payload=alert_payload(alert),
        event_id=f"budget_alert_{alert.pk}",
        secret=tenant_webhook_secret(tenant=tenant),
        now=now.timestamp(),
    )
    alert.webhook_attempts += 1
    retry = not delivery.ok and alert.webhook_attempts < WEBHOOK_MAX_ATTEMPTS
    alert.webhook_next_attempt_at = now + WEBHOOK_RETRY_DELAYS[alert.webhook_attempts - 1] if retry else None
    if delivery.ok:
        alert.webhook_result = (
            delivery.result
            if alert.webhook_attempts == 1
            else (f"{delivery.result} (attempt {alert.webhook_attempts})")
        )
    else:
        outcome = "will retry" if retry else "gave up"
        alert.webhook_result = (
            f"{delivery.result} (attempt {alert.webhook_attempts} of {WEBHOOK_MAX_ATTEMPTS}, {outcome})"
        )
        log.warning(
            "budget alert %s: webhook to %s %s",
            alert,
            webhooks.url_for_log(tenant.budget_webhook_url),
            alert.webhook_result,
        )
    alert.webhook_result = alert.webhook_result[:200]


def budget_webhooks_retry(*, now: datetime | None = None, limit: int = 50) -> int:
    """Try again the failed webhooks whose next attempt is due (beat's budget pass calls this
    every BUDGET_ALERT_INTERVAL_S); returns how many were tried. Each alert is claimed first
    (its next attempt cleared where it still holds the attempt count read), so two passes at once
    never deliver the same attempt twice."""
    now = now or timezone.now()
    due = list(
        BudgetAlert.objects.filter(webhook_next_attempt_at__lte=now)
        .order_by("webhook_next_attempt_at")
        .values_list("pk", "webhook_attempts")[:limit]
    )
    tried = 0
    for pk, attempts in due:
        claimed = BudgetAlert.objects.filter(pk=pk, webhook_attempts=attempts, webhook_next_attempt_at__lte=now).update(
            webhook_next_attempt_at=None
        )
        if claimed != 1:
            continue
        alert = BudgetAlert.objects.select_related("tenant", "api_key").get(pk=pk)
        if not alert.tenant.budget_webhook_url:  # removed since: nothing to deliver to
            alert.webhook_result = f"{alert.webhook_result[:150]}; URL removed, not retried"
            alert.save(update_fields=["webhook_result"])
            continue
        _webhook_attempt(alert, now=now)
        alert.save(update_fields=["webhook_result", "webhook_attempts", "webhook_next_attempt_at"])
        tried += 1
    return tried
