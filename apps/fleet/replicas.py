"""Bring a model's nodes to a target count: the one place that launches, restarts warm nodes and
drains for replica counts. The autoscaler calls it with its desired count (up and down), the
reconciler with max(min_replicas, desired) (up only: replacing what broke).

Up: restart stopped (warm) nodes first, newest first, then launch new ones copying the last
node's placement, on spot or on-demand as the model's spot fallback says. Down (static nodes
never: staff registered them by hand): the least useful
first: nodes that serve nothing yet (starting, unhealthy), then ready nodes by load (vLLM's running
+ waiting and the gateway's in-flight count), on-demand before spot when equal. Ready nodes are
drained, never killed: a draining node leaves the routing at once and finishes its streams.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta

from django.conf import settings
from django.db import transaction
from django.db.models import Max
from django.utils import timezone

from apps.catalog.models import ServedModel
from apps.fleet.launchers import get_launcher
from apps.fleet.launchers.base import LaunchError
from apps.fleet.models import LIVE_STATUSES, WARM_STATUSES, Launcher, Node, NodeEvent, NodeStatus
from apps.fleet.placement import Placement
from apps.fleet.services import node_drain, node_request_launch, node_terminate
from apps.fleet.transitions import IllegalTransition, node_event
from apps.fleet.warm import node_restart

log = logging.getLogger(__name__)
S = NodeStatus
# Nodes that serve or will serve soon: what a target counts.
USABLE = frozenset({S.PENDING, S.PROVISIONING, S.LOADING, S.READY, S.UNHEALTHY})
CAPACITY_FAILURE = "no capacity"  # how apps.fleet.sky words a ResourcesUnavailableError
PREEMPTED = "preempted"  # how the reconciler words a vanished machine
WARM_RESTART_FAILED = "warm restart failed"  # how apps.fleet.warm words a resume that failed


@dataclass
class Outcome:
    launched: list[str] = field(default_factory=list)
    restarted: list[str] = field(default_factory=list)
    drained: list[str] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def template(model: ServedModel) -> Node | None:
    """The most recent launched node of the model, whose placement a new node copies."""
    return Node.objects.filter(model=model).exclude(launcher=Launcher.STATIC).order_by("-id").first()


def relaunch_brake(model: ServedModel, now: datetime, *, on_demand: bool = False) -> str | None:
    """Why not to launch the model's nodes right now, or None. Failed launches are counted per
    model over FLEET_RELAUNCH_FAILURE_WINDOW_S (hours: a failure shows only when its job dies,
    which can be an hour after the launch), since the model last had a ready node; each one
    doubles the wait before the next attempt, and FLEET_RELAUNCH_MAX_FAILURES stop it.
    ``on_demand``: spot launches that failed for capacity say nothing about an on-demand one."""
    since = now - timedelta(seconds=settings.FLEET_RELAUNCH_FAILURE_WINDOW_S)
    last_ready = Node.objects.filter(model=model, ready_at__isnull=False).aggregate(t=Max("ready_at"))["t"]
    if last_ready is not None and last_ready > since:
        since = last_ready  # it worked since: older failures say nothing about the next launch
    # A stopped node that could not be resumed says nothing about launching a new one.
    failed = Node.objects.filter(model=model, status=S.FAILED, status_changed_at__gte=since).exclude(
        status_reason__startswith=WARM_RESTART_FAILED
    )
    if on_demand:
        failed = failed.exclude(use_spot=True, status_reason__startswith=CAPACITY_FAILURE)
    failed_at = list(failed.order_by("-status_changed_at").values_list("status_changed_at", flat=True))
    if not failed_at:
        return None
    window_h = settings.FLEET_RELAUNCH_FAILURE_WINDOW_S / 3600
    if len(failed_at) >= settings.FLEET_RELAUNCH_MAX_FAILURES:
        # Relaunching into the same error (no credentials, no capacity, a model that cannot load)
        # helps nobody and costs GPU hours.
        return (
            f"{len(failed_at)} launches failed in the last {window_h:g} h; not replacing until a node of it "
            "is ready again (launch one by hand once the cause is fixed)"
        )
    wait = settings.FLEET_RELAUNCH_BACKOFF_S * 2 ** (len(failed_at) - 1)
    waited = (now - failed_at[0]).total_seconds()
    if waited < wait:
        return f"{len(failed_at)} launch(es) failed in the last {window_h:g} h; next attempt in {wait - waited:.0f} s"
    return None


def spot_choice(model: ServedModel, last: Node | None, now: datetime) -> tuple[bool, str]:
    """(launch on spot?, why, when the fallback decided). Without spot_fallback the last node's
    choice is kept. With it, spot unless, within spot_fallback_window_s, the model's spot nodes
    were preempted spot_fallback_preemptions times or a spot launch failed for capacity (and no
    spot node got ready since): then on-demand, until the window has passed (the cool-off)."""
    if not model.spot_fallback:
        return (last.use_spot if last is not None else True), ""
    window = model.spot_fallback_window_s
    since = now - timedelta(seconds=window)
    spot = Node.objects.filter(model=model, use_spot=True, status_changed_at__gte=since)
    preempted = spot.filter(status__in=[S.TERMINATING, S.TERMINATED], status_reason__startswith=PREEMPTED).count()
    if preempted >= model.spot_fallback_preemptions:
        return False, (
            f"on-demand: {preempted} spot preemption(s) in the last {window / 60:g} min "
            f"(fallback at {model.spot_fallback_preemptions}); spot again once the window has passed"
        )
    no_capacity = spot.filter(status=S.FAILED, status_reason__startswith=CAPACITY_FAILURE)
    failure = no_capacity.order_by("-status_changed_at").first()
    if failure is not None:
        ready_since = Node.objects.filter(model=model, use_spot=True, ready_at__gt=failure.status_changed_at).exists()
        if not ready_since:
            return False, (
                f"on-demand: a spot launch ({failure}) failed for capacity "
                f"{(now - failure.status_changed_at).total_seconds():.0f} s ago; spot again after {window / 60:g} min"
            )
    return True, ""


def _load(node: Node, inflight: dict[int, int]) -> int:
    return node.requests_running + node.requests_waiting + inflight.get(node.pk, 0)


def ensure_model(
    *,
    model: ServedModel,
    target: int,
    reason: str,
    actor: str,
    inflight: dict[int, int] | None = None,
    allow_down: bool = False,
) -> Outcome:
    """Bring ``model`` to ``target`` usable nodes (never above max_replicas live). The model row is
    locked meanwhile, so the autoscaler and the reconciler never both act on one model at once."""
    out = Outcome()
    inflight = inflight or {}
    with transaction.atomic():
        ServedModel.objects.select_for_update().filter(pk=model.pk).first()
        nodes = list(Node.objects.filter(model=model, status__in=LIVE_STATUSES | WARM_STATUSES))
        usable = [n for n in nodes if n.status in USABLE]
        live = sum(n.status in LIVE_STATUSES for n in nodes)
        if len(usable) < target:
            missing = min(target - len(usable), model.max_replicas - live)
            if missing > 0:
                _scale_up(model, missing, nodes, reason, actor, out)
        elif allow_down and len(usable) > target:
            _scale_down(usable, len(usable) - target, reason, actor, inflight, out)
    return out


def _scale_up(model: ServedModel, missing: int, nodes: list[Node], reason: str, actor: str, out: Outcome) -> None:
    now = timezone.now()
    warm = sorted(
        (n for n in nodes if n.status == S.STOPPED),
        key=lambda n: n.stopped_at or n.status_changed_at,
        reverse=True,
    )
    for node in warm[:missing]:
        try:
            node_restart(node=node, actor=actor, reason=reason)
        except (IllegalTransition, LaunchError) as exc:
            out.errors.append(f"{node}: warm restart failed: {getattr(exc, 'reason', exc)}")
            continue
        out.restarted.append(str(node))
        missing -= 1
    if missing <= 0:
        return
    last = template(model)
    use_spot, why = spot_choice(model, last, now)
    brake = relaunch_brake(model, now, on_demand=not use_spot)
    if brake is not None:
        out.errors.append(f"{model.name}: {brake}")
        return
    placement = replace(Placement.of(last), use_spot=use_spot) if last is not None else Placement(use_spot=use_spot)
    try:
        new = node_request_launch(model=model, placement=placement, count=missing, actor=actor)
    except Exception as exc:  # a validation error (max replicas, inactive model) or a bad placement
        out.errors.append(f"{model.name}: could not launch: {exc}")
        return
    message = reason + (f"; {why}" if why else "")
    if last is not None and last.status in {S.TERMINATED, S.TERMINATING, S.FAILED}:
        first_line = last.status_reason.splitlines()[0][:120] if last.status_reason else ""
        message += f"; replaces {last} ({last.status}: {first_line})"
    for node in new:
        node_event(node=node, kind=NodeEvent.Kind.ACTION, actor=actor, message=message)
        out.launched.append(str(node))


def _scale_down(
    usable: list[Node], excess: int, reason: str, actor: str, inflight: dict[int, int], out: Outcome
) -> None:
    def order(node: Node) -> tuple[int, int, bool, int]:
        # Serving nothing yet first, then the least loaded; on-demand (dearer) before spot.
        return (node.status == S.READY, _load(node, inflight), node.use_spot, -node.pk)

    # A static node is capacity staff registered by hand: it counts, but is never scaled away.
    candidates = [n for n in usable if n.launcher != Launcher.STATIC]
    for node in sorted(candidates, key=order)[:excess]:
        try:
            if node.status in {S.READY, S.UNHEALTHY}:
                node_drain(node=node, actor=actor, reason=f"scale down: {reason}")
            else:
                node_terminate(node=node, actor=actor, reason=f"scale down before ready: {reason}")
        except IllegalTransition as exc:
            out.errors.append(str(exc))
            continue
        out.drained.append(str(node))


def drain_finished(node: Node, now: datetime, inflight: dict[int, int]) -> tuple[bool, str] | None:
    """For a draining node: (done, why) once no request is in flight (vLLM's count from a health
    check taken after the drain began, and the gateway's own count) or the drain timed out."""
    waited = (now - node.status_changed_at).total_seconds()
    idle = (
        node.last_health_at is not None
        and node.last_health_at > node.status_changed_at
        and node.requests_running == 0
        and inflight.get(node.pk, 0) == 0
    )
    if idle:
        return True, "drained: no requests in flight"
    if waited > settings.FLEET_DRAIN_TIMEOUT_S:
        return True, f"drain timed out after {settings.FLEET_DRAIN_TIMEOUT_S}s with {node.requests_running} in flight"
    return None


def why_not_warm(node: Node) -> str | None:
    """Why a drained node is torn down rather than stopped, or None when it joins the warm pool."""
    if not settings.WARM_POOL_TTL_S:
        return "warm pool off (WARM_POOL_TTL_S=0)"
    if not node.model.warm_pool:
        return "the model keeps no warm pool"
    if node.use_spot:
        # SkyPilot refuses to stop spot clusters (sky.stop raises NotSupportedError, GCP aside).
        return "spot nodes cannot be stopped"
    if not get_launcher(node.launcher).can_stop(node):
        return f"the {node.launcher} launcher cannot stop a node"
    return None
