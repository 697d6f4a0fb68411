"""GPU-cost economics: what the fleet cost, what it earned, per model and per UTC day.

Every amount is an integer number of micro-dollars (1 USD = 1,000,000), end to end; docs/economics.md
says where each number comes from. The rules, in short:

- **Billable time** of a node runs from its ``requested`` event to its transition to
  ``terminated`` (the NodeEvent log; the Node's own timestamps when an event is missing). A node
  still up is billed up to ``now``. A failed node is billed until its machine was torn down (its
  last event, once ``launcher_state.torn_down``), else up to ``now``: a failed launch may still
  hold a machine.
- **GPU cost** of a span is ``floor(hourly_micros x µs / 3.6e9)`` measured from the node's start,
  and the cost of a piece ``[a, b)`` is ``C(b) - C(a)``: the days of a node always add up to its
  total, never off by a rounding step.
- **Utilisation** comes from the health checks' load history (apps.fleet.load_history): each
  node-hour counts ``busy_samples / samples x 1 h`` of busy time, times the node's GPUs; capped by the
  GPU-hours billed that day. **Idle GPU-hours** are GPU-hours minus busy GPU-hours.
- **Storage** is the model's bytes at R2_STORAGE_PRICE_PER_GB_MONTH (GB = 10^9 bytes, a month = 30 days),
  accrued per day with the same telescoping rule.
"""

from __future__ import annotations

import re
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import UTC, date, datetime, time, timedelta
from decimal import ROUND_HALF_UP, Decimal

from django.conf import settings
from django.db.models import F, FloatField, Max, Min, Q, Sum
from django.db.models.functions import Cast, TruncDate

from apps.fleet.models import Node, NodeEvent, NodeLoadHour, NodeStatus

MICROS = 1_000_000
_US_PER_HOUR = 3_600_000_000
_ONE_US = timedelta(microseconds=1)
_STORAGE_DAYS_PER_MONTH = 30
_GPU_COUNT = re.compile(r":\s*(\d+)\s*$")


