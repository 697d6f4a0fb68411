"""The autoscaler's decision: a pure function of a model's policy, its load, what the last decision
left (hysteresis) and the time; table-tested in apps/fleet/tests/test_autoscale_decide.py. The rule
is docs/fleet.md's "The decision"; apps.fleet.autoscale reads the inputs and acts on the result."""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from datetime import datetime

from django.conf import settings

from apps.catalog.models import ServedModel

# Demand samples kept for the trend (seconds).
TREND_WINDOW_S = 60.0


@dataclass(frozen=True)
class Policy:
    min_replicas: int
    max_replicas: int
    target_ongoing: int = 16
    target_kv: float | None = 0.8
    target_queue_wait_s: float | None = None
    scale_up_window_s: float = 0
    scale_down_window_s: float = 300
    idle_to_zero_s: float = 900
    # Scale-down hold, in warm starts, when the nodes it removes would be stopped warm (0: the
    # whole scale_down_window_s always). FLEET_WARM_DOWN_HOLD_STARTS.
    warm_down_hold_starts: float = 0

    @classmethod
    def of(cls, model: ServedModel) -> Policy:
        return cls(
            min_replicas=model.min_replicas,
            max_replicas=model.max_replicas,
            target_ongoing=max(1, model.target_ongoing_requests),
            target_kv=model.target_kv_cache_usage,
            target_queue_wait_s=model.target_queue_wait_s,
            scale_up_window_s=model.scale_up_window_s,
            scale_down_window_s=model.scale_down_window_s,
            idle_to_zero_s=model.idle_to_zero_s,
            warm_down_hold_starts=settings.FLEET_WARM_DOWN_HOLD_STARTS,
        )

    def down_window(self, load: Load) -> tuple[float, str]:
        """How long want must stay below the desired count before a scale-down, and why.

        Holding an idle node costs a node-second per second; dropping one the load then asks for
        again costs one restart. When the nodes a scale-down drains are stopped into the warm pool
        that restart is a warm start (seconds, against a cold start of a minute or more), so
        holding for a few warm starts bounds the waste either way (the ski-rental rule); the whole
        window is for nodes torn down, whose return is a cold start."""
        window = float(self.scale_down_window_s)
        if self.warm_down_hold_starts > 0 and load.warm_down and load.warm_start_s is not None:
            hold = self.warm_down_hold_starts * load.warm_start_s
            if hold < window:
                return hold, f"warm hold {self.warm_down_hold_starts:g} × {load.warm_start_s:.1f} s warm start"
        return window, ""


@dataclass(frozen=True)
class Load:
    ready: int = 0
    starting: int = 0
    stopped: int = 0
    running: int = 0  # vLLM's running requests, summed over the ready nodes
    waiting: int = 0  # vLLM's queue, summed over the ready nodes
    kv_mean: float | None = None  # mean KV-cache use of the ready nodes (0..1)
    inflight: int = 0  # the gateway's in-flight requests to the model's nodes
    held: int = 0  # requests the gateway holds for want of a ready node
    cold_start_s: float = 60.0
    warm_start_s: float | None = None  # measured warm start p50 (or the default)
    warm_down: bool = False  # a scale-down's drained nodes would be stopped warm, not torn down
    trend_per_s: float = 0.0  # demand growth (requests per second), 0 when flat or falling
    # Demand of the last RECENT_PASSES passes since a node was ready (oldest first, this pass
    # last); () when unknown: the level is then this pass's count alone.
    recent: tuple[float, ...] = ()
    recent_span_s: float = 0.0  # seconds between the first and the last of ``recent``
    last_step_s: float = 0.0  # seconds between the last two of ``recent``
    queue_wait_s: float | None = None
    # Mean time a node spends on one request (its decode: latency - TTFT, last minute), None when
    # unknown: turns a saturated queue's growth into the arrival rate it reveals.
    service_s: float | None = None

    @property
    def serving(self) -> int:
        # vLLM's counts and the gateway's overlap (the same requests seen from both ends): the
        # larger is the better estimate.
        return max(self.running + self.waiting, self.inflight)

    @property
    def demand(self) -> int:
        """Every request the model has (held ones are seen by the gateway alone): busy or idle."""
        return self.serving + self.held


@dataclass(frozen=True)
class Memory:
    """What one decision leaves for the next (ModelScale's hysteresis columns)."""

    desired: int = 0
    above_since: datetime | None = None
    below_since: datetime | None = None
    below_peak: int = 0
    last_busy_at: datetime | None = None


