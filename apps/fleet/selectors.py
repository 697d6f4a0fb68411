"""Non-trivial reads about the fleet."""

from __future__ import annotations

from collections import defaultdict
from statistics import median

from django.db.models import Count

from apps.fleet.models import Node, NodeStatus, ScaleDecision


def model_cold_start_medians(*, model_id: int) -> list[dict[str, object]]:
    """Median seconds from request to ready, per accelerator, over nodes that got there."""
    # A warm restart's ready_at measures the restart, not a cold start.
    rows = Node.objects.filter(
        model_id=model_id, ready_at__isnull=False, restart_requested_at__isnull=True
    ).values_list("accelerator", "requested_at", "ready_at")
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


def model_scale_history(*, model_id: int, limit: int = 10) -> list[ScaleDecision]:
    """The model's last changes of desired replicas, newest first."""
    return list(ScaleDecision.objects.filter(model_id=model_id)[:limit])
