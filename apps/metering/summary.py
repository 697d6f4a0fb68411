"""Usage aggregates for the usage API, the staff API and the dashboard: read from hourly rollups.

``usage_summary(tenant=..., start=..., end=..., group_by=...)`` returns one ``UsageRow`` per group
with the totals and the TTFT/latency p50/p95/p99 of the merged histogram buckets.

Where the numbers come from (docs/metering.md):
- The range is whole UTC hours: ``start`` is floored and ``end`` rounded up to the hour.
- Rolled-up hours are read from ``UsageRollup``: counters summed in SQL, histograms merged here.
- Hours after the newest rolled-up hour (the current hour, and the last one until the beat has
  built it; at most USAGE_LIVE_MAX_HOURS) are aggregated from raw records on the fly with the
  builder's own function, so a figure is fresh to the second and identical to what the rollup
  will hold once built. ``live=False`` reads rollups only.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.db.models import Max, Sum
from django.db.models.functions import TruncDay
from django.utils import timezone

from apps.metering import histograms
from apps.metering.models import UsageRollup, UsageRollupHour
from apps.metering.rollups import HOUR, Group, ceil_hour, floor_hour, records_aggregate
from apps.tenancy.models import Tenant

GROUP_BY_CHOICES = ("hour", "day", "tenant", "key", "model")
COUNTERS = (
    "requests",
    "errors_4xx",
    "errors_429",
    "errors_5xx",
    "cancelled",
    "prompt_tokens",
    "completion_tokens",
    "estimated_requests",
    "estimated_tokens",
    "cost_micros",
)
# The grouping dimension -> the UsageRollup column(s) it groups by.
_DIMENSION_COLUMNS = {
    "hour": "hour",
    "day": "day",
    "tenant": "tenant_id",
    "key": "api_key_prefix",
    "model": "model_name",
}

_ROW_ATTRIBUTE = {"key": "api_key_prefix", "model": "model_name", "tenant": "tenant_id"}


@dataclass
class UsageRow:
    """One group's totals. The dimensions not grouped by are None."""

    hour: datetime | None = None
    day: date | None = None
    tenant_id: int | None = None
    tenant: str | None = None  # slug
    api_key_prefix: str | None = None  # "" = a deleted key
    api_key_id: int | None = None
    model_name: str | None = None
    model_id: int | None = None
    requests: int = 0
    errors_4xx: int = 0
    errors_429: int = 0
    errors_5xx: int = 0
    cancelled: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    estimated_requests: int = 0
    estimated_tokens: int = 0
    cost_micros: int = 0
    ttft_hist: list[int] = field(default_factory=histograms.empty)
    latency_hist: list[int] = field(default_factory=histograms.empty)

    @property
    def errors(self) -> int:
        return self.errors_4xx + self.errors_429 + self.errors_5xx

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def as_dict(self, *, dimensions: Sequence[str] = GROUP_BY_CHOICES) -> dict[str, Any]:
        """JSON-ready: the grouped dimensions, the counters, and percentiles in ms."""
        out: dict[str, Any] = {}
        if "hour" in dimensions:
            out["hour"] = self.hour.isoformat().replace("+00:00", "Z") if self.hour else None
        if "day" in dimensions:
            out["day"] = self.day.isoformat() if self.day else None
        if "tenant" in dimensions:
            out["tenant"] = self.tenant
        if "key" in dimensions:
            out["api_key_prefix"] = self.api_key_prefix
        if "model" in dimensions:
            out["model"] = self.model_name
        out.update({name: getattr(self, name) for name in COUNTERS})
        out["errors"] = self.errors
        out["cost_usd"] = micros_to_usd(self.cost_micros)
        out["total_tokens"] = self.total_tokens
        out["ttft_ms"] = histograms.percentiles(self.ttft_hist)
        out["latency_ms"] = histograms.percentiles(self.latency_hist)
        return out


def micros_to_usd(micros: int) -> str:
    """Exact decimal dollars as a string ("1.234567"): no float ever touches money."""
    return str((Decimal(micros) / 1_000_000).quantize(Decimal("0.000001")))


def parse_group_by(group_by: str | Iterable[str] | None) -> tuple[str, ...]:
    """ "model,day" or ["model", "day"] -> ("model", "day"); ValueError names a bad dimension."""
    if group_by is None:
        return ()
    items = [part.strip() for part in group_by.split(",")] if isinstance(group_by, str) else list(group_by)
    dimensions = tuple(dict.fromkeys(item for item in items if item))
    unknown = [item for item in dimensions if item not in GROUP_BY_CHOICES]
    if unknown:
        named = ", ".join(repr(item[:40]) if len(item) > 40 else item for item in unknown[:3])
        raise ValueError(f"group_by: unknown {named} (choose from {', '.join(GROUP_BY_CHOICES)})")
    if "hour" in dimensions and "day" in dimensions:
        raise ValueError("group_by: hour and day together make no sense; choose one")
    return dimensions


def live_from(*, now: datetime | None = None) -> datetime:
    """The first hour read from raw records: after the newest rolled-up hour, and no earlier
    than USAGE_LIVE_MAX_HOURS before the current hour (a stopped beat must not turn every read
    into a scan of days of raw records)."""
    current = floor_hour(now or timezone.now())
    earliest = current - HOUR * settings.USAGE_LIVE_MAX_HOURS
    newest = UsageRollupHour.objects.filter(built_at__isnull=False, hour__lt=current).aggregate(newest=Max("hour"))
    if newest["newest"] is None:
        return earliest
    return min(current, max(earliest, newest["newest"] + HOUR))