def wanted(policy: Policy, load: Load, memory: Memory, now: datetime) -> tuple[int, str]:
    """How many nodes the load asks for right now (before hysteresis), and why.

    Capacity follows the requests being served (concurrency ÷ target_ongoing), projected over the
    cold start by their growth. Held requests are not concurrency: they queued only because no
    node was ready, and one ready node drains that backlog within a few of its batches; counted
    per node (and their pile-up during the cold start as growth) they launched the model's
    maximum for a burst one node carries (bench/autoscale_bench.py, issue #13). Once served,
    they show up in running/waiting, and the next decisions size for them."""
    serving = load.serving
    level, how = float(serving), f"{serving} served"
    draining = False
    growth = load.trend_per_s  # demand growth, projected over the cold start
    if load.recent:
        r = load.recent
        # Saturated and rising now (vLLM queues half a node's target or more): no time to wait
        # for more passes. A request or two waiting on a full batch is the noise of a busy node.
        if len(r) >= 2 and r[-1] > r[0] and load.waiting * 2 >= policy.target_ongoing:
            how += ", queue growing"
            if load.service_s and load.recent_span_s > 0:
                # The queue on saturated nodes grows by what arrives beyond what they serve:
                # arrivals = running / service + growth, which need running + growth * service
                # requests in flight (Little's law). That is the sustained load; the backlog
                # itself drains on the headroom between target_ongoing and the batch, and its
                # growth is no demand trend to project over the cold start (that launched the
                # maximum for a burst 3 nodes carry, issue #13).
                # The faster of the growth over the passes and over the last step: at a burst's
                # onset the older passes predate it and would undersize the first decision.
                rate = (r[-1] - r[0]) / load.recent_span_s
                if load.last_step_s > 0:
                    rate = max(rate, (r[-1] - r[-2]) / load.last_step_s)
                level = load.running + rate * load.service_s
                how = (
                    f"{load.running} running + queue growing {rate:.1f}/s × {load.service_s:.2f} s service"
                    f" = {level:.0f} sustained"
                )
                growth = 0.0
        else:
            level = min(level, *r)
            how = f"{level:g} sustained over {len(r)} pass{'es' if len(r) > 1 else ''}"
        # Falling demand (or the first look after no node was ready: the held backlog just moved
        # onto the node) is a queue the ready nodes are draining: no node is added for it.
        draining = len(r) < 2 or r[-1] < r[0]
    projected = level + max(0.0, growth) * load.cold_start_s
    need = math.ceil(projected / policy.target_ongoing - 1e-9)
    if draining and need > max(memory.desired, 1):
        need, how = max(memory.desired, 1), how + ", draining: no new node"
    by: dict[str, int] = {"requests": need}
    if policy.target_kv and load.kv_mean is not None and load.ready:
        by["KV cache"] = math.ceil(load.ready * load.kv_mean / policy.target_kv - 1e-9)
    if policy.target_queue_wait_s and load.queue_wait_s is not None and load.ready:
        by["queue wait"] = math.ceil(load.ready * load.queue_wait_s / policy.target_queue_wait_s - 1e-9)
    signal, want = max(by.items(), key=lambda kv: kv[1])
    why = f"{want} by {signal}"
    if signal == "requests" and want:
        why += f" ({how}"
        why += f" + {growth:.2f}/s × {load.cold_start_s:.0f} s cold start" if growth > 0 else ""
        why += f", {policy.target_ongoing} per node)"
    if load.held > 0 and want < 1:
        want, why = 1, f"1 to drain the {load.held} held (a backlog, not per-node load)"
    elif serving > 0 and want < 1:
        want, why = 1, "1 for the requests in flight"
    if want == 0 and memory.desired > 0:
        idle_s = (now - memory.last_busy_at).total_seconds() if memory.last_busy_at else math.inf
        if idle_s < policy.idle_to_zero_s:
            want, why = 1, f"1 until idle {policy.idle_to_zero_s:g} s (idle {idle_s:.0f} s)"
    if want < policy.min_replicas:
        want, why = policy.min_replicas, f"{policy.min_replicas} (min replicas)"
    if want > policy.max_replicas:
        want, why = policy.max_replicas, f"{policy.max_replicas} (max replicas; load asks {want})"
    return want, why


