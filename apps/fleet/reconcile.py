"""The reconciler: make the fleet match the catalog, heal what broke, finish what was started.

One pass (every 60 s from Celery beat):
1. nodes whose machine vanished (spot preemption, a dead local process) → terminated, reason
   ``preempted``; nodes unhealthy for too long → terminating;
2. draining nodes whose in-flight requests reached 0 (or whose drain timed out) → stopping (the
   warm pool, apps.fleet.warm) or terminating; stopped nodes past WARM_POOL_TTL_S → terminating;
3. terminating nodes and not yet cleaned-up failed nodes get their (idempotent) teardown task;
4. each active model gets back to max(``min_replicas``, the autoscaler's desired count) usable
   nodes, never above ``max_replicas`` live (apps.fleet.replicas: warm nodes first, then launches
   copying the placement of the node it replaces);
5. SkyPilot clusters with our prefix but no live node (orphans) are torn down after a grace period.
"""

from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass, field

from django.conf import settings
from django.db.models import Q
from django.utils import timezone

from apps.catalog.models import ServedModel
from apps.core import redis as redis_lib
from apps.fleet import demand, replicas, sky, warm
from apps.fleet.enqueue import enqueue_node_poll, enqueue_node_teardown
from apps.fleet.launchers import get_launcher
from apps.fleet.launchers.base import LaunchError
from apps.fleet.models import LIVE_STATUSES, WARM_STATUSES, Launcher, ModelScale, Node, NodeEvent, NodeStatus
from apps.fleet.services import node_terminate
from apps.fleet.transitions import IllegalTransition, node_event, node_transition

log = logging.getLogger(__name__)
S = NodeStatus
USABLE = replicas.USABLE
# Past provisioning the machine must exist; a provisioning node counts once its launch finished.
MACHINE_EXPECTED = frozenset({S.LOADING, S.READY, S.UNHEALTHY, S.DRAINING})


@dataclass
class Report:
    preempted: list[str] = field(default_factory=list)
    replaced_unhealthy: list[str] = field(default_factory=list)
    drained: list[str] = field(default_factory=list)
    teardowns: list[int] = field(default_factory=list)
    launched: list[str] = field(default_factory=list)
    restarted: list[str] = field(default_factory=list)
    stopped: list[str] = field(default_factory=list)
    expired: list[str] = field(default_factory=list)
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
    expected = node.status in MACHINE_EXPECTED | {S.STOPPED} or (
        node.status == S.PROVISIONING and node.launcher_state.get("launched")
    )
    if not expected:
        return False
    if node.launcher == Launcher.SKYPILOT:
        return clusters is not None and node.cluster_name not in clusters
    if node.launcher == Launcher.LOCAL:
        return get_launcher(Launcher.LOCAL).exists(node) is False
    return False


def heal_nodes(
    report: Report, clusters: dict[str, sky.ClusterRecord] | None, inflight: dict[int, int] | None = None
) -> None:
    now = timezone.now()
    inflight = inflight or {}
    for node in Node.objects.filter(status__in=MACHINE_EXPECTED | {S.PROVISIONING, S.STOPPED}).select_related(
        "model", "launch_profile"
    ):
        if node.status == S.STOPPED:
            if _vanished(node, clusters) and _move(node, S.TERMINATED, "the stopped machine vanished", report):
                if node.launcher == Launcher.LOCAL:
                    get_launcher(node.launcher).terminate(node)
                report.preempted.append(str(node))
            continue
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
            and (now - node.launch_started_at).total_seconds() > settings.FLEET_LAUNCH_TIMEOUT_S
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
            finish_drain(node, now, inflight, report)


def finish_drain(node: Node, now, inflight: dict[int, int], report: Report, actor: str = "reconciler") -> None:
    """A draining node with nothing left in flight: stopped for the warm pool, or torn down."""
    finished = replicas.drain_finished(node, now, inflight)
    if finished is None:
        return
    _, why = finished
    not_warm = replicas.why_not_warm(node)
    if not_warm is None:
        try:
            warm.node_stop(node=node, actor=actor, reason=why)
        except IllegalTransition as exc:
            report.errors.append(str(exc))
            return
        report.stopped.append(str(node))
    elif _move(node, S.TERMINATING, f"{why}; {not_warm}", report):
        report.drained.append(str(node))


def expire_warm_pool(report: Report) -> None:
    for node in warm.expired():
        try:
            node_terminate(
                node=node, actor="reconciler", reason=f"stopped for over WARM_POOL_TTL_S={settings.WARM_POOL_TTL_S}s"
            )
        except IllegalTransition as exc:
            report.errors.append(str(exc))
            continue
        report.expired.append(str(node))


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


def ensure_replicas(report: Report) -> None:
    """Every active model back to max(min_replicas, desired) usable nodes (up only: scaling down is
    the autoscaler's decision alone)."""
    desired = dict(ModelScale.objects.values_list("model_id", "desired"))
    for model in ServedModel.objects.filter(is_active=True):
        target = max(model.min_replicas, desired.get(model.pk, 0))
        if target <= 0:
            continue
        why = (
            f"{model.name} needs {target} node(s) (min replicas {model.min_replicas}, "
            f"autoscaler {desired.get(model.pk, '-')})"
        )
        outcome = replicas.ensure_model(model=model, target=target, reason=why, actor="reconciler")
        report.launched += outcome.launched
        report.restarted += outcome.restarted
        report.errors += [f"{model.name}: {e}" if not e.startswith(model.name) else e for e in outcome.errors]


def teardown_orphans(report: Report, clusters: dict[str, sky.ClusterRecord] | None) -> None:
    if not clusters:
        return
    pattern = re.compile(rf"^{re.escape(settings.FLEET_CLUSTER_PREFIX)}-\d+$")
    owned = set(
        Node.objects.filter(cluster_name__in=list(clusters))
        .filter(status__in=LIVE_STATUSES | WARM_STATUSES | {S.TERMINATING})
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
    heal_nodes(report, clusters, demand.inflight_by_node(redis_lib.client()))
    expire_warm_pool(report)
    queue_teardowns(report)
    resume_polls(report)
    ensure_replicas(report)
    teardown_orphans(report, clusters)
    return report
