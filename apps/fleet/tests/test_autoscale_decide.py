"""The autoscaler's decision, table-driven: a pure function of policy, load, memory and time."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta

import pytest

from apps.fleet.autoscale_rule import Load, Memory, Policy, decide, trend

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=UTC)


def ago(seconds: float) -> datetime:
    return NOW - timedelta(seconds=seconds)


P = Policy(
    min_replicas=0,
    max_replicas=8,
    target_ongoing=10,
    target_kv=0.8,
    scale_up_window_s=0,
    scale_down_window_s=300,
    idle_to_zero_s=900,
)

# P with the warm hold on (FLEET_WARM_DOWN_HOLD_STARTS=5).
W = replace(P, warm_down_hold_starts=5)


@pytest.mark.parametrize(
    ("name", "policy", "load", "memory", "desired", "in_reason"),
    [
        ("idle at zero stays at zero", P, Load(), Memory(0), 0, "steady"),
        ("one held request scales from zero at once", P, Load(held=1), Memory(0), 1, "scale from zero"),
        # Held requests are a backlog the first ready node drains, not per-node load (issue #13):
        # counted per node they launched the maximum for a burst one node carried.
        (
            "held requests from zero ask for one node, not one per target",
            P,
            Load(held=25),
            Memory(0),
            1,
            "drain the 25 held",
        ),
        (
            "held requests while a node starts add no node",
            P,
            Load(held=40, starting=1, cold_start_s=60),
            Memory(1),
            1,
            "steady",
        ),
        (
            "once served, the drained backlog counts as running like any request",
            P,
            Load(ready=1, running=8, waiting=17),
            Memory(1),
            3,
            "25 served, 10 per node",
        ),
        (
            "41 waiting on 2 ready nodes → 6 (running + waiting / 10)",
            P,
            Load(ready=2, running=20, waiting=41),
            Memory(2),
            7,
            "41 waiting, 20 running",
        ),
        (
            "the gateway's count wins when it sees more than vLLM",
            P,
            Load(ready=1, running=5, inflight=30),
            Memory(1),
            3,
            "30 in flight at the gateway",
        ),
        (
            "KV cache above target adds nodes although few requests run",
            P,
            Load(ready=2, running=4, kv_mean=0.96),
            Memory(2),
            3,
            "3 by KV cache",
        ),
        (
            "queue wait above target adds nodes",
            Policy(0, 8, target_ongoing=100, target_kv=None, target_queue_wait_s=2.0),
            Load(ready=2, running=10, queue_wait_s=5.0),
            Memory(2),
            5,
            "5 by queue wait",
        ),
        # With history (the last passes' demand, oldest first): the sustained level is their lowest.
        (
            "one pass's spike is noise: the sustained level decides",
            P,
            Load(ready=1, running=12, recent=(4, 5, 12)),
            Memory(1),
            1,
            "4 sustained over 3 passes",
        ),
        (
            "demand above target for three passes: up",
            P,
            Load(ready=1, running=14, recent=(13, 12, 14)),
            Memory(1),
            2,
            "12 sustained over 3 passes",
        ),
        (
            "a queue growing on saturated nodes: up at once on this pass's count",
            P,
            Load(ready=1, running=8, waiting=22, recent=(5, 12, 30)),
            Memory(1),
            3,
            "30 served, queue growing",
        ),
        # The growth of a queue on saturated nodes is what arrives beyond what they serve (issue
        # #13): sized by Little's law for that arrival rate, not for the backlog nor its pile-up
        # projected over the cold start.
        (
            "a saturated queue growing 14/s with 0.75 s service: running + 10.5 sustained, 2 nodes",
            P,
            Load(
                ready=1,
                running=8,
                waiting=40,
                recent=(20, 30, 48),
                recent_span_s=2.0,
                service_s=0.75,
                cold_start_s=8,
                trend_per_s=10,
            ),
            Memory(1),
            2,
            "8 running + queue growing 14.0/s × 0.75 s service = 18 sustained, 10 per node)",
        ),
        (
            "at a burst's onset the last step's growth, not the passes' average, sizes the queue",
            P,
            Load(
                ready=1,
                running=8,
                waiting=22,
                recent=(9, 10, 30),
                recent_span_s=2.0,
                last_step_s=1.0,
                service_s=0.75,
                cold_start_s=8,
            ),
            Memory(1),
            3,
            "8 running + queue growing 20.0/s × 0.75 s service = 23 sustained",
        ),
        (
            "the same queue without a measured service time: this pass's count and the trend",
            P,
            Load(
                ready=1, running=8, waiting=40, recent=(20, 30, 48), recent_span_s=2.0, cold_start_s=8, trend_per_s=10
            ),
            Memory(1),
            8,
            "max replicas",
        ),
        (
            "two waiting on a full batch is a busy node's noise, not a queue to act on at once",
            P,
            Load(ready=1, running=8, waiting=2, recent=(4, 6, 10)),
            Memory(1),
            1,
            "4 sustained over 3 passes",
        ),
        (
            "first look after the hold: the backlog moved onto the node adds no node",
            P,
            Load(ready=1, running=8, waiting=30, recent=(38,)),
            Memory(1),
            1,
            "draining: no new node",
        ),
        (
            "a queue the ready nodes are draining adds no node",
            P,
            Load(ready=2, running=16, waiting=12, recent=(40, 33, 28)),
            Memory(2),
            2,
            "draining: no new node",
        ),
        ("never above max replicas", P, Load(ready=8, waiting=500), Memory(8), 8, "max replicas"),
        (
            "never below min replicas",
            Policy(2, 4, target_ongoing=10, scale_down_window_s=0),
            Load(ready=3),
            Memory(3, last_busy_at=ago(5000)),
            2,
            "min replicas",
        ),
        (
            "a rising queue is launched for ahead of the cold start (trend × cold start)",
            P,
            Load(ready=1, running=10, cold_start_s=60, trend_per_s=0.5),
            Memory(1),
            4,
            "trend +0.50",
        ),
        (
            "inside the scale-up window: wait",
            Policy(0, 8, target_ongoing=10, scale_up_window_s=30),
            Load(ready=1, waiting=25),
            Memory(1, above_since=ago(10)),
            1,
            "up in 20 s",
        ),
        (
            "past the scale-up window: up",
            Policy(0, 8, target_ongoing=10, scale_up_window_s=30),
            Load(ready=1, waiting=25),
            Memory(1, above_since=ago(31)),
            3,
            "scale up",
        ),
        ("less load: not down before the window", P, Load(ready=4, running=5), Memory(4), 4, "down to 1 in 300 s"),
        (
            "less load for the whole window: down to the window's peak",
            P,
            Load(ready=4, running=5),
            Memory(4, below_since=ago(301), below_peak=2),
            2,
            "scale down to the window's peak 2",
        ),
        # The warm hold (issue #13): nodes a scale-down stops warm come back in one warm start, so
        # the hold lasts warm_down_hold_starts warm starts, not the whole window.
        (
            "nodes stopped warm: down after the warm hold, not the whole window",
            W,
            Load(ready=4, running=5, warm_down=True, warm_start_s=7.0),
            Memory(4, below_since=ago(36), below_peak=1),
            1,
            "scale down to the window's peak 1 after warm hold 5 × 7.0 s warm start",
        ),
        (
            "nodes stopped warm: inside the warm hold, wait",
            W,
            Load(ready=4, running=5, warm_down=True, warm_start_s=7.0),
            Memory(4, below_since=ago(20), below_peak=1),
            4,
            "down to 1 in 15 s (warm hold",
        ),
        (
            "nodes torn down (no warm pool, spot): the whole window",
            W,
            Load(ready=4, running=5, warm_down=False, warm_start_s=7.0),
            Memory(4, below_since=ago(36), below_peak=1),
            4,
            "down to 1 in 264 s",
        ),
        (
            "a warm hold longer than the window: the window",
            replace(W, scale_down_window_s=20),
            Load(ready=4, running=5, warm_down=True, warm_start_s=7.0),
            Memory(4, below_since=ago(21), below_peak=1),
            1,
            "scale down to the window's peak 1;",
        ),
        (
            "the warm hold off (0 starts): the whole window",
            P,
            Load(ready=4, running=5, warm_down=True, warm_start_s=7.0),
            Memory(4, below_since=ago(36), below_peak=1),
            4,
            "down to 1 in 264 s",
        ),
        (
            "a one-pass spike inside the window neither holds the nodes nor raises the peak",
            P,
            Load(ready=4, running=25, recent=(5, 4, 25)),
            Memory(4, below_since=ago(301), below_peak=1),
            1,
            "scale down to the window's peak 1",
        ),
        (
            "idle with a node: kept until idle_to_zero_s",
            P,
            Load(ready=1),
            Memory(1, last_busy_at=ago(100)),
            1,
            "until idle 900 s",
        ),
        ("idle past idle_to_zero_s: to zero", P, Load(ready=1), Memory(1, last_busy_at=ago(901)), 0, "scale to zero"),
        (
            "policy lowered below the current count: follow it at once",
            Policy(0, 2),
            Load(ready=5, running=50),
            Memory(5),
            2,
            "policy changed",
        ),
    ],
)
def test_decide(name, policy, load, memory, desired, in_reason) -> None:
    got, reason, after = decide(policy, load, memory, NOW)
    assert (got, after.desired) == (desired, desired), reason
    assert in_reason in reason, reason
    assert reason.startswith(f"desired {desired} ")
    assert "cold start p50" in reason  # every decision carries its inputs


def test_a_busy_decision_remembers_when_and_a_quiet_one_keeps_the_last_time() -> None:
    _, _, busy = decide(P, Load(ready=1, running=1), Memory(1), NOW)
    assert busy.last_busy_at == NOW
    _, _, quiet = decide(P, Load(ready=1), Memory(1, last_busy_at=ago(50)), NOW)
    assert quiet.last_busy_at == ago(50)


def test_the_down_window_restarts_when_load_comes_back() -> None:
    _, _, waiting = decide(P, Load(ready=4, running=5), Memory(4), NOW)
    assert waiting.below_since == NOW and waiting.below_peak == 1
    _, _, back = decide(P, Load(ready=4, running=40), waiting, NOW + timedelta(seconds=10))
    assert back.below_since is None and back.desired == 4


def test_the_peak_of_the_window_is_what_scale_down_keeps() -> None:
    memory = Memory(4)
    for t, running in [(0, 5), (100, 25), (200, 5)]:
        _, _, memory = decide(P, Load(ready=4, running=running), memory, NOW + timedelta(seconds=t))
    desired, reason, _ = decide(P, Load(ready=4, running=5), memory, NOW + timedelta(seconds=301))
    assert desired == 3, reason  # 25 running at t=100 needed 3


def test_the_cold_start_pile_up_of_held_requests_is_no_trend() -> None:
    # Held requests grow while nothing is served whatever the arrival rate: no trend, no samples.
    assert trend([[1000.0, 0.0], [1004.0, 20.0]], now=1008.0, demand=40, ready=False) == (0.0, [])
    # Served, the samples start afresh: the backlog moving to the node keeps the sum flat.
    rate, kept = trend([], now=1009.0, demand=40)
    rate, kept = trend(kept, now=1010.0, demand=41)
    assert rate == pytest.approx(1.0) and len(kept) == 2


def test_the_trend_is_a_least_squares_slope_not_two_passes_noise() -> None:
    # Flat demand with one high pass at the end: (last - first) / time would say +0.25/s.
    samples = [[1000.0 + t, 5.0] for t in range(0, 20, 2)]
    rate, _ = trend(samples, now=1020.0, demand=10)
    assert 0 < rate < 0.12  # least squares: 0.11


def test_trend_is_the_growth_over_the_last_minute_and_never_negative() -> None:
    rate, kept = trend([[1000.0, 0.0], [1030.0, 10.0]], now=1060.0, demand=30)
    assert rate == pytest.approx(0.5) and len(kept) == 3
    rate, kept = trend([[900.0, 100.0], [1030.0, 50.0]], now=1060.0, demand=10)
    assert rate == 0.0 and kept[0] == [1030.0, 50.0]  # the sample older than a minute is dropped
    assert trend([], now=5.0, demand=3) == (0.0, [[5.0, 3.0]])
