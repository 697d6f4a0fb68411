"""Telling a tenant that a dollar budget crossed its soft threshold or its limit: a webhook (if the
tenant has one) and an email to its contact address. Runs in a Celery task, never on the request
path; a failure is recorded on the alert and never affects requests."""

from __future__ import annotations

import logging
from typing import Any

from django.core.mail import send_mail

from apps.metering import webhooks
from apps.metering.models import BudgetAlert, BudgetAlertLevel

log = logging.getLogger(__name__)


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


def budget_alert_notify(*, alert: BudgetAlert) -> BudgetAlert:
    """Send the alert's webhook and email and record how each went (the caller claimed the row)."""
    tenant = alert.tenant
    updates: list[str] = []
    if tenant.budget_webhook_url:
        alert.webhook_result = webhooks.post_json(
            url=tenant.budget_webhook_url, payload=alert_payload(alert), event_id=f"budget_alert_{alert.pk}"
        )
        updates.append("webhook_result")
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
