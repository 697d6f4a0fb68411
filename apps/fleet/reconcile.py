"""The reconciler: make the fleet match the catalog, heal what broke, finish what was started.

One pass (every 60 s from Celery beat):
1. nodes whose machine vanished (spot preemption, a dead local process) → terminated, reason
   ``preempted``; nodes unhealthy for too long → terminating;
2. draining nodes whose in-flight requests reached 0 (or whose drain timed out) → terminating;
3. terminating nodes and not yet cleaned-up failed nodes get their (idempotent) teardown task;
4. each active model gets back to ``min_replicas`` usable nodes, never above ``max_replicas`` live,
   copying the placement of the node it replaces;
5. SkyPilot clusters with our prefix but no live node (orphans) are torn down after a grace period.
"""

from __future__ import annotations

import logging
import re
import time
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import timedelta

from django.conf import settings
from django.db.models import Max, Q
from django.utils import timezone

from apps.catalog.models import ServedModel
from apps.fleet import sky
from apps.fleet.enqueue import enqueue_node_poll, enqueue_node_teardown
from apps.fleet.launchers import get_launcher
from apps.fleet.launchers.base import LaunchError
from apps.fleet.models import LIVE_STATUSES, Launcher, Node, NodeEvent, NodeStatus
from apps.fleet.placement import Placement
from apps.fleet.services import node_request_launch
from apps.fleet.transitions import IllegalTransition, node_event, node_transition

log = logging.getLogger(__name__)
S = NodeStatus
# Nodes that serve or will serve soon: they count towards min_replicas.
USABLE = frozenset({S.PENDING, S.PROVISIONING, S.LOADING, S.READY, S.UNHEALTHY})
# Past provisioning the machine must exist; a provisioning node counts once its launch finished.
MACHINE_EXPECTED = frozenset({S.LOADING, S.READY, S.UNHEALTHY, S.DRAINING})


@dataclass
class Report:
    preempted: list[str] = field(default_factory=list)
    replaced_unhealthy: list[str] = field(default_factory=list)
    drained: list[str] = field(default_factory=list)
    teardowns: list[int] = field(default_factory=list)
    launched: list[str] = field(default_factory=list)
    orphans: list[str] = field(default_factory=list)
    resumed_polls: list[int] = field(default_factory=list)
    errors: list[str] = field(default_factory=list)


def _move(node: Node, to: str, reason: str, report: Report) -> bool:
    try:
        node_transition(node=node, to=to, reason=reason, actor="reconciler", expected_from=node.status)
        return True
    except IllegalTransition as exc:
        report.errors.append(str(exc))
        return False


def _sky_clusters(report: Report) -> dict[str, sky.ClusterRecord] | None:
    if (
        not Node.objects.filter(launcher=Launcher.SKYPILOT).exclude(status__in=[S.TERMINATED]).exists()
        and not settings.SKYPILOT_API_SERVER_ENDPOINT
    ):
        return {}
    try:
        prefix = f"{settings.FLEET_CLUSTER_PREFIX}-"
        return {c.name: c for c in sky.clusters(refresh=True) if c.name.startswith(prefix)}
    except (LaunchError, sky.ClusterMissing) as exc:
        report.errors.append(f"SkyPilot status unavailable: {getattr(exc, 'reason', exc)}")
        return None  # unknown: do not call anything vanished


def _vanished(node: Node, clusters: dict[str, sky.ClusterRecord] | None) -> bool:
    expected = node.status in MACHINE_EXPECTED or (
        node.status == S.PROVISIONING and node.launcher_state.get("launched")
    )
    if not expected:
        return False
    if node.launcher == Launcher.SKYPILOT:
        return clusters is not None and node.cluster_name not in clusters
    if node.launcher == Launcher.LOCAL:
        return get_launcher(Launcher.LOCAL).exists(node) is False
    return False


