"""The warm pool: a drained node's machine stopped instead of torn down, restarted on scale-up.

A stopped machine bills only its disk (``Node.stopped_hourly_cost``: disk GB times
WARM_POOL_DISK_USD_PER_GB_MONTH / 730 h) and restarts in seconds instead of a cold start's
minute: no new VM, image or vLLM install; the weights stream again from R2. SkyPilot: ``sky.stop``
(refused for spot clusters: those are torn down instead), and the restart relaunches the task onto
the stopped cluster, which SkyPilot starts on the same cloud, region and zone, with a fresh
registration token. Local launcher: the node's process group is paused (SIGSTOP) and resumed
(SIGCONT) as it was. A node stopped longer than WARM_POOL_TTL_S is torn down.
"""

from __future__ import annotations

from datetime import datetime, timedelta

from django.conf import settings
from django.utils import timezone

from apps.fleet.enqueue import enqueue_health_check, enqueue_node_launch, enqueue_node_stop
from apps.fleet.launchers import get_launcher
from apps.fleet.launchers.base import LaunchError
from apps.fleet.lifecycle import stopped_hourly_cost as stopped_hourly_cost
from apps.fleet.models import Node, NodeStatus
from apps.fleet.transitions import node_fail, node_transition


def node_stop(*, node: Node, actor: str = "system", reason: str = "drained") -> Node:
    """draining → stopping; the stop itself runs in a task (apps.fleet.lifecycle.stop_node)."""
    node = node_transition(node=node, to=NodeStatus.STOPPING, reason=f"{reason}; stopping (warm pool)", actor=actor)
    enqueue_node_stop(node_id=node.pk)
    return node


def node_restart(*, node: Node, actor: str = "system", reason: str = "scale up") -> Node:
    """A stopped node back into service. Its ready_at is measured again from now (a warm start)."""
    now = timezone.now()
    launcher = get_launcher(node.launcher)
    fields: dict[str, object] = {
        "restart_requested_at": now,
        "warm_starts": node.warm_starts + 1,
        "ready_at": None,
        "consecutive_failures": 0,
        "requests_running": 0,
        "requests_waiting": 0,
        "kv_cache_usage": None,
    }
    why = f"warm restart: {reason}"
    if launcher.restarts_in_place:
        # The process resumes as it was: registered, same endpoint; the health check takes it to ready.
        node = node_transition(
            node=node, to=NodeStatus.LOADING, reason=why, actor=actor, expected_from=NodeStatus.STOPPED, **fields
        )
        try:
            launcher.resume(node)
        except LaunchError as exc:
            node_fail(node=node, reason=f"warm restart failed: {exc.reason}", actor=actor)
            raise
        enqueue_health_check(node_ids=[node.pk])
        return node
    # SkyPilot: the launch step relaunches onto the stopped cluster with a fresh registration token
    # (the node registers again) and follows it like any launch.
    state = {
        **node.launcher_state,
        "launch_retry_pending": True,
        "warm_restart": True,
        "launched": False,
        "launch_request_id": "",
        "stop_request_id": "",
        "launch_api_retries": 0,
        "poll_api_retries": 0,
    }
    node = node_transition(
        node=node,
        to=NodeStatus.PROVISIONING,
        reason=why,
        actor=actor,
        expected_from=NodeStatus.STOPPED,
        launcher_state=state,
        registered_at=None,
        endpoint_url="",
        provisioned_at=None,
        weights_loaded_at=None,
        **fields,
    )
    enqueue_node_launch(node_id=node.pk)
    return node


def expired(now: datetime | None = None) -> list[Node]:
    """Stopped nodes kept past WARM_POOL_TTL_S."""
    now = now or timezone.now()
    limit = now - timedelta(seconds=settings.WARM_POOL_TTL_S)
    return list(Node.objects.filter(status=NodeStatus.STOPPED, stopped_at__lt=limit))
