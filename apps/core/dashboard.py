"""The numbers on the admin index: fleet, catalog, tenants and the last day's usage."""

from __future__ import annotations

from django.db.models import Count, Q

from apps.catalog.models import Model
from apps.fleet.models import NodeStatus
from apps.fleet.selectors import fleet_summary
from apps.metering.selectors import usage_last_24h
from apps.tenancy.models import Tenant, TenantStatus


def admin_summary() -> dict[str, object]:
    """A handful of aggregate queries; each uses an index or a small table."""
    nodes = fleet_summary()
    models = Model.objects.aggregate(total=Count("id"), active=Count("id", filter=Q(is_active=True)))
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
        "usage_24h": usage_last_24h(),
    }
