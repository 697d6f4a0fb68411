"""The autoscaler: follow each model's demand with its number of nodes.

Every FLEET_AUTOSCALE_INTERVAL_S (beat), and at once when the gateway holds a request for a model
with no ready node (apps.fleet.enqueue.enqueue_autoscale), one pass:

1. reads the load: per node, vLLM's running/waiting requests and KV-cache use (health checks);
   from Redis, the gateway's in-flight requests per node and the requests it holds per model
   (apps.fleet.demand); the measured cold start of the model's accelerator; the mean TTFT of the
   last minute's requests (an estimate of the queue wait);
2. decides the desired number of nodes (``decide``: a pure function, table-tested): capacity for
   the requests being served (running + waiting, or the gateway's in-flight count; the lowest of
   the last RECENT_PASSES passes unless a saturated queue grows) plus their growth (least-squares
   slope) over the cold start, at target_ongoing per node, and no new node for a queue that is
   draining; requests held while no node is ready are a backlog the first ready node drains, so
   they ask for one node, not one per target_ongoing. Hysteresis: up at once (or after
   scale_up_window_s), down to the window's highest want once demand stayed lower for
   scale_down_window_s, to zero only after idle_to_zero_s without a request;
3. stores the decision (ModelScale: desired, actual, reason, inputs; ScaleDecision when it
   changed) and hands the target to apps.fleet.replicas, which launches, restarts warm nodes or
   drains: the one writer of node state for replica counts (the reconciler calls it too).

Two passes never run at once (a Redis lock; the model's ModelScale row is also locked while it
is decided), so two triggers in the same second decide once.
"""

from __future__ import annotations

import logging
import math
import statistics
import time
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Avg
from django.utils import timezone

from apps.catalog.models import ServedModel
from apps.core import redis as redis_lib
from apps.fleet import demand, reconcile, replicas
from apps.fleet.enqueue import enqueue_health_check
from apps.fleet.models import LIVE_STATUSES, WARM_STATUSES, Launcher, ModelScale, Node, NodeStatus, ScaleDecision
from apps.metering.models import UsageRecord

log = logging.getLogger(__name__)
S = NodeStatus
STARTING = frozenset({S.PENDING, S.PROVISIONING, S.LOADING})
# Demand samples kept for the trend (seconds) and cold starts looked at per accelerator.
TREND_WINDOW_S = 60.0
# Passes whose demand makes the sustained level (the lowest of them): one pass's spike is noise.
RECENT_PASSES = 3
COLD_START_SAMPLE = 20
QUEUE_WAIT_WINDOW_S = 60


# --- The decision (pure) -------------------------------------------------------------------------


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
    queue_wait_s: float | None = None

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
    if load.recent:
        r = load.recent
        # Saturated and rising now (vLLM queues half a node's target or more): no time to wait
        # for more passes. A request or two waiting on a full batch is the noise of a busy node.
        if len(r) >= 2 and r[-1] > r[0] and load.waiting * 2 >= policy.target_ongoing:
            how += ", queue growing"
        else:
            level = min(level, *r)
            how = f"{level:g} sustained over {len(r)} pass{'es' if len(r) > 1 else ''}"
        # Falling demand (or the first look after no node was ready: the held backlog just moved
        # onto the node) is a queue the ready nodes are draining: no node is added for it.
        draining = len(r) < 2 or r[-1] < r[0]
    projected = level + max(0.0, load.trend_per_s) * load.cold_start_s
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
        why += f" + {load.trend_per_s:.2f}/s × {load.cold_start_s:.0f} s cold start" if load.trend_per_s > 0 else ""
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


# --- Reading the fleet ----------------------------------------------------------------------------


def cold_start_p50(accelerator: str, *, model_id: int | None = None) -> float:
    """Median launch-to-ready time of the last launched nodes on this accelerator (warm restarts
    excluded): the model's own on it when it has some (its weights' size matters), else any
    model's; FLEET_DEFAULT_COLD_START_S until one was measured."""
    return _start_p50(accelerator, model_id=model_id, warm=False) or settings.FLEET_DEFAULT_COLD_START_S


def warm_start_p50(accelerator: str, *, model_id: int | None = None) -> float:
    """Median restart-to-ready time of the last warm restarts on this accelerator (the model's own
    first, like cold_start_p50); FLEET_DEFAULT_WARM_START_S until one was measured."""
    return _start_p50(accelerator, model_id=model_id, warm=True) or settings.FLEET_DEFAULT_WARM_START_S


