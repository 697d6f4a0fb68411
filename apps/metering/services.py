"""Writes for usage: what a request costs, the usage records the gateway sends in batches, and
the alerts of dollar budgets.

The gateway decides when to write (it buffers off the request path, apps.gateway.usage); what
is written and how lives here.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable, Mapping
from datetime import datetime
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from django.db import transaction
from django.utils import timezone

from apps.metering.models import BudgetAlert, BudgetAlertLevel, UsageRecord
from apps.metering.selectors import month_bounds, month_key, month_spend

log = logging.getLogger(__name__)


def cost_micros(*, prompt_tokens: int, completion_tokens: int, price_in: Decimal, price_out: Decimal) -> int:
    """USD per 1M tokens times tokens = micro-dollars, exactly, rounded half-up once at the end."""
    total = Decimal(prompt_tokens) * price_in + Decimal(completion_tokens) * price_out
    return int(total.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def usage_records_create(*, rows: Iterable[Mapping[str, Any]]) -> None:
    """Insert one batch in one statement. ``ignore_conflicts`` on the unique request_id makes
    a retried batch that had in fact landed harmless."""
    UsageRecord.objects.bulk_create([UsageRecord(**row) for row in rows], ignore_conflicts=True)


def budget_alerts_raise(*, now: datetime | None = None) -> list[BudgetAlert]:
    """Raise this month's alerts for dollar budgets that crossed their soft threshold (the
    tenant's budget_alert_percent) or their limit: one BudgetAlert per owner, month and level
    (the unique constraint makes it once a month however often this runs), each new one logged
    and handed to a worker to notify the tenant. Returns the alerts raised now."""
    from apps.metering.enqueue import enqueue_budget_alert_notify
    from apps.tenancy.models import ApiKey, Tenant

    now = now or timezone.now()
    month = month_key(now)
    first_day = month_bounds(month)[0].date()
    tenants = list(Tenant.objects.filter(monthly_spend_limit_micros__isnull=False))
    keys = list(
        ApiKey.objects.filter(monthly_spend_limit_micros__isnull=False, revoked_at__isnull=True).select_related(
            "tenant"
        )
    )
    spend = month_spend(tenant_ids=[t.pk for t in tenants], key_ids=[k.pk for k in keys], month=month)
    budgets: list[tuple[str, Any, Any, int]] = [
        (f"tenant:{t.pk}", t, None, t.monthly_spend_limit_micros or 0) for t in tenants
    ] + [(f"key:{k.pk}", k.tenant, k, k.monthly_spend_limit_micros or 0) for k in keys]
    raised: list[BudgetAlert] = []
    for owner, tenant, key, limit in budgets:
        spent = spend.get(owner, 0)
        if spent <= 0:
            continue
        percent = tenant.budget_alert_percent
        levels = [BudgetAlertLevel.SOFT] if spent * 100 >= limit * percent else []
        if spent >= limit:
            levels.append(BudgetAlertLevel.HARD)
        for level in levels:
            with transaction.atomic():
                alert, created = BudgetAlert.objects.get_or_create(
                    owner=owner,
                    month=first_day,
                    level=level,
                    defaults={
                        "tenant": tenant,
                        "api_key": key,
                        "threshold_percent": percent if level == BudgetAlertLevel.SOFT else 100,
                        "spend_micros": spent,
                        "limit_micros": limit,
                    },
                )
                if created:
                    log.warning(
                        "budget alert: %s (%s) spent %d micro-US$ of %d in %s: %s",
                        owner,
                        tenant.slug,
                        spent,
                        limit,
                        month,
                        alert.get_level_display(),
                    )
                    enqueue_budget_alert_notify(alert_id=alert.pk)
                    raised.append(alert)
    return raised