def usd_to_micros(amount: Decimal | int | str) -> int:
    """USD (a price with up to 6 decimals) to micro-dollars, rounded half-up at the 7th decimal."""
    return int((Decimal(amount) * MICROS).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def gpu_count(accelerator: str) -> int:
    """GPUs a node holds from SkyPilot's ``NAME:count`` ("A100:8" = 8, "L4" = 1). A node without
    an accelerator (the local simulator, a static CPU endpoint) counts as one."""
    match = _GPU_COUNT.search(accelerator or "")
    return max(1, int(match.group(1))) if match else 1


def _utc_midnight(day: date) -> datetime:
    return datetime.combine(day, time(0), tzinfo=UTC)


def days_between(since: datetime, until: datetime) -> list[date]:
    """UTC dates touched by [since, until)."""
    first, last = since.astimezone(UTC).date(), (until - _ONE_US).astimezone(UTC).date()
    return [first + timedelta(days=i) for i in range((last - first).days + 1)] if until > since else []


@dataclass(frozen=True)
class NodeSpan:
    """A node's billable interval; ``end`` is ``now`` for a node still billed."""

    node_id: int
    model_id: int
    accelerator: str
    hourly_micros: int
    start: datetime
    end: datetime
    running: bool

    @property
    def gpus(self) -> int:
        return gpu_count(self.accelerator)

    def cost_until(self, at: datetime) -> int:
        """Cumulative cost C(at) from the span's start, floored to a micro-dollar."""
        at = min(max(at, self.start), self.end)
        return self.hourly_micros * ((at - self.start) // _ONE_US) // _US_PER_HOUR

    def cost_between(self, a: datetime, b: datetime) -> int:
        return self.cost_until(b) - self.cost_until(a)

    def seconds_between(self, a: datetime, b: datetime) -> float:
        lo, hi = max(a, self.start), min(b, self.end)
        return max(0.0, (hi - lo).total_seconds())

    @property
    def total_cost(self) -> int:
        return self.cost_until(self.end)


def node_spans(*, since: datetime, until: datetime, now: datetime, model_id: int | None = None) -> list[NodeSpan]:
    """Billable spans of the nodes that overlap [since, until): one query (nodes joined to their events)."""
    queryset = Node.objects.filter(requested_at__lt=until).exclude(terminated_at__lt=since)
    if model_id is not None:
        queryset = queryset.filter(model_id=model_id)
    rows = queryset.annotate(
        requested_event=Min(
            "events__created_at",
            filter=Q(events__kind=NodeEvent.Kind.ACTION, events__message__startswith="requested"),
        ),
        terminated_event=Min(
            "events__created_at",
            filter=Q(events__kind=NodeEvent.Kind.TRANSITION, events__to_status=NodeStatus.TERMINATED),
        ),
        last_event=Max("events__created_at"),
    ).values_list(
        "id",
        "model_id",
        "accelerator",
        "hourly_cost",
        "status",
        "launcher_state",
        "requested_at",
        "terminated_at",
        "requested_event",
        "terminated_event",
        "last_event",
    )
    spans = []
    for node_id, mid, accel, hourly, status, state, requested_at, terminated_at, req_ev, term_ev, last_ev in rows:
        start = req_ev or requested_at
        end = term_ev or terminated_at
        if end is None and status == NodeStatus.FAILED and (state or {}).get("torn_down"):
            end = last_ev or start  # the teardown's own event is the node's last
        running = end is None
        end = min(end or now, now)
        if end <= since or start >= until:
            continue
        spans.append(NodeSpan(node_id, mid, accel, usd_to_micros(hourly), start, max(start, end), running))
    return spans


def storage_cost_between(total_bytes: int, first_day: date, last_day_exclusive: date) -> int:
    """Micro-dollars of R2 storage for whole UTC days, floored cumulatively from 1970-01-01."""
    rate = usd_to_micros(settings.R2_STORAGE_PRICE_PER_GB_MONTH)  # micro-dollars per GB-month
    denominator = 1_000_000_000 * _STORAGE_DAYS_PER_MONTH
    epoch = date(1970, 1, 1)

    def cumulative(day: date) -> int:
        return total_bytes * rate * (day - epoch).days // denominator

    return cumulative(last_day_exclusive) - cumulative(first_day)


def storage_cost_per_month(total_bytes: int) -> int:
    rate = usd_to_micros(settings.R2_STORAGE_PRICE_PER_GB_MONTH)
    return int((Decimal(total_bytes) * rate / 1_000_000_000).quantize(Decimal(1), rounding=ROUND_HALF_UP))


def per_million(cost_micros: int, tokens: int) -> int | None:
    """Micro-dollars per 1M tokens, rounded half-up; None when nothing was served."""
    if tokens <= 0:
        return None
    return int((Decimal(cost_micros) * MICROS / tokens).quantize(Decimal(1), rounding=ROUND_HALF_UP))


@dataclass
class ModelDay:
    """One model on one UTC day: the economics row."""

    model_id: int
    day: date
    revenue_micros: int = 0
    gpu_cost_micros: int = 0
    storage_cost_micros: int = 0
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    gpu_hours: float = 0.0
    busy_gpu_hours: float = 0.0
    nodes: set[int] = field(default_factory=set)

    @property
    def tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    @property
    def margin_micros(self) -> int:
        return self.revenue_micros - self.gpu_cost_micros - self.storage_cost_micros

    @property
    def gpu_cost_per_mtok_micros(self) -> int | None:
        return per_million(self.gpu_cost_micros, self.tokens)

    @property
    def utilisation(self) -> float | None:
        return None if self.gpu_hours <= 0 else min(1.0, self.busy_gpu_hours / self.gpu_hours)

    @property
    def idle_gpu_hours(self) -> float:
        return max(0.0, self.gpu_hours - min(self.busy_gpu_hours, self.gpu_hours))

    def add(self, other: ModelDay) -> None:
        for name in (
            "revenue_micros",
            "gpu_cost_micros",
            "storage_cost_micros",
            "requests",
            "prompt_tokens",
            "completion_tokens",
            "gpu_hours",
            "busy_gpu_hours",
        ):
            setattr(self, name, getattr(self, name) + getattr(other, name))
        self.nodes |= other.nodes

    def as_dict(self) -> dict[str, object]:
        utilisation = self.utilisation
        return {
            "model_id": self.model_id,
            "day": self.day.isoformat(),
            "revenue_micros": self.revenue_micros,
            "gpu_cost_micros": self.gpu_cost_micros,
            "storage_cost_micros": self.storage_cost_micros,
            "margin_micros": self.margin_micros,
            "requests": self.requests,
            "tokens": self.tokens,
            "gpu_cost_per_mtok_micros": self.gpu_cost_per_mtok_micros,
            "gpu_hours": round(self.gpu_hours, 3),
            "idle_gpu_hours": round(self.idle_gpu_hours, 3),
            "utilisation": None if utilisation is None else round(utilisation, 4),
            "nodes": len(self.nodes),
        }


@dataclass(frozen=True)
class UsageDay:
    """What customers used of one model on one UTC day (from rollups, or raw records in tests)."""

    model_id: int
    day: date
    requests: int
    prompt_tokens: int
    completion_tokens: int
    cost_micros: int


def gpu_by_model_day(spans: Iterable[NodeSpan], since: datetime, until: datetime) -> dict[tuple[int, date], ModelDay]:
    """Split each span at UTC midnights: cost (telescoping) and GPU-hours per model-day."""
    out: dict[tuple[int, date], ModelDay] = {}
    for span in spans:
        lo, hi = max(since, span.start), min(until, span.end)
        if hi <= lo:
            continue
        for day in days_between(lo, hi):
            a, b = max(lo, _utc_midnight(day)), min(hi, _utc_midnight(day + timedelta(days=1)))
            row = out.setdefault((span.model_id, day), ModelDay(span.model_id, day))
            row.gpu_cost_micros += span.cost_between(a, b)
            row.gpu_hours += span.seconds_between(a, b) * span.gpus / 3600
            row.nodes.add(span.node_id)
    return out


def busy_gpu_hours_by_model_day(*, since: datetime, until: datetime) -> dict[tuple[int, date], float]:
    """One grouped query over the node-hour load history: rows = models x accelerators x days."""
    rows = (
        NodeLoadHour.objects.filter(hour__gte=since, hour__lt=until, samples__gt=0)
        .annotate(day=TruncDate("hour", tzinfo=UTC))
        .values("node__model_id", "node__accelerator", "day")
        .annotate(busy_hours=Sum(Cast(F("busy_samples"), FloatField()) / Cast(F("samples"), FloatField())))
    )
    out: dict[tuple[int, date], float] = defaultdict(float)
    for row in rows:
        out[(row["node__model_id"], row["day"])] += (row["busy_hours"] or 0.0) * gpu_count(row["node__accelerator"])
    return out


def model_days(
    *,
    since: datetime,
    until: datetime,
    now: datetime,
    usage: Iterable[UsageDay],
    storage: dict[int, tuple[int, date]],
    spans: list[NodeSpan] | None = None,
    model_id: int | None = None,
) -> list[ModelDay]:
    """The economics rows for [since, until) (whole UTC days), sorted by day then model.

    ``storage`` maps a model id to (its bytes in R2, the first day they were stored)."""
    if spans is None:
        spans = node_spans(since=since, until=until, now=now, model_id=model_id)
    rows = gpu_by_model_day(spans, since, until)
    for key, busy in busy_gpu_hours_by_model_day(since=since, until=until).items():
        if key in rows and (model_id is None or key[0] == model_id):
            rows[key].busy_gpu_hours = busy
    for u in usage:
        if model_id is not None and u.model_id != model_id:
            continue
        row = rows.setdefault((u.model_id, u.day), ModelDay(u.model_id, u.day))
        row.revenue_micros += u.cost_micros
        row.requests += u.requests
        row.prompt_tokens += u.prompt_tokens
        row.completion_tokens += u.completion_tokens
    # Stored weights cost every day from the model's creation on, served or not.
    today = now.astimezone(UTC).date()
    for mid, (total_bytes, first_day) in storage.items():
        if total_bytes <= 0 or (model_id is not None and mid != model_id):
            continue
        for day in days_between(since, min(until, now)):
            if first_day <= day <= today:
                row = rows.setdefault((mid, day), ModelDay(mid, day))
                row.storage_cost_micros = storage_cost_between(total_bytes, day, day + timedelta(days=1))
    return sorted(rows.values(), key=lambda r: (r.day, r.model_id))


def totals_by_model(rows: Iterable[ModelDay]) -> dict[int, ModelDay]:
    """The same rows summed over days, per model (``day`` is the first day seen)."""
    out: dict[int, ModelDay] = {}
    for row in rows:
        total = out.setdefault(row.model_id, ModelDay(row.model_id, row.day))
        total.add(row)
    return out


def usage_days_from_records(*, since: datetime, until: datetime, model_id: int | None = None) -> list[UsageDay]:
    """Usage per model per UTC day straight from the raw records: one grouped query. The dashboard
    reads rollups instead; this serves ranges the rollups do not cover yet, and tests."""
    from django.db.models import Count

    from apps.metering.models import UsageRecord

    queryset = UsageRecord.objects.filter(created_at__gte=since, created_at__lt=until, model_id__isnull=False)
    if model_id is not None:
        queryset = queryset.filter(model_id=model_id)
    rows = (
        queryset.annotate(day=TruncDate("created_at", tzinfo=UTC))
        .values("model_id", "day")
        .annotate(
            requests=Count("id"),
            prompt=Sum("prompt_tokens"),
            completion=Sum("completion_tokens"),
            cost=Sum("cost_micros"),
        )
    )
    return [
        UsageDay(r["model_id"], r["day"], r["requests"], r["prompt"] or 0, r["completion"] or 0, r["cost"] or 0)
        for r in rows
    ]
