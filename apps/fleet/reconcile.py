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
from functools import partial

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from apps.catalog.models import Model
from apps.fleet import sky
from apps.fleet.launchers import get_launcher
from apps.fleet.launchers.base import LaunchError
from apps.fleet.models import LIVE_STATUSES, Launcher, Node, NodeEvent, NodeStatus
from apps.fleet.services import (
    IllegalTransition,
    node_event,
    node_request_launch,
    node_transition,
)

log = logging.getLogger(__name__)
S = NodeStatus
# Nodes that serve or will serve soon: they count towards min_replicas.
USABLE = frozenset({S.PENDING, S.PROVISIONING, S.LOADING, S.READY, S.UNHEALTHY})
# Past provisioning the machine must exist; a provisioning node counts once its launch finished.
MACHINE_EXPECTED = frozenset({S.LOADING, S.READY, S.UNHEALTHY, S.DRAINING})
MAX_RECENT_FAILURES = 3
FAILURE_WINDOW_S = 15 * 60


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
    if not Node.objects.filter(launcher=Launcher.SKYPILOT).exclude(status__in=[S.TERMINATED]).exists() \
            and not settings.SKYPILOT_API_SERVER_ENDPOINT:
        return {}
    try:
        prefix = f"{settings.FLEET_CLUSTER_PREFIX}-"
        return {c.name: c for c in sky.clusters(refresh=True) if c.name.startswith(prefix)}
    except (LaunchError, sky.ClusterMissing) as exc:
        report.errors.append(f"SkyPilot status unavailable: {getattr(exc, 'reason', exc)}")
        return None  # unknown: do not call anything vanished


def _vanished(node: Node, clusters: dict[str, sky.ClusterRecord] | None) -> bool:
    expected = node.status in MACHINE_EXPECTED or (
        node.status == S.PROVISIONING and node.launcher_state.get("launched"))
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
            if _move(node, S.TERMINATING, "preempted: the machine vanished", report) \
                    and _move(node, S.TERMINATED, "preempted", report):
                if node.launcher == Launcher.LOCAL:
                    get_launcher(node.launcher).terminate(node)  # reap what is left of its process group
                report.preempted.append(str(node))
            continue
        if node.status in {S.PROVISIONING, S.LOADING} and \
                (now - node.requested_at).total_seconds() > settings.FLEET_LAUNCH_TIMEOUT_S:
            # Stuck (lost launch, a node that never registered, weights that never loaded).
            _move(node, S.FAILED, f"not ready within {settings.FLEET_LAUNCH_TIMEOUT_S}s of launch", report)
            continue
        if node.launcher == Launcher.SKYPILOT and clusters and node.status in MACHINE_EXPECTED \
                and getattr(clusters.get(node.cluster_name or ""), "status", "") == "STOPPED":
            # A stopped spot instance (preempted with stop semantics) serves nothing but still bills disk.
            if _move(node, S.TERMINATING, "preempted: cluster stopped", report):
                report.preempted.append(str(node))
            continue
        limit = settings.FLEET_REPLACE_UNHEALTHY_AFTER_S
        if node.status == S.UNHEALTHY and (now - node.status_changed_at).total_seconds() > limit \
                and _move(node, S.TERMINATING, f"unhealthy for over {limit}s", report):
            report.replaced_unhealthy.append(str(node))
        if node.status == S.DRAINING:
            waited = (now - node.status_changed_at).total_seconds()
            idle = node.last_health_at is not None and node.last_health_at > node.status_changed_at \
                and node.requests_running == 0
            if idle or waited > settings.FLEET_DRAIN_TIMEOUT_S:
                why = "drained: no requests in flight" if idle else \
                    f"drain timed out after {settings.FLEET_DRAIN_TIMEOUT_S}s with {node.requests_running} in flight"
                if _move(node, S.TERMINATING, why, report):
                    report.drained.append(str(node))


def queue_teardowns(report: Report) -> None:
    from apps.fleet import tasks

    # (``contains`` rather than a key lookup: a missing key must count as "not torn down".)
    pending = Node.objects.filter(
        Q(status__in=[S.TERMINATING, S.FAILED]) & ~Q(launcher_state__contains={"torn_down": True})
    ).values_list("pk", "launcher_state")
    busy_until = time.time() - 3 * settings.FLEET_LAUNCH_POLL_S
    for node_id, state in pending:
        if float(state.get("teardown_at") or 0) > busy_until:
            continue  # a teardown chain is following this node right now

        report.teardowns.append(node_id)
        transaction.on_commit(partial(tasks.node_teardown_task.delay, node_id))


def resume_polls(report: Report) -> None:
    """Re-queue the poll of an asynchronous launch whose poll chain was lost (e.g. a worker restart)."""
    from apps.fleet import tasks

    stale_before = time.time() - 3 * settings.FLEET_LAUNCH_POLL_S
    rows = Node.objects.filter(launcher=Launcher.SKYPILOT, status__in=[S.PROVISIONING, S.LOADING]).values_list(
        "pk", "launcher_state", "endpoint_url")
    for node_id, state, endpoint_url in rows:
        following = state.get("launch_request_id") or state.get("adopted_existing_cluster")
        if not following or (state.get("launched") and endpoint_url):
            continue
        if float(state.get("poll_at") or 0) < stale_before:
            report.resumed_polls.append(node_id)
            transaction.on_commit(partial(tasks.node_launch_poll_task.delay, node_id))


def _template(model: Model) -> Node | None:
    """The most recent node of the model, whose placement a replacement copies."""
    return Node.objects.filter(model=model).exclude(launcher=Launcher.STATIC).order_by("-id").first()


def ensure_replicas(report: Report) -> None:
    live: defaultdict[int, int] = defaultdict(int)
    usable: defaultdict[int, int] = defaultdict(int)
    for model_id, status in Node.objects.filter(status__in=LIVE_STATUSES).values_list("model_id", "status"):
        live[model_id] += 1
        usable[model_id] += status in USABLE
    recent = timezone.now() - timedelta(seconds=FAILURE_WINDOW_S)
    for model in Model.objects.filter(is_active=True, min_replicas__gt=0):
        missing = min(model.min_replicas - usable[model.pk], model.max_replicas - live[model.pk])
        if missing <= 0:
            continue
        failures = Node.objects.filter(model=model, status=S.FAILED, status_changed_at__gte=recent).count()
        if failures >= MAX_RECENT_FAILURES:
            # Relaunching into the same error (no credentials, no capacity) every minute helps nobody.
            report.errors.append(f"{model.name}: {failures} launches failed in the last "
                                 f"{FAILURE_WINDOW_S // 60} min; not replacing until staff relaunch")
            continue
        template = _template(model)
        try:
            nodes = node_request_launch(
                model=model, count=missing, actor="reconciler",
                launcher=template.launcher if template else "",
                cloud=template.cloud if template else "", region=template.region if template else "",
                accelerator=template.accelerator if template else "",
                use_spot=template.use_spot if template else True,
                launch_profile=template.launch_profile if template else None,
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
    owned = set(Node.objects.filter(cluster_name__in=list(clusters))
                .filter(status__in=LIVE_STATUSES | {S.TERMINATING}).values_list("cluster_name", flat=True))
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
            node_event(node=node, kind=NodeEvent.Kind.ACTION, actor="reconciler",
                       message=f"orphan cluster {name} (node {node.status}) torn down")
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
