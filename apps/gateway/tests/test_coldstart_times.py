"""The measured cold and warm starts behind Retry-After, from rows as load_table reads them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from apps.gateway.coldstart import holdable, retry_after_s
from apps.gateway.routing import ModelRoute, NodeRoute, _start_times

T0 = datetime(2026, 12, 1, tzinfo=UTC)


def row(model_id: int, seconds: float, *, restarted_after: float | None = None, accelerator: str = "L4:1") -> dict:
    requested = T0
    restart = None if restarted_after is None else T0 + timedelta(seconds=restarted_after)
    began = restart or requested
    return {
        "model_id": model_id,
        "accelerator": "",
        "model__accelerator": accelerator,
        "requested_at": requested,
        "restart_requested_at": restart,
        "ready_at": began + timedelta(seconds=seconds),
    }


def route(**kwargs) -> ModelRoute:
    return ModelRoute(model_id=1, name="m", created=0, price_in=0, price_out=0, **kwargs)


def test_cold_starts_are_medians_per_model_and_accelerator_and_warm_restarts_are_apart() -> None:
    rows = [row(1, 40), row(1, 50), row(1, 44), row(2, 90, accelerator="A100:1"), row(1, 6, restarted_after=3600)]
    cold, warm = _start_times(rows)
    assert cold[1] == 44 and cold["L4:1"] == 44 and cold[2] == 90 and cold["A100:1"] == 90
    # The restarted node's ready_at counts from its restart, and never as a cold start.
    assert warm[1] == 6 and warm[""] == 6 and 2 not in warm


def test_a_ready_at_older_than_the_restart_is_not_a_measurement() -> None:
    stale = row(1, 30, restarted_after=100)
    stale["ready_at"] = T0 + timedelta(seconds=30)  # ready after the first launch, not yet after the restart
    assert _start_times([stale]) == ({}, {})


def test_retry_after_is_what_is_left_of_the_expected_start() -> None:
    assert retry_after_s(route(cold_start_s=44.0), now=1000.0) == 44
    assert retry_after_s(route(cold_start_s=44.0, ready_eta=1034.2), now=1000.0) == 35
    assert retry_after_s(route(cold_start_s=44.0, ready_eta=990.0), now=1000.0) == 5  # late: a tenth
    assert retry_after_s(route(cold_start_s=0.2, ready_eta=990.0), now=1000.0) == 1


def test_only_a_model_without_ready_nodes_that_has_or_may_start_one_is_held() -> None:
    node = NodeRoute(node_id=1, base_url="http://n", api_key="k", waiting=0)
    assert holdable(route(starting=1))
    assert holdable(route(may_start=True))
    assert not holdable(route())
    assert not holdable(route(nodes=(node,), starting=1, may_start=True))