def heal_nodes(report: Report, clusters: dict[str, sky.ClusterRecord] | None) -> None:
    now = timezone.now()
    for node in Node.objects.filter(status__in=MACHINE_EXPECTED | {S.PROVISIONING}).select_related("model"):
        if _vanished(node, clusters):
            if _move(node, S.TERMINATING, "preempted: the machine vanished", report) and _move(
                node, S.TERMINATED, "preempted", report
            ):
                if node.launcher == Launcher.LOCAL:
                    get_launcher(node.launcher).terminate(node)  # reap what is left of its process group
                report.preempted.append(str(node))
            continue
        if (
            node.status in {S.PROVISIONING, S.LOADING}
            and (now - node.requested_at).total_seconds() > settings.FLEET_LAUNCH_TIMEOUT_S
        ):
            # Stuck (lost launch, a node that never registered, weights that never loaded).
            _move(node, S.FAILED, f"not ready within {settings.FLEET_LAUNCH_TIMEOUT_S}s of launch", report)
            continue
        if (
            node.launcher == Launcher.SKYPILOT
            and clusters
            and node.status in MACHINE_EXPECTED
            and getattr(clusters.get(node.cluster_name or ""), "status", "") == "STOPPED"
        ):
            # A stopped spot instance (preempted with stop semantics) serves nothing but still bills disk.
            if _move(node, S.TERMINATING, "preempted: cluster stopped", report):
                report.preempted.append(str(node))
            continue
        limit = settings.FLEET_REPLACE_UNHEALTHY_AFTER_S
        if (
            node.status == S.UNHEALTHY
            and (now - node.status_changed_at).total_seconds() > limit
            and _move(node, S.TERMINATING, f"unhealthy for over {limit}s", report)
        ):
            report.replaced_unhealthy.append(str(node))
        if node.status == S.DRAINING:
            waited = (now - node.status_changed_at).total_seconds()
            idle = (
                node.last_health_at is not None
                and node.last_health_at > node.status_changed_at
                and node.requests_running == 0
            )
            if idle or waited > settings.FLEET_DRAIN_TIMEOUT_S:
                why = (
                    "drained: no requests in flight"
                    if idle
                    else f"drain timed out after {settings.FLEET_DRAIN_TIMEOUT_S}s "
                    f"with {node.requests_running} in flight"
                )
                if _move(node, S.TERMINATING, why, report):
                    report.drained.append(str(node))


def queue_teardowns(report: Report) -> None:
    # Nodes tearing down, failed ones, and terminated ones whose teardown staff forced. "Not torn
    # down" is "not in the torn-down set" (a missing key must count as not torn down; a negated key
    # lookup is NULL for it), which also runs on SQLite, where JSON ``contains`` does not exist.
    candidates = Node.objects.filter(
        Q(status__in=[S.TERMINATING, S.FAILED]) | Q(status=S.TERMINATED, launcher_state__teardown_pending=True)
    )
    torn_down = candidates.filter(launcher_state__torn_down=True).values("pk")
    pending = candidates.exclude(pk__in=torn_down).values_list("pk", "launcher_state")
    busy_until = time.time() - 3 * settings.FLEET_LAUNCH_POLL_S
    for node_id, state in pending:
        if float(state.get("teardown_at") or 0) > busy_until:
            continue  # a teardown chain is following this node right now

        report.teardowns.append(node_id)
        enqueue_node_teardown(node_id=node_id)


def resume_polls(report: Report) -> None:
    """Re-queue the poll of an asynchronous launch whose poll chain was lost (e.g. a worker restart)."""
    stale_before = time.time() - 3 * settings.FLEET_LAUNCH_POLL_S
    rows = Node.objects.filter(launcher=Launcher.SKYPILOT, status__in=[S.PROVISIONING, S.LOADING]).values_list(
        "pk", "launcher_state"
    )
    for node_id, state in rows:
        # The poll chain follows the launch, then the node's job until it is ready.
        if not (state.get("launch_request_id") or state.get("adopted_existing_cluster")):
            continue
        if float(state.get("poll_at") or 0) < stale_before:
            report.resumed_polls.append(node_id)
            enqueue_node_poll(node_id=node_id)


def _template(model: ServedModel) -> Node | None:
    """The most recent node of the model, whose placement a replacement copies."""
    return Node.objects.filter(model=model).exclude(launcher=Launcher.STATIC).order_by("-id").first()


