"""Reads over usage records."""

from __future__ import annotations

from datetime import datetime, timedelta

from django.db.models import Count, Sum
from django.db.models.functions import Coalesce
from django.utils import timezone

from apps.metering.models import UsageRecord


def usage_totals(*, since: datetime, until: datetime | None = None, tenant_id: int | None = None) -> dict[str, int]:
    """Requests and tokens in [since, until), one aggregate over the created_at index."""
    queryset = UsageRecord.objects.filter(created_at__gte=since)
    if until is not None:
        queryset = queryset.filter(created_at__lt=until)
    if tenant_id is not None:
        queryset = queryset.filter(tenant_id=tenant_id)
    totals = queryset.aggregate(
        requests=Count("id"),
        prompt_tokens=Coalesce(Sum("prompt_tokens"), 0),
        completion_tokens=Coalesce(Sum("completion_tokens"), 0),
        cost_micros=Coalesce(Sum("cost_micros"), 0),
    )
    totals["tokens"] = totals["prompt_tokens"] + totals["completion_tokens"]
    return totals


def usage_last_24h() -> dict[str, int]:
    return usage_totals(since=timezone.now() - timedelta(hours=24))