def usage_summary(
    *,
    tenant: Tenant | int | None = None,
    start: datetime,
    end: datetime,
    group_by: str | Iterable[str] | None = (),
    live: bool = True,
    percentiles: bool = True,
    now: datetime | None = None,
) -> list[UsageRow]:
    """Usage in [start, end) (whole UTC hours), one row per group, ordered by the dimensions.

    ``tenant`` None = every tenant (staff). ``group_by`` is any of hour|day|tenant|key|model (a
    list or a comma-separated string); empty = one row of totals (always returned, zeros included).
    ``percentiles=False`` skips reading histograms (counters only: one SQL aggregate).
    """
    dimensions = parse_group_by(group_by)
    start, end = floor_hour(start), ceil_hour(end)
    if end <= start:
        raise ValueError("end must be after start")
    tenant_id = tenant.pk if isinstance(tenant, Tenant) else tenant
    split = live_from(now=now) if live else end
    rows: dict[tuple, UsageRow] = {}

    rolled_end = min(end, max(start, split))
    if start < rolled_end:
        queryset = UsageRollup.objects.filter(hour__gte=start, hour__lt=rolled_end)
        if tenant_id is not None:
            queryset = queryset.filter(tenant_id=tenant_id)
        queryset = queryset.annotate(day=TruncDay("hour", tzinfo=UTC)).order_by()
        columns = [_DIMENSION_COLUMNS[d] for d in dimensions]
        sums = queryset.values(*columns).annotate(
            **{f"sum_{name}": Sum(name) for name in COUNTERS},
            max_key_id=Max("api_key_id"),
            max_model_id=Max("model_id"),
        )
        for item in sums:
            row = _row(rows, dimensions, item)
            for name in COUNTERS:
                setattr(row, name, getattr(row, name) + (item[f"sum_{name}"] or 0))
            row.api_key_id = row.api_key_id or item["max_key_id"]
            row.model_id = row.model_id or item["max_model_id"]
        if percentiles:
            for item in queryset.values(*columns, "ttft_hist", "latency_hist").iterator(chunk_size=2000):
                row = _row(rows, dimensions, item)
                histograms.merge(row.ttft_hist, item["ttft_hist"])
                histograms.merge(row.latency_hist, item["latency_hist"])

    live_start = max(start, split)
    if live_start < end:
        for group in records_aggregate(start=live_start, end=end, tenant_id=tenant_id):
            _add_group(_row(rows, dimensions, _group_keys(group)), group)

    if not dimensions and not rows:
        rows[()] = UsageRow()
    if "tenant" in dimensions:
        _name_tenants(rows.values())
    return [rows[key] for key in sorted(rows, key=_sort_key)]


def _group_keys(group: Group) -> dict[str, Any]:
    return {
        "hour": group.hour,
        "day": group.hour.replace(hour=0),
        "tenant_id": group.tenant_id,
        "api_key_prefix": group.api_key_prefix,
        "model_name": group.model_name,
    }


def _row(rows: dict[tuple, UsageRow], dimensions: tuple[str, ...], item: dict[str, Any]) -> UsageRow:
    values = []
    for dimension in dimensions:
        value = item[_DIMENSION_COLUMNS[dimension]]
        if dimension in ("hour", "day"):
            value = value.astimezone(UTC)
            value = value.date() if dimension == "day" else value
        values.append(value)
    key = tuple(values)
    row = rows.get(key)
    if row is None:
        row = rows[key] = UsageRow()
        for dimension, value in zip(dimensions, values, strict=True):
            setattr(row, _ROW_ATTRIBUTE.get(dimension, dimension), value)
    return row


def _add_group(row: UsageRow, group: Group) -> None:
    for name in COUNTERS:
        setattr(row, name, getattr(row, name) + getattr(group, name))
    row.api_key_id = row.api_key_id or group.api_key_id
    row.model_id = row.model_id or group.model_id
    histograms.merge(row.ttft_hist, group.ttft_hist)
    histograms.merge(row.latency_hist, group.latency_hist)


def _name_tenants(rows: Iterable[UsageRow]) -> None:
    rows = list(rows)
    slugs = dict(Tenant.objects.filter(id__in={row.tenant_id for row in rows}).values_list("id", "slug"))
    for row in rows:
        row.tenant = slugs.get(row.tenant_id) if row.tenant_id is not None else None


def _sort_key(key: tuple) -> tuple:
    return tuple((value is None, value if value is not None else 0) for value in key)


def usage_totals_row(rows: Iterable[UsageRow]) -> UsageRow:
    """All rows added up (their histograms merged): the footer of a grouped table."""
    total = UsageRow()
    for row in rows:
        for name in COUNTERS:
            setattr(total, name, getattr(total, name) + getattr(row, name))
        histograms.merge(total.ttft_hist, row.ttft_hist)
        histograms.merge(total.latency_hist, row.latency_hist)
    return total


def default_range(*, days: int = 30, now: datetime | None = None) -> tuple[datetime, datetime]:
    """The last ``days`` days up to the end of the current hour."""
    end = floor_hour(now or timezone.now()) + HOUR
    return end - timedelta(days=days), end
