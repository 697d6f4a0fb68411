"""Reads over usage records, and the numbers on the admin index (fleet, catalog, tenants, usage)."""

from __future__ import annotations

from datetime import datetime, timedelta

from django.core.cache import cache
from django.db.models import Count, Q, QuerySet, Sum
from django.db.models.functions import Coalesce
from django.utils import timezone

from apps.catalog.models import ServedModel
from apps.fleet.models import NodeStatus
from apps.fleet.selectors import fleet_summary
from apps.metering.models import UsageRecord
from apps.tenancy.models import Tenant, TenantStatus


def usage_totals(*, since: datetime, until: datetime | None = None, tenant_id: int | None = None) -> dict[str, int]:
    """Requests and tokens in [since, until), one aggregate over the created_at index."""
    queryset = UsageRecord.objects.filter(created_at__gte=since)
    if until is not None:
        queryset = queryset.filter(created_at__lt=until)
    if tenant_id is not None:
        queryset = queryset.filter(tenant_id=tenant_id)
    return usage_queryset_totals(queryset)


def usage_queryset_totals(queryset: QuerySet[UsageRecord]) -> dict[str, int]:
    """Requests, tokens and cost (micro-dollars) of any usage queryset, in one aggregate query."""
    totals = queryset.order_by().aggregate(
        requests=Count("id"),
        prompt_tokens=Coalesce(Sum("prompt_tokens"), 0),
        completion_tokens=Coalesce(Sum("completion_tokens"), 0),
        cost_micros=Coalesce(Sum("cost_micros"), 0),
    )
    totals["tokens"] = totals["prompt_tokens"] + totals["completion_tokens"]
    return totals


def usage_last_24h() -> dict[str, int]:
    return usage_totals(since=timezone.now() - timedelta(hours=24))


def admin_summary() -> dict[str, object]:
    """A handful of aggregate queries; each uses an index or a small table."""
    nodes = fleet_summary()
    models = ServedModel.objects.aggregate(total=Count("id"), active=Count("id", filter=Q(is_active=True)))
    tenants = Tenant.objects.aggregate(
        active=Count("id", filter=Q(status=TenantStatus.ACTIVE)),
        suspended=Count("id", filter=Q(status=TenantStatus.SUSPENDED)),
    )
    return {
        "nodes": [
            {"status": status, "label": NodeStatus(status).label, "count": nodes.get(status, 0)}
            for status in NodeStatus.values
        ],
        "nodes_total": sum(nodes.values()),
        "models": models,
        "tenants": tenants,
        "usage_24h": _cached_usage_last_24h(),
    }


USAGE_CACHE_KEY = "crosslogic:admin:usage_24h"
USAGE_CACHE_SECONDS = 60


def _cached_usage_last_24h() -> dict[str, int]:
    # The only aggregate here that grows with traffic (a day of usage rows); a minute-old
    # figure is fine on a dashboard and keeps the index page fast when staff reload it.
    totals = cache.get(USAGE_CACHE_KEY)
    if totals is None:
        totals = usage_last_24h()
        cache.set(USAGE_CACHE_KEY, totals, USAGE_CACHE_SECONDS)
    return totals