def _start_p50(accelerator: str, *, model_id: int | None, warm: bool) -> float | None:
    # A node's last start is a warm one when restart_requested_at is set (apps.fleet.warm).
    launched = Node.objects.filter(
        accelerator=accelerator, ready_at__isnull=False, restart_requested_at__isnull=not warm
    ).exclude(launcher=Launcher.STATIC)
    began = "restart_requested_at" if warm else "requested_at"
    for rows in (launched.filter(model_id=model_id) if model_id is not None else launched.none(), launched):
        pairs = rows.order_by("-ready_at").values_list(began, "ready_at")[:COLD_START_SAMPLE]
        seconds = [(ready - start).total_seconds() for start, ready in pairs if ready and start and ready >= start]
        if seconds:
            return float(statistics.median(seconds))
    return None


def _queue_wait(model_id: int, now: datetime) -> float | None:
    mean_ms = UsageRecord.objects.filter(
        model_id=model_id, created_at__gte=now - timedelta(seconds=QUEUE_WAIT_WINDOW_S), ttft_ms__isnull=False
    ).aggregate(v=Avg("ttft_ms"))["v"]
    return None if mean_ms is None else float(mean_ms) / 1000.0


def read_load(model: ServedModel, nodes: list[Node], *, inflight: dict[int, int], held: int, now: datetime) -> Load:
    ready = [n for n in nodes if n.status == S.READY]
    kv = [n.kv_cache_usage for n in ready if n.kv_cache_usage is not None]
    return Load(
        ready=len(ready),
        starting=sum(n.status in STARTING for n in nodes),
        stopped=sum(n.status == S.STOPPED for n in nodes),
        running=sum(n.requests_running for n in ready),
        waiting=sum(n.requests_waiting for n in ready),
        kv_mean=sum(kv) / len(kv) if kv else None,
        inflight=sum(inflight.get(n.pk, 0) for n in nodes),
        held=held,
        cold_start_s=cold_start_p50(model.accelerator, model_id=model.pk),
        warm_start_s=warm_start_p50(model.accelerator, model_id=model.pk),
        # Every ready node could be the one drained (least loaded first): all must stop warm.
        warm_down=bool(ready) and all(replicas.why_not_warm(n) is None for n in ready),
        queue_wait_s=_queue_wait(model.pk, now) if model.target_queue_wait_s else None,
    )


# --- One pass -------------------------------------------------------------------------------------


@dataclass
class Decision:
    model_id: int
    model_name: str
    desired: int
    previous: int
    ready: int
    reason: str
    launched: list[str] = field(default_factory=list)
    restarted: list[str] = field(default_factory=list)
    drained: list[str] = field(default_factory=list)
    error: str = ""


def _lock_key() -> str:
    return f"crosslogic:{demand._db_for(settings.REDIS_URL)}:autoscale-lock"


_RELEASE = "if redis.call('get', KEYS[1]) == ARGV[1] then return redis.call('del', KEYS[1]) end return 0"


def autoscale_run(*, model_id: int | None = None) -> list[Decision]:
    """One pass over every active model (or one). [] when another pass holds the lock."""
    client = redis_lib.client()
    token = uuid.uuid4().hex
    ttl = max(30, settings.FLEET_AUTOSCALE_INTERVAL_S * 6)
    if client is not None:
        try:
            if not client.set(_lock_key(), token, nx=True, ex=ttl):
                return []
        except Exception:
            log.warning("autoscale: Redis lock unavailable; the model rows' locks still serialize passes")
            client = None
    try:
        return _run(model_id, client)
    finally:
        if client is not None:
            try:
                client.eval(_RELEASE, 1, _lock_key(), token)
            except Exception:
                log.warning("autoscale: could not release the lock; it expires by itself")


def _run(model_id: int | None, client) -> list[Decision]:
    held = demand.held_by_model(client)
    inflight = demand.inflight_by_node(client)
    # An inactive model is left alone: staff deactivated it and drain its nodes by hand.
    models = ServedModel.objects.filter(is_active=True)
    if model_id is not None:
        models = models.filter(pk=model_id)
    _finish_drains(list(Node.objects.filter(status=S.DRAINING)), inflight)
    decisions = []
    for model in models:
        try:
            decisions.append(_decide_model(model, inflight=inflight, held=held.get(model.pk, 0)))
        except Exception as exc:  # one model's problem must not stop the others
            log.exception("autoscale: %s failed", model)
            decisions.append(Decision(model.pk, model.name, 0, 0, 0, "", error=f"{type(exc).__name__}: {exc}"))
    return decisions


