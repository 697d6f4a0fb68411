"""The numbers on the admin index: fleet, catalog, tenants and the last day's usage."""

from __future__ import annotations

from django.core.cache import cache
from django.db.models import Count, Q

from apps.catalog.models import ServedModel
from apps.fleet.models import NodeStatus
from apps.fleet.selectors import fleet_summary
from apps.metering.selectors import usage_last_24h
from apps.tenancy.models import Tenant, TenantStatus


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
