"""Reads over usage records, and the numbers on the admin index (fleet, catalog, tenants, usage)."""

from __future__ import annotations

from collections.abc import Iterable
from datetime import UTC, datetime, timedelta

from django.core.cache import cache
from django.db.models import (
    BigIntegerField,
    Count,
    DateTimeField,
    Exists,
    ExpressionWrapper,
    F,
    OuterRef,
    Q,
    QuerySet,
    Subquery,
    Sum,
)
from django.db.models.expressions import Combinable
from django.db.models.functions import Coalesce, TruncHour
from django.utils import timezone

from apps.catalog.models import ServedModel
from apps.fleet.models import NodeStatus
from apps.fleet.selectors import fleet_summary
from apps.metering.models import RollupCursor, UsageRecord, UsageRollup, UsageRollupHour
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


# --- month spend (budgets) -------------------------------------------------------------------


def month_bounds(month: str) -> tuple[datetime, datetime]:
    """[first instant, first instant of the next month) of "YYYY-MM", in UTC."""
    year, mon = (int(part) for part in month.split("-"))
    start = datetime(year, mon, 1, tzinfo=UTC)
    end = datetime(year + mon // 12, mon % 12 + 1, 1, tzinfo=UTC)
    return start, end


def month_key(now: datetime | None = None) -> str:
    return (now or timezone.now()).astimezone(UTC).strftime("%Y-%m")


# Month spend reads the hourly rollups for what they hold and raw records only for the rest, so its
# cost follows the hours of the month (rollup rows) and the records of the last hour or so, not the
# month's traffic. A raw record is "not in a rollup" unless its hour is built and the build read it
# (the hour's max_record_id is at least its id); only records that may be outside a rollup are even
# looked at: those above the rollup cursor or after the hour it covers (RollupCursor.covered_before).
# The sum is therefore exact for any state of the rollups: none built, some, a rebuild in between,
# pruned hours (their rollups stay; the raw records left are newer than the build and counted raw).


def _maybe_unrolled() -> Q:
    """The raw records that may be missing from the rollups: one small query for the cursor."""
    from apps.metering.rollups import CATCH_UP_CURSOR

    cursor = RollupCursor.objects.filter(name=CATCH_UP_CURSOR).values_list("last_record_id", "covered_before").first()
    if cursor is None or cursor[1] is None:
        return Q()  # no catch-up pass yet: every record may be outside a rollup (still exact, just slower)
    last_id, covered_before = cursor
    return Q(id__gt=last_id) | Q(created_at__gte=covered_before)


def _read_by_a_rollup() -> Exists:
    """For an outer UsageRecord: its hour is built and the build read it."""
    return Exists(
        UsageRollupHour.objects.filter(
            hour=TruncHour(ExpressionWrapper(OuterRef("created_at"), output_field=DateTimeField()), tzinfo=UTC),
            built_at__isnull=False,
            max_record_id__gte=OuterRef("pk"),
        )
    )


def _month_parts(month: str) -> tuple[QuerySet[UsageRollup], QuerySet[UsageRecord]]:
    """(the month's rollup rows, the month's raw records that are in no rollup yet)."""
    start, end = month_bounds(month)
    rolled = UsageRollup.objects.filter(hour__gte=start, hour__lt=end).order_by()
    raw = UsageRecord.objects.filter(_maybe_unrolled(), created_at__gte=start, created_at__lt=end).order_by()
    return rolled, raw.filter(~_read_by_a_rollup())


def owner_month_usage(*, owner: str, month: str, unit: str) -> int:
    """What ``owner`` ("tenant:<id>" or "key:<id>") used in ``month``: micro-dollars for unit
    "micros", tokens otherwise. Rollups plus the raw records not rolled up yet."""
    kind, _, ident = owner.partition(":")
    if kind not in ("tenant", "key") or not ident.isdigit():
        raise ValueError(f"Unknown budget owner {owner!r}.")
    owner_filter = {"tenant_id": int(ident)} if kind == "tenant" else {"api_key_id": int(ident)}
    value = Sum("cost_micros") if unit == "micros" else Sum(F("prompt_tokens") + F("completion_tokens"))
    rolled, raw = _month_parts(month)
    total = rolled.filter(**owner_filter).aggregate(v=Coalesce(value, 0))["v"]
    return int(total) + int(raw.filter(**owner_filter).aggregate(v=Coalesce(value, 0))["v"])


def month_spend(*, tenant_ids: Iterable[int] = (), key_ids: Iterable[int] = (), month: str) -> dict[str, int]:
    """Micro-dollars spent in ``month`` per owner ("tenant:<id>", "key:<id>"), for the owners asked
    about only: one grouped query over rollups per kind, and one over the raw records not rolled
    up, all owners at once (no owner filter: it could tempt the planner into walking an owner's
    whole month through the owner's index instead of the few recent rows through id and time)."""
    tenants, keys = set(tenant_ids), set(key_ids)
    spend: dict[str, int] = {}

    def add(owner: str, micros: int | None) -> None:
        spend[owner] = spend.get(owner, 0) + int(micros or 0)

    if not tenants and not keys:
        return spend
    rolled, raw = _month_parts(month)
    for kind, column, ids in (("tenant", "tenant_id", tenants), ("key", "api_key_id", keys)):
        if ids:
            for owner_id, total in (
                rolled.filter(**{f"{column}__in": ids}).values_list(column).annotate(s=Sum("cost_micros"))
            ):
                add(f"{kind}:{owner_id}", total)
    for tenant_id, key_id, total in raw.values_list("tenant_id", "api_key_id").annotate(s=Sum("cost_micros")):
        if tenant_id in tenants:
            add(f"tenant:{tenant_id}", total)
        if key_id in keys:
            add(f"key:{key_id}", total)
    return spend


def month_spend_subquery(*, owner_field: str) -> Combinable:
    """This month's micro-dollars of the outer row (a Tenant for owner_field "tenant", an ApiKey
    for "api_key"), as correlated subqueries (rollups + raw records not rolled up): computed only
    for the rows a page shows."""
    rolled, raw = _month_parts(month_key())
    parts = [
        Subquery(
            rows.filter(**{owner_field: OuterRef("pk")}).values(owner_field).annotate(s=Sum("cost_micros")).values("s")
        )
        for rows in (rolled, raw)
    ]
    return Coalesce(parts[0], 0, output_field=BigIntegerField()) + Coalesce(parts[1], 0, output_field=BigIntegerField())
