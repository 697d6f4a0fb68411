"""Non-trivial reads about the fleet."""

from __future__ import annotations

from collections import defaultdict
from decimal import Decimal
from statistics import median

from django.db.models import Count, Sum

from apps.fleet.models import Node, NodeStatus


def model_cold_start_medians(*, model_id: int) -> list[dict[str, object]]:
    """Median seconds from request to ready, per accelerator, over nodes that got there."""
    rows = Node.objects.filter(model_id=model_id, ready_at__isnull=False).values_list(
        "accelerator", "requested_at", "ready_at"
    )
    by_accel: dict[str, list[float]] = defaultdict(list)
    for accel, requested, ready in rows:
        assert ready is not None  # filtered on ready_at__isnull=False above
        by_accel[accel or "?"].append((ready - requested).total_seconds())
    return [
        {"accelerator": accel, "median_seconds": round(median(values), 1), "samples": len(values)}
        for accel, values in sorted(by_accel.items())
    ]


def fleet_summary() -> dict[str, int]:
    """Node count per status (every status present, zero included)."""
    counts = dict(Node.objects.values_list("status").annotate(n=Count("id")).values_list("status", "n"))
    return {status: counts.get(status, 0) for status in NodeStatus.values}


# Nodes we pay for: a machine may exist from the request on, until it is terminated (or failed).
UNBILLED_STATUSES = (NodeStatus.TERMINATED, NodeStatus.FAILED)


def billable_cost_per_hour() -> Decimal:
    """US$ per hour of every node being paid for now (the sum of their hourly_cost)."""
    total = Node.objects.exclude(status__in=UNBILLED_STATUSES).aggregate(total=Sum("hourly_cost"))["total"]
    return total or Decimal(0)
