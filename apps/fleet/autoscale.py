"""The autoscaler: follow each model's demand with its number of nodes.

Every FLEET_AUTOSCALE_INTERVAL_S (beat), and at once when the gateway holds a request for a model
with no ready node (apps.fleet.enqueue.enqueue_autoscale), one pass:

1. reads the load: per node, vLLM's running/waiting requests and KV-cache use (health checks);
   from Redis, the gateway's in-flight requests per node and the requests it holds per model
   (apps.fleet.demand); the measured cold and warm starts of the model's accelerator; the mean
   TTFT and decode time of the last minute's requests (queue wait and service time);
2. decides the desired number of nodes (``decide`` in apps.fleet.autoscale_rule: a pure function,
   table-tested; docs/fleet.md "The decision"): capacity for the requests being served, or for the
   arrival rate a saturated queue reveals, plus their growth over the cold start, at
   target_ongoing per node; held requests ask for one node; hysteresis: up at once, down to the
   window's highest want after scale_down_window_s (a few warm starts when the drained nodes stop
   warm), to zero only after idle_to_zero_s without a request;
3. stores the decision (ModelScale: desired, actual, reason, inputs; ScaleDecision when it
   changed) and hands the target to apps.fleet.replicas, which launches, restarts warm nodes or
   drains: the one writer of node state for replica counts (the reconciler calls it too).

Two passes never run at once (a Redis lock; the model's ModelScale row is also locked while it
is decided), so two triggers in the same second decide once.
"""

from __future__ import annotations

import logging
import statistics
import time
import uuid
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Avg, F
from django.utils import timezone

from apps.catalog.models import ServedModel
from apps.core import redis as redis_lib
from apps.fleet import demand, reconcile, replicas
from apps.fleet.autoscale_rule import Load, Memory, Policy, decide, trend
from apps.fleet.enqueue import enqueue_health_check
from apps.fleet.models import LIVE_STATUSES, WARM_STATUSES, Launcher, ModelScale, Node, NodeStatus, ScaleDecision
from apps.metering.models import UsageRecord

log = logging.getLogger(__name__)
S = NodeStatus
STARTING = frozenset({S.PENDING, S.PROVISIONING, S.LOADING})
# Passes whose demand makes the sustained level (the lowest of them): one pass's spike is noise.
RECENT_PASSES = 3
# Cold (and warm) starts looked at per accelerator.
COLD_START_SAMPLE = 20
QUEUE_WAIT_WINDOW_S = 60


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


def _timings(model_id: int, now: datetime) -> tuple[float | None, float | None]:
    """(mean TTFT, mean time after the first token) of the model's last minute of requests, in
    seconds: the queue wait estimate and a node's service time per request (its decode; the queue
    wait is before the first token, so it is left out)."""
    means = UsageRecord.objects.filter(
        model_id=model_id,
        created_at__gte=now - timedelta(seconds=QUEUE_WAIT_WINDOW_S),
        ttft_ms__isnull=False,
        latency_ms__isnull=False,
    ).aggregate(ttft=Avg("ttft_ms"), service=Avg(F("latency_ms") - F("ttft_ms")))
    ttft, service = means["ttft"], means["service"]
    return (
        None if ttft is None else float(ttft) / 1000.0,
        float(service) / 1000.0 if service is not None and service > 0 else None,
    )


def read_load(model: ServedModel, nodes: list[Node], *, inflight: dict[int, int], held: int, now: datetime) -> Load:
    ready = [n for n in nodes if n.status == S.READY]
    queue_wait_s, service_s = _timings(model.pk, now)
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
        queue_wait_s=queue_wait_s if model.target_queue_wait_s else None,
        service_s=service_s,
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
        last = samples[-RECENT_PASSES:] if len(samples) >= 2 or after_hold else []
        span = last[-1][0] - last[0][0] if last else 0.0
        step = last[-1][0] - last[-2][0] if len(last) >= 2 else 0.0
        load = replace(load, trend_per_s=rate, recent=tuple(s[1] for s in last), recent_span_s=span, last_step_s=step)
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
            "service_s": load.service_s,
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