def _finish_drains(draining: list[Node], inflight: dict[int, int]) -> None:
    """Scale-down finishes here too, not only at the reconciler's next pass (every minute): a
    drained node is stopped or torn down, and one not checked since its drain began gets a check."""
    if not draining:
        return
    report = reconcile.Report()
    now = timezone.now()
    unchecked = []
    for node in Node.objects.filter(pk__in=[n.pk for n in draining], status=S.DRAINING).select_related(
        "model", "launch_profile"
    ):
        reconcile.finish_drain(node, now, inflight, report, actor="autoscaler")
        if node.status == S.DRAINING and (node.last_health_at is None or node.last_health_at <= node.status_changed_at):
            unchecked.append(node.pk)
    if unchecked:
        enqueue_health_check(node_ids=unchecked)
    for error in report.errors:
        log.warning("autoscale: %s", error)


def _decide_model(model: ServedModel, *, inflight: dict[int, int], held: int) -> Decision:
    now = timezone.now()
    with transaction.atomic():
        # The idle clock starts with the first decision, not at the epoch: a model seen for the
        # first time is not "idle for ever".
        scale, created = ModelScale.objects.get_or_create(
            model=model, defaults={"desired": model.min_replicas, "last_busy_at": now}
        )
        scale = ModelScale.objects.select_for_update().get(pk=scale.pk)
        # Read under the row lock: a pass that waited for another one sees what that one did.
        nodes = list(
            Node.objects.filter(model=model, status__in=LIVE_STATUSES | WARM_STATUSES)
            .select_related("model")
            .order_by("pk")
        )
        load = read_load(model, nodes, inflight=inflight, held=held, now=now)
        usable = sum(n.status in replicas.USABLE for n in nodes)
        if created:  # the first decision starts from what there is
            scale.desired = max(model.min_replicas, min(usable, model.max_replicas))
        previous = scale.desired
        if usable > scale.desired:
            # Nodes someone launched by hand (the autoscaler's own scale-down leaves fewer usable
            # nodes at once): adopted, then judged by the scale-down window like any other.
            scale.desired = min(usable, max(model.max_replicas, model.min_replicas))
            log.info("autoscale %s: adopted %d node(s) launched by hand", model.name, usable - previous)
        rate, samples = trend(scale.samples or [], now=time.time(), demand=load.demand, ready=load.ready > 0)
        # The sustained level needs history: none on a model's first look (this pass's count
        # alone), one sample on the first look after no node was ready (the held backlog).
        after_hold = not created and scale.ready == 0
        recent = tuple(s[1] for s in samples[-RECENT_PASSES:]) if len(samples) >= 2 or after_hold else ()
        load = replace(load, trend_per_s=rate, recent=recent)
        memory = Memory(scale.desired, scale.above_since, scale.below_since, scale.below_peak, scale.last_busy_at)
        desired, reason, memory = decide(Policy.of(model), load, memory, now)
        scale.desired, scale.reason = desired, reason
        scale.ready, scale.starting, scale.stopped = load.ready, load.starting, load.stopped
        scale.above_since, scale.below_since = memory.above_since, memory.below_since
        scale.below_peak = memory.below_peak
        scale.last_busy_at, scale.samples, scale.decided_at = memory.last_busy_at, samples, now
        scale.inputs = {
            "demand": load.demand,
            "running": load.running,
            "waiting": load.waiting,
            "inflight": load.inflight,
            "held": load.held,
            "kv_mean": load.kv_mean,
            "queue_wait_s": load.queue_wait_s,
            "cold_start_s": load.cold_start_s,
            "trend_per_s": load.trend_per_s,
        }
        if desired != previous:
            scale.changed_at = now
            ScaleDecision.objects.create(
                model=model, previous=previous, desired=desired, reason=reason, inputs=scale.inputs
            )
            log.info("autoscale %s: %s", model.name, reason)
        scale.save()
        decision = Decision(model.pk, model.name, desired, previous, load.ready, reason)
        outcome = replicas.ensure_model(
            model=model, target=desired, reason=reason, actor="autoscaler", inflight=inflight, allow_down=True
        )
        decision.launched, decision.restarted, decision.drained = outcome.launched, outcome.restarted, outcome.drained
        decision.error = "; ".join(outcome.errors)
    return decision