def _relaunch_brake(model: ServedModel, now) -> str | None:
    """Why not to replace the model's nodes right now, or None. Failed launches are counted per
    model over FLEET_RELAUNCH_FAILURE_WINDOW_S (hours: a failure shows only when its job dies,
    which can be an hour after the launch), since the model last had a ready node; each one
    doubles the wait before the next attempt, and FLEET_RELAUNCH_MAX_FAILURES stop it."""
    since = now - timedelta(seconds=settings.FLEET_RELAUNCH_FAILURE_WINDOW_S)
    last_ready = Node.objects.filter(model=model, ready_at__isnull=False).aggregate(t=Max("ready_at"))["t"]
    if last_ready is not None and last_ready > since:
        since = last_ready  # it worked since: older failures say nothing about the next launch
    failed_at = list(
        Node.objects.filter(model=model, status=S.FAILED, status_changed_at__gte=since)
        .order_by("-status_changed_at")
        .values_list("status_changed_at", flat=True)
    )
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


def ensure_replicas(report: Report) -> None:
    live: defaultdict[int, int] = defaultdict(int)
    usable: defaultdict[int, int] = defaultdict(int)
    for model_id, status in Node.objects.filter(status__in=LIVE_STATUSES).values_list("model_id", "status"):
        live[model_id] += 1
        usable[model_id] += status in USABLE
    now = timezone.now()
    for model in ServedModel.objects.filter(is_active=True, min_replicas__gt=0):
        missing = min(model.min_replicas - usable[model.pk], model.max_replicas - live[model.pk])
        if missing <= 0:
            continue
        brake = _relaunch_brake(model, now)
        if brake is not None:
            report.errors.append(f"{model.name}: {brake}")
            continue
        template = _template(model)
        try:
            nodes = node_request_launch(
                model=model, placement=Placement.of(template) if template else None, count=missing, actor="reconciler"
            )
        except Exception as exc:  # one model's problem must not stop the others
            report.errors.append(f"{model.name}: could not launch replacements: {exc}")
            continue
        why = f"{model.name} had {usable[model.pk]} of {model.min_replicas} required node(s)"
        if template is not None and template.status in {S.TERMINATED, S.TERMINATING, S.FAILED}:
            first_line = template.status_reason.splitlines()[0][:120] if template.status_reason else ""
            why += f"; replaces {template} ({template.status}: {first_line})"
        for node in nodes:
            node_event(node=node, kind=NodeEvent.Kind.ACTION, actor="reconciler", message=why)
            report.launched.append(str(node))


def teardown_orphans(report: Report, clusters: dict[str, sky.ClusterRecord] | None) -> None:
    if not clusters:
        return
    pattern = re.compile(rf"^{re.escape(settings.FLEET_CLUSTER_PREFIX)}-\d+$")
    owned = set(
        Node.objects.filter(cluster_name__in=list(clusters))
        .filter(status__in=LIVE_STATUSES | {S.TERMINATING})
        .values_list("cluster_name", flat=True)
    )
    now = time.time()
    for name, record in clusters.items():
        if name in owned or not pattern.match(name):
            continue
        age = now - record.launched_at if record.launched_at else None
        if age is not None and age < settings.FLEET_ORPHAN_GRACE_S:
            continue  # possibly a launch whose node row is about to be saved
        try:
            sky.submit_down(name)
        except (LaunchError, sky.ClusterMissing) as exc:
            report.errors.append(f"orphan {name}: {getattr(exc, 'reason', exc)}")
            continue
        report.orphans.append(name)
        node = Node.objects.filter(cluster_name=name).first()
        if node is not None:
            node_event(
                node=node,
                kind=NodeEvent.Kind.ACTION,
                actor="reconciler",
                message=f"orphan cluster {name} (node {node.status}) torn down",
            )
        log.warning("tore down orphan SkyPilot cluster %s", name)


def reconcile() -> Report:
    report = Report()
    clusters = _sky_clusters(report)
    heal_nodes(report, clusters)
    queue_teardowns(report)
    resume_polls(report)
    ensure_replicas(report)
    teardown_orphans(report, clusters)
    return report
