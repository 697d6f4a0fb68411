"""The staff dashboard's numbers (/admin/dashboard/ and its JSON): one function, a fixed number of
queries whatever the data size (apps/metering/tests/test_dashboard.py counts them;
bench/dashboard_bench.py times them over 1M raw records and a year of rollups).

Where each number comes from (docs/economics.md has the details):

- **per minute, last 24 h** (requests, tokens, errors): the raw usage records, one aggregate grouped
  by minute over the ``created_at`` index; settled minutes are cached, so a refresh reads only the
  last few minutes. Rollups are hourly, too coarse for this chart; a per-minute counter table would
  add a write to the gateway's hot path for a chart staff look at now and then.
- **per day, last 30 days** (spend, GPU cost): spend from the hourly rollups (closed days cached),
  GPU cost from the nodes' billable spans (apps.metering.economics).
- **top tenants / models, TTFT and latency p50/p95**: rollups over the last 24 h; percentiles from
  the merged fixed-bucket histograms (an upper bound within one bucket, at most 26 % above).
- Everything but the per-minute charts reads rollups only: the hour in progress shows once the
  rollup job has built it (``rollups_until`` in the JSON).
- **fleet now**: the Node rows (status, accelerator, cloud/region, hourly cost, the last health
  check's KV-cache and queue) and cold-start medians over nodes that became ready in 30 days.
- **economics**: per model over the last 7 days (apps.metering.economics.model_days).
"""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import UTC, date, datetime, timedelta
from operator import add
from statistics import median
from typing import Any

from django.core.cache import cache
from django.db.models import Count, Max, Q, Sum
from django.db.models.functions import Coalesce, TruncMinute
from django.utils import timezone

from apps.catalog.models import ServedModel
from apps.fleet.models import LIVE_STATUSES, Node, NodeStatus
from apps.metering import economics, histograms
from apps.metering.models import UsageRecord, UsageRollupHour
from apps.metering.summary import COUNTERS, UsageRow, usage_summary

TOP_N = 10
FLEET_ROWS = 200  # nodes listed one by one; the counts above the table cover all of them
ECONOMICS_DAYS = 7
SPEND_DAYS = 30