def decide(policy: Policy, load: Load, memory: Memory, now: datetime) -> tuple[int, str, Memory]:
    """(desired nodes, the reason with its inputs, memory for the next decision)."""
    busy_at = now if load.demand > 0 else memory.last_busy_at
    memory = replace(memory, last_busy_at=busy_at)
    want, why = wanted(policy, load, memory, now)
    current = min(max(memory.desired, policy.min_replicas), policy.max_replicas)
    desired, verdict = current, "steady"
    if current != memory.desired:  # the policy itself changed: follow it at once
        desired, verdict = current, "policy changed"
        memory = replace(memory, above_since=None, below_since=None, below_peak=0)
    elif want > current:
        above_since = memory.above_since or now
        held_s = (now - above_since).total_seconds()
        if current == 0 or held_s >= policy.scale_up_window_s:
            desired, verdict = want, "scale up" if current else "scale from zero"
            memory = replace(memory, above_since=None, below_since=None, below_peak=0)
        else:
            verdict = f"up in {policy.scale_up_window_s - held_s:.0f} s"
            memory = replace(memory, above_since=above_since, below_since=None, below_peak=0)
    elif want < current:
        below_since = memory.below_since or now
        peak = max(memory.below_peak, want)
        held_s = (now - below_since).total_seconds()
        # Down to the highest want seen during the window (not the last pass's): the want is
        # already the sustained level, so one pass's dip or spike neither drops nor holds nodes.
        # To zero the idle rule (in ``wanted``) already waited idle_to_zero_s.
        window, hold = (0.0, "") if peak == 0 else policy.down_window(load)
        if held_s >= window:
            desired, verdict = peak, "scale to zero" if peak == 0 else f"scale down to the window's peak {peak}"
            verdict += f" after {hold}" if hold else ""
            memory = replace(memory, above_since=None, below_since=None, below_peak=0)
        else:
            verdict = f"down to {peak} in {window - held_s:.0f} s" + (f" ({hold})" if hold else "")
            memory = replace(memory, above_since=None, below_since=below_since, below_peak=peak)
    else:
        memory = replace(memory, above_since=None, below_since=None, below_peak=0)
    memory = replace(memory, desired=desired)
    parts = [
        f"{load.waiting} waiting",
        f"{load.running} running",
        f"{load.inflight} in flight at the gateway",
        f"{load.held} held",
        f"{load.ready} ready",
        f"{load.starting} starting",
    ]
    if load.stopped:
        parts.append(f"{load.stopped} stopped (warm)")
    if load.kv_mean is not None:
        parts.append(f"KV cache {load.kv_mean:.0%}")
    if load.queue_wait_s is not None:
        parts.append(f"queue wait ~{load.queue_wait_s:.1f} s")
    if load.service_s is not None:
        parts.append(f"service ~{load.service_s:.2f} s")
    parts.append(f"cold start p50 {load.cold_start_s:.0f} s")
    if load.warm_start_s is not None:
        parts.append(f"warm start p50 {load.warm_start_s:.1f} s")
    if load.trend_per_s > 0:
        parts.append(f"trend +{load.trend_per_s:.2f} req/s")
    reason = f"desired {desired} ({verdict}; load wants {why}): {', '.join(parts)}"
    return desired, reason, memory


def trend(
    samples: list[list[float]], *, now: float, demand: int, ready: bool = True
) -> tuple[float, list[list[float]]]:
    """Demand growth per second (least-squares slope) over the last TREND_WINDOW_S (0 if falling), and the samples to
    keep. Without a ready node nothing is served: requests pile up as held whatever the arrival
    rate, so that pile-up is no trend, and the samples start afresh once a node serves (held
    requests moving to the node keep the sum flat; the drained backlog shows as a fall)."""
    if not ready:
        return 0.0, []
    kept = [s for s in samples if now - s[0] <= TREND_WINDOW_S and now > s[0]]
    kept.append([now, float(demand)])
    kept = kept[-30:]
    if len(kept) < 2 or now - kept[0][0] < 1:
        return 0.0, kept
    # Least-squares slope over every kept pass, not (last - first) / time: two single passes'
    # noise projected over a cold start asked for a node the load did not need.
    mean_t = sum(t for t, _ in kept) / len(kept)
    mean_d = sum(d for _, d in kept) / len(kept)
    var = sum((t - mean_t) ** 2 for t, _ in kept)
    slope = sum((t - mean_t) * (d - mean_d) for t, d in kept) / var
    return max(0.0, slope), kept
