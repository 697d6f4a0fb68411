"""Synthetic usage for development (``bootstrap_demo --synthetic-usage-days N``): the dashboard's
charts and the model's economics have something to show on a fresh ``make run``.

What it writes, all recognisable and idempotent:
- usage records ``synthetic-<tenant>-<minute>-<n>`` (deterministic per minute, so a re-run over the
  same period inserts nothing twice: the gateway's own insert ignores known request ids), with a
  day-night rhythm, a few 429s and 502s, TTFT and latency drawn from a seeded generator;
- the hourly rollups of every complete hour it touched (apps.metering.rollups);
- one terminated static "history" node per model (``synthetic-history-<model id>``) that was billed
  over the period at $0.80/h on an L4, with its requested/terminated events and a load history,
  so GPU cost, utilisation and idle GPU-hours are not zero. It is never launched nor torn down.

Never in production: bootstrap_demo refuses it when DEBUG is off.
"""

from __future__ import annotations

import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

from django.db import transaction

from apps.catalog.models import ServedModel
from apps.fleet.load_history import hour_start
from apps.fleet.models import Launcher, Node, NodeEvent, NodeLoadHour, NodeStatus
from apps.metering.rollups import rollups_build_range
from apps.metering.services import cost_micros, usage_records_create
from apps.tenancy.models import ApiKey, Tenant

HISTORY_HOURLY_COST = Decimal("0.80")
HISTORY_ACCELERATOR = "L4:1"


@dataclass(frozen=True)
class SyntheticResult:
    records: int
    hours_rolled: int
    nodes: int


def _rate_per_minute(moment: datetime, peak: float) -> float:
    """Requests per minute: a day-night wave between 15 % and 100 % of ``peak`` (UTC)."""
    phase = (moment.hour + moment.minute / 60 - 15) / 24 * 2 * math.pi  # busiest at 15:00 UTC
    return peak * (0.575 + 0.425 * math.cos(phase))


def synthetic_usage_create(
    *,
    tenants: Sequence[tuple[Tenant, ApiKey | None]],
    models: Sequence[ServedModel],
    days: float,
    now: datetime,
    peak_per_minute: float = 6.0,
    seed: int = 12,
) -> SyntheticResult:
    """Usage records over the ``days`` before ``now``, then their rollups and a billed history node per model."""
    if not tenants or not models:
        raise ValueError("synthetic usage needs at least one tenant and one model")
    if not 0 < days <= 31:
        raise ValueError("synthetic usage covers 0 to 31 days")
    start = (now - timedelta(days=days)).replace(second=0, microsecond=0)
    end = now.replace(second=0, microsecond=0)
    written = 0
    batch: list[dict[str, Any]] = []
    minute = start
    while minute < end:
        rng = random.Random(f"{seed}-{minute.isoformat()}")  # the same minute gives the same records
        count = int(_rate_per_minute(minute, peak_per_minute) + rng.random())
        for n in range(count):
            tenant, key = tenants[min(len(tenants) - 1, int(rng.paretovariate(1.6)) - 1)]
            model = models[rng.randrange(len(models))]
            status = 429 if rng.random() < 0.01 else 502 if rng.random() < 0.005 else 200
            ok = status == 200
            prompt = rng.randint(50, 3000) if ok else 0
            completion = rng.randint(20, 800) if ok else 0
            ttft = round(rng.lognormvariate(math.log(120), 0.5), 1) if ok else None
            batch.append(
                {
                    "request_id": f"synthetic-{tenant.pk}-{minute:%Y%m%d%H%M}-{n}",
                    "tenant": tenant,
                    "api_key": key,
                    "model": model,
                    "model_name": model.name,
                    "prompt_tokens": prompt,
                    "completion_tokens": completion,
                    "streamed": True,
                    "status_code": status,
                    "ttft_ms": ttft,
                    "latency_ms": round((ttft or 5.0) + completion * rng.uniform(8, 25), 1),
                    "cost_micros": cost_micros(
                        prompt_tokens=prompt,
                        completion_tokens=completion,
                        price_in=model.price_input_per_mtok,
                        price_out=model.price_output_per_mtok,
                    ),
                    "created_at": minute + timedelta(seconds=rng.uniform(0, 59.999)),
                }
            )
        if len(batch) >= 2000:
            usage_records_create(rows=batch)
            written += len(batch)
            batch = []
        minute += timedelta(minutes=1)
    if batch:
        usage_records_create(rows=batch)
        written += len(batch)
    rolled = rollups_build_range(start=start, end=now, now=now)
    nodes = sum(_history_node(model=m, start=start, end=end, seed=seed) for m in models)
    return SyntheticResult(records=written, hours_rolled=len(rolled), nodes=nodes)


def _history_node(*, model: ServedModel, start: datetime, end: datetime, seed: int) -> int:
    """One terminated static node billed over [start, end), with events and hourly load; 0 if it exists."""
    name = f"synthetic-history-{model.pk}"
    if Node.objects.filter(cluster_name=name).exists():
        return 0
    with transaction.atomic():
        node = Node.objects.create(
            model=model,
            launcher=Launcher.STATIC,
            cloud="aws",
            region="us-east-1",
            accelerator=HISTORY_ACCELERATOR,
            hourly_cost=HISTORY_HOURLY_COST,
            cluster_name=name,
            status=NodeStatus.TERMINATED,
            status_reason="synthetic history (bootstrap_demo)",
            requested_at=start,
            provisioned_at=start + timedelta(minutes=2),
            weights_loaded_at=start + timedelta(minutes=3),
            ready_at=start + timedelta(minutes=4),
            terminated_at=end,
        )
        NodeEvent.objects.bulk_create(
            [
                NodeEvent(
                    node=node,
                    created_at=start,
                    kind=NodeEvent.Kind.ACTION,
                    to_status=NodeStatus.PENDING,
                    message="requested (static)",
                    actor="bootstrap_demo",
                ),
                NodeEvent(
                    node=node,
                    created_at=start + timedelta(minutes=4),
                    kind=NodeEvent.Kind.TRANSITION,
                    from_status=NodeStatus.PENDING,
                    to_status=NodeStatus.READY,
                    message="synthetic history",
                    actor="bootstrap_demo",
                ),
                NodeEvent(
                    node=node,
                    created_at=end,
                    kind=NodeEvent.Kind.TRANSITION,
                    from_status=NodeStatus.READY,
                    to_status=NodeStatus.TERMINATED,
                    message="synthetic history",
                    actor="bootstrap_demo",
                ),
            ]
        )
        rng = random.Random(f"{seed}-{name}")
        hours = []
        hour = hour_start(start)
        while hour < end:
            busy = round(240 * min(1.0, _rate_per_minute(hour, 1.0) * rng.uniform(0.6, 1.0)))
            hours.append(NodeLoadHour(node=node, hour=hour, samples=240, busy_samples=busy, running_sum=busy * 3))
            hour += timedelta(hours=1)
        NodeLoadHour.objects.bulk_create(hours)
    return 1