def _iso(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat().replace("+00:00", "Z")


PER_MINUTE_KEY = "crosslogic:dashboard:per-minute"
PER_MINUTE_SETTLE = timedelta(minutes=5)  # younger minutes are always read again (records arrive in batches)
PER_MINUTE_CACHE_S = 3600  # the whole day is recounted at least this often (late records older than SETTLE)


def _minute_counts(start: datetime, end: datetime) -> dict[datetime, tuple[int, int, int]]:
    """(requests, tokens, errors) per minute in [start, end): one aggregate over the created_at index."""
    rows = (
        UsageRecord.objects.filter(created_at__gte=start, created_at__lt=end)
        .annotate(minute=TruncMinute("created_at", tzinfo=UTC))
        .order_by()
        .values("minute")
        .annotate(
            requests=Count("id"),
            errors=Count("id", filter=Q(status_code__gte=400) & ~Q(status_code=499)),
            tokens=Coalesce(Sum("prompt_tokens"), 0) + Coalesce(Sum("completion_tokens"), 0),
        )
    )
    return {r["minute"]: (r["requests"], r["tokens"], r["errors"]) for r in rows}


def per_minute(*, now: datetime) -> dict[str, Any]:
    """Requests, tokens and errors per minute over the last 24 h, zeros filled: one query.

    Minutes older than PER_MINUTE_SETTLE are kept in the cache, so a refresh reads only the
    minutes since the last settled one (a few thousand rows at 1M records a day) instead of the
    whole day; the cache lives PER_MINUTE_CACHE_S, after which the day is counted again."""
    end = now.replace(second=0, microsecond=0) + timedelta(minutes=1)
    start = end - timedelta(hours=24)
    settled = end - timedelta(minutes=1) - PER_MINUTE_SETTLE
    cached = cache.get(PER_MINUTE_KEY)
    if cached is not None and start <= cached["until"] <= end:
        counts = {m: v for m, v in cached["counts"].items() if m >= start}
        read_from = cached["until"]
    else:
        counts, read_from = {}, start
    counts.update(_minute_counts(read_from, end))
    if cached is None or settled > cached["until"]:
        keep = {m: v for m, v in counts.items() if m < settled}
        cache.set(PER_MINUTE_KEY, {"until": max(settled, start), "counts": keep}, PER_MINUTE_CACHE_S)
    labels, requests, tokens, errors = [], [], [], []
    minute = start
    while minute < end:
        req, tok, err = counts.get(minute, (0, 0, 0))
        labels.append(minute.strftime("%H:%M"))
        requests.append(req)
        tokens.append(tok)
        errors.append(err)
        minute += timedelta(minutes=1)
    return {
        "start": _iso(start),
        "labels": labels,
        "requests": requests,
        "tokens": tokens,
        "errors": errors,
        "totals": {"requests": sum(requests), "tokens": sum(tokens), "errors": sum(errors)},
    }


def _days(first: date, count: int) -> list[date]:
    return [first + timedelta(days=i) for i in range(count)]


def fleet_now(*, now: datetime) -> dict[str, Any]:
    """Live nodes at a glance: counts by status / accelerator / placement, cost per hour, load."""
    counts = dict(Node.objects.order_by().values_list("status").annotate(n=Count("id")).values_list("status", "n"))
    live = list(
        Node.objects.filter(status__in=LIVE_STATUSES)
        .select_related("model")
        .order_by("model__name", "id")
        .values(
            "id",
            "cluster_name",
            "status",
            "accelerator",
            "cloud",
            "region",
            "use_spot",
            "hourly_cost",
            "kv_cache_usage",
            "requests_running",
            "requests_waiting",
            "model__name",
            "last_health_at",
        )
    )
    by_accel: Counter[str] = Counter()
    by_place: Counter[str] = Counter()
    cost_per_hour = 0
    for n in live:
        by_accel[n["accelerator"] or "none"] += 1
        by_place[f"{n['cloud'] or 'local'}/{n['region'] or '-'}"] += 1
        cost_per_hour += economics.usd_to_micros(n["hourly_cost"])
    return {
        "by_status": [
            {"status": s, "label": NodeStatus(s).label, "count": counts.get(s, 0)} for s in NodeStatus.values
        ],
        "by_accelerator": [{"name": k, "count": v} for k, v in by_accel.most_common()],
        "by_placement": [{"name": k, "count": v} for k, v in by_place.most_common()],
        "live": len(live),
        "cost_per_hour_micros": cost_per_hour,
        "nodes": [
            {
                "id": n["id"],
                "name": n["cluster_name"] or f"node-{n['id']}",
                "model": n["model__name"],
                "status": n["status"],
                "accelerator": n["accelerator"],
                "placement": f"{n['cloud'] or 'local'}/{n['region'] or '-'}",
                "spot": n["use_spot"],
                "hourly_cost_micros": economics.usd_to_micros(n["hourly_cost"]),
                "kv_cache_usage": n["kv_cache_usage"],
                "running": n["requests_running"],
                "waiting": n["requests_waiting"],
                "last_health_at": _iso(n["last_health_at"]) if n["last_health_at"] else None,
            }
            for n in live[:FLEET_ROWS]
        ],
    }


def cold_starts(*, now: datetime) -> list[dict[str, Any]]:
    """Median seconds from requested to ready per model and accelerator, nodes ready in 30 days."""
    rows = Node.objects.filter(ready_at__gte=now - timedelta(days=30)).values_list(
        "model__name", "accelerator", "requested_at", "ready_at"
    )
    samples: dict[tuple[str, str], list[float]] = defaultdict(list)
    for model_name, accel, requested, ready in rows:
        if ready is not None:  # filtered on ready_at above; the checker cannot know
            samples[(model_name, accel or "none")].append((ready - requested).total_seconds())
    return [
        {"model": m, "accelerator": a, "median_seconds": round(median(v), 1), "samples": len(v)}
        for (m, a), v in sorted(samples.items())
    ]


def _usage_day(r: UsageRow) -> economics.UsageDay | None:
    if r.model_id is None or r.day is None:
        return None
    return economics.UsageDay(r.model_id, r.day, r.requests, r.prompt_tokens, r.completion_tokens, r.cost_micros)


def usage_days(*, since: datetime, until: datetime, now: datetime, live: bool = True) -> list[economics.UsageDay]:
    """Usage per model per day from the rollups (``live``: plus the hours not rolled up yet, from raw
    records): economics' revenue and tokens."""
    rows = usage_summary(start=since, end=until, group_by="model,day", percentiles=False, now=now, live=live)
    return [u for u in map(_usage_day, rows) if u is not None]


CLOSED_DAYS_CACHE_S = 3600


def closed_usage_days(*, first_day: date, now: datetime) -> list[economics.UsageDay]:
    """``usage_days`` from ``first_day`` to the start of today, from the cache when it can be.

    Closed days change only when one of their hours is rebuilt (a late record), and a rebuild sets
    that hour's ``built_at`` to now: the newest ``built_at`` before today is part of the cache key,
    so a rebuilt day is never served stale. (Today comes from the 24 h read in dashboard_data.)"""
    today = now.astimezone(UTC).date()
    today_start = _midnight(today)
    newest = UsageRollupHour.objects.filter(hour__lt=today_start).aggregate(built=Max("built_at"))["built"]
    key = f"crosslogic:dashboard:usage-days:{first_day}:{today}:{newest.isoformat() if newest else '-'}"
    closed = cache.get(key)
    if closed is None:
        closed = usage_days(since=_midnight(first_day), until=today_start, now=now, live=False)
        cache.set(key, closed, CLOSED_DAYS_CACHE_S)
    return list(closed)


def _today_usage(rows: list[UsageRow], today_start: datetime) -> list[economics.UsageDay]:
    """Today's usage per model from the last-24-h rows grouped by hour (today is inside them)."""
    by_model: dict[int, list[int]] = {}
    for r in rows:
        if r.hour is None or r.hour < today_start or r.model_id is None:
            continue
        totals = by_model.setdefault(r.model_id, [0, 0, 0, 0])
        for i, value in enumerate((r.requests, r.prompt_tokens, r.completion_tokens, r.cost_micros)):
            totals[i] += value
    day = today_start.date()
    return [economics.UsageDay(mid, day, *totals) for mid, totals in by_model.items()]


def _midnight(day: date) -> datetime:
    return datetime.combine(day, datetime.min.time(), tzinfo=UTC)


def economics_table(
    *,
    models: dict[int, ServedModel],
    spans: list[economics.NodeSpan],
    usage: list[economics.UsageDay],
    now: datetime,
) -> list[dict[str, Any]]:
    """Per model over the last ECONOMICS_DAYS UTC days (today included, up to now)."""
    today = now.astimezone(UTC).date()
    since = datetime.combine(today - timedelta(days=ECONOMICS_DAYS - 1), datetime.min.time(), tzinfo=UTC)
    until = datetime.combine(today + timedelta(days=1), datetime.min.time(), tzinfo=UTC)
    rows = economics.model_days(
        since=since,
        until=until,
        now=now,
        usage=[u for u in usage if u.day >= since.date()],
        storage={m.pk: (m.total_bytes, m.created_at.date()) for m in models.values()},
        spans=spans,
    )
    out = []
    for model_id, total in sorted(economics.totals_by_model(rows).items(), key=lambda kv: -kv[1].gpu_cost_micros):
        model = models.get(model_id)
        row = total.as_dict()
        row.pop("day")
        row.update(
            model=model.name if model else f"#{model_id}",
            storage_bytes=model.total_bytes if model else 0,
            storage_month_micros=economics.storage_cost_per_month(model.total_bytes) if model else 0,
        )
        out.append(row)
    return out


def _top(rows: list[UsageRow]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """Top tenants and top models from one tenant x model grouping (histograms merged per model)."""
    tenants: dict[int | None, UsageRow] = {}
    models: dict[str | None, UsageRow] = {}
    for r in rows:
        tenant = tenants.get(r.tenant_id)
        if tenant is None:
            tenant = tenants[r.tenant_id] = UsageRow(tenant_id=r.tenant_id, tenant=r.tenant)
        model = models.get(r.model_name)
        if model is None:
            model = models[r.model_name] = UsageRow(model_name=r.model_name)
        for total in (tenant, model):
            for name in COUNTERS:
                setattr(total, name, getattr(total, name) + getattr(r, name))
        # Element-wise sums with map(): histograms.merge's Python loop, per row, was the page's
        # biggest CPU cost with a thousand rollup rows.
        model.ttft_hist = list(map(add, model.ttft_hist, r.ttft_hist))
        model.latency_hist = list(map(add, model.latency_hist, r.latency_hist))
    top_tenants = [
        {
            "tenant": r.tenant or f"#{r.tenant_id}",
            "requests": r.requests,
            "tokens": r.total_tokens,
            "errors": r.errors,
            "spend_micros": r.cost_micros,
        }
        for r in sorted(tenants.values(), key=lambda r: (-r.cost_micros, -r.requests))[:TOP_N]
    ]
    top_models = [
        {
            "model": r.model_name,
            "requests": r.requests,
            "tokens": r.total_tokens,
            "errors": r.errors,
            "spend_micros": r.cost_micros,
            "ttft_p50_ms": histograms.quantile(r.ttft_hist, 0.5),
            "ttft_p95_ms": histograms.quantile(r.ttft_hist, 0.95),
            "latency_p50_ms": histograms.quantile(r.latency_hist, 0.5),
            "latency_p95_ms": histograms.quantile(r.latency_hist, 0.95),
        }
        for r in sorted(models.values(), key=lambda r: (-r.requests, r.model_name or ""))[:TOP_N]
    ]
    return top_tenants, top_models


def dashboard_data(*, now: datetime | None = None) -> dict[str, Any]:
    now = now or timezone.now()
    today = now.astimezone(UTC).date()
    first_day = today - timedelta(days=SPEND_DAYS - 1)
    window_start = datetime.combine(first_day, datetime.min.time(), tzinfo=UTC)
    window_end = datetime.combine(today + timedelta(days=1), datetime.min.time(), tzinfo=UTC)

    # The last 24 h of rollups by hour x tenant x model, histograms included: top tenants and
    # models, and today's usage (today lies inside those 24 h). Rollups only (live=False): the
    # hour in progress is not rolled up yet and shows in the per-minute charts; reading it from raw
    # records here would make the page's cost grow with the traffic of that hour.
    last_24h = usage_summary(
        start=now - timedelta(hours=24), end=now, group_by="hour,tenant,model", percentiles=True, now=now, live=False
    )
    newest = UsageRollupHour.objects.filter(built_at__isnull=False).aggregate(hour=Max("hour"))["hour"]
    top_tenants, top_models = _top(last_24h)
    # 30 days of usage per model per day: spend per day, and economics' revenue.
    usage = [*closed_usage_days(first_day=first_day, now=now), *_today_usage(last_24h, _midnight(today))]
    spend = Counter[date]()
    for u in usage:
        spend[u.day] += u.cost_micros
    # GPU cost per day from the nodes' billable spans.
    spans = economics.node_spans(since=window_start, until=window_end, now=now)
    gpu = Counter[date]()
    for row in economics.gpu_by_model_day(spans, window_start, window_end).values():
        gpu[row.day] += row.gpu_cost_micros
    days = _days(first_day, SPEND_DAYS)

    models = {m.pk: m for m in ServedModel.objects.only("id", "name", "total_bytes", "created_at")}

    return {
        "generated_at": _iso(now),
        "rollups_until": _iso(newest + timedelta(hours=1)) if newest else None,
        "per_minute": per_minute(now=now),
        "per_day": {
            "labels": [d.isoformat() for d in days],
            "spend_micros": [spend.get(d, 0) for d in days],
            "gpu_cost_micros": [gpu.get(d, 0) for d in days],
        },
        "top_tenants": top_tenants,
        "top_models": top_models,
        "fleet": fleet_now(now=now),
        "cold_starts": cold_starts(now=now),
        "economics": {
            "days": ECONOMICS_DAYS,
            "rows": economics_table(models=models, spans=spans, usage=usage, now=now),
        },
    }
