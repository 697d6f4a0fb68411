"""Reads over usage records, and the numbers on the admin index (fleet, catalog, tenants, usage)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from django.core.cache import cache
from django.db.models import Count, F, OuterRef, Q, Subquery, Sum
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


# --- month spend (budgets) -------------------------------------------------------------------


def month_bounds(month: str) -> tuple[datetime, datetime]:
    """[first instant, first instant of the next month) of "YYYY-MM", in UTC."""
    year, mon = (int(part) for part in month.split("-"))
    start = datetime(year, mon, 1, tzinfo=UTC)
    end = datetime(year + mon // 12, mon % 12 + 1, 1, tzinfo=UTC)
    return start, end


def month_key(now: datetime | None = None) -> str:
    return (now or timezone.now()).astimezone(UTC).strftime("%Y-%m")


def owner_month_usage(*, owner: str, month: str, unit: str) -> int:
    """What ``owner`` ("tenant:<id>" or "key:<id>") used in ``month``: micro-dollars for unit
    "micros", tokens otherwise. One aggregate over the (tenant|api_key, created_at) index."""
    kind, _, ident = owner.partition(":")
    if kind not in ("tenant", "key") or not ident.isdigit():
        raise ValueError(f"Unknown budget owner {owner!r}.")
    start, end = month_bounds(month)
    queryset = UsageRecord.objects.filter(created_at__gte=start, created_at__lt=end)
    queryset = queryset.filter(tenant_id=int(ident)) if kind == "tenant" else queryset.filter(api_key_id=int(ident))
    if unit == "micros":
        return int(queryset.aggregate(v=Coalesce(Sum("cost_micros"), 0))["v"])
    return int(queryset.aggregate(v=Coalesce(Sum(F("prompt_tokens") + F("completion_tokens")), 0))["v"])


def month_spend(*, tenant_ids: Iterable[int] = (), key_ids: Iterable[int] = (), month: str) -> dict[str, int]:
    """Micro-dollars spent in ``month`` per owner ("tenant:<id>", "key:<id>"): one grouped query
    per kind, for the owners asked about only."""
    start, end = month_bounds(month)
    month_rows = UsageRecord.objects.filter(created_at__gte=start, created_at__lt=end).order_by()
    spend: dict[str, int] = {}
    tenants, keys = list(tenant_ids), list(key_ids)
    if tenants:
        for tenant_id, total in (
            month_rows.filter(tenant_id__in=tenants).values_list("tenant_id").annotate(s=Sum("cost_micros"))
        ):
            spend[f"tenant:{tenant_id}"] = int(total or 0)
    if keys:
        for key_id, total in (
            month_rows.filter(api_key_id__in=keys).values_list("api_key_id").annotate(s=Sum("cost_micros"))
        ):
            spend[f"key:{key_id}"] = int(total or 0)
    return spend


def month_spend_subquery(*, owner_field: str) -> Subquery:
    """This month's micro-dollars of the outer row (a Tenant for owner_field "tenant", an ApiKey
    for "api_key"), as a correlated subquery: computed only for the rows a page shows."""
    start, end = month_bounds(month_key())
    rows = UsageRecord.objects.filter(**{owner_field: OuterRef("pk")}, created_at__gte=start, created_at__lt=end)
    return Subquery(rows.order_by().values(owner_field).annotate(s=Sum("cost_micros")).values("s"))
