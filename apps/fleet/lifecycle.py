"""Launch and teardown, step by step, for the Celery tasks in apps.fleet.tasks.

Each step reads the node, claims its next move with a conditional UPDATE, then talks to the
launcher. Running a step twice (a redelivered task, a double click) is harmless: the second
claim finds nothing to do. Returns tell the task whether to call again later.
"""

from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass
from decimal import Decimal

from django.conf import settings
from django.db import transaction
from django.utils import timezone

from apps.fleet.keys import node_api_key, registration_token_issue
from apps.fleet.launchers import get_launcher
from apps.fleet.launchers.base import LaunchError, Progress, RetryableLaunchError, Secrets
from apps.fleet.launchers.skypilot import disk_size_gb
from apps.fleet.models import Node, NodeEvent, NodeStatus
from apps.fleet.transitions import IllegalTransition, node_event, node_fail, node_transition

log = logging.getLogger(__name__)
MAX_API_RETRIES = 5
HOURS_PER_MONTH = Decimal("730")


@dataclass
class Step:
    again_in: float | None = None  # seconds until the next step should run; None = done
    then: str = ""  # which step: "launch", "poll" or "teardown"


def _save_state(node: Node, **state: object) -> None:
    node.launcher_state = {**node.launcher_state, **state}
    Node.objects.filter(pk=node.pk).update(launcher_state=node.launcher_state, updated_at=timezone.now())


def _api_retry(node: Node, exc: RetryableLaunchError, *, what: str) -> Step:
    retries = int(node.launcher_state.get(f"{what}_api_retries", 0)) + 1
    _save_state(node, **{f"{what}_api_retries": retries})
    if retries > MAX_API_RETRIES:
        raise LaunchError(f"{exc.reason} (gave up after {MAX_API_RETRIES} retries)") from exc
    node_event(node=node, kind=NodeEvent.Kind.ERROR, message=f"{exc.reason}; retry {retries}/{MAX_API_RETRIES}")
    return Step(again_in=min(settings.FLEET_LAUNCH_POLL_S * 2 ** (retries - 1), 300))


def launch_node(node_id: int) -> Step:
    """pending → provisioning, then start the machine. The token is issued in the same claim."""
    node = Node.objects.select_related("model", "launch_profile").get(pk=node_id)
    raw_token, token_hash = registration_token_issue()
    launcher = get_launcher(node.launcher)
    if node.status == NodeStatus.PROVISIONING and node.launcher_state.get("launch_retry_pending"):
        # A launch the SkyPilot API server could not take: claim the retry, with a fresh token.
        state = {**node.launcher_state, "launch_retry_pending": False}
        claimed = Node.objects.filter(
            pk=node.pk, status=NodeStatus.PROVISIONING, launcher_state__launch_retry_pending=True
        ).update(launcher_state=state, registration_token_digest=token_hash)
        if claimed != 1:
            return Step()
        node.launcher_state, node.registration_token_digest = state, token_hash
        return _start(node, launcher, raw_token)
    if node.status != NodeStatus.PENDING:
        return Step()  # launched already, or cancelled
    try:
        node = node_transition(
            node=node,
            to=NodeStatus.PROVISIONING,
            expected_from=NodeStatus.PENDING,
            reason=f"launching via {launcher.name}",
            registration_token_digest=token_hash,
            registered_at=None,
            launcher_state={"launch_claimed_at": timezone.now().isoformat()},
        )
    except IllegalTransition:
        return Step()  # another worker claimed it first
    return _start(node, launcher, raw_token)


def _start(node: Node, launcher, raw_token: str) -> Step:
    try:
        state = launcher.launch(node, Secrets(registration_token=raw_token, vllm_api_key=node_api_key(node.pk)))
    except RetryableLaunchError as exc:
        try:
            step = _api_retry(node, exc, what="launch")
        except LaunchError as final:
            _fail_quietly(node, final.reason)
            return Step()
        _save_state(node, launch_retry_pending=True)
        return Step(again_in=step.again_in, then="launch")
    except LaunchError as exc:
        _fail_quietly(node, exc.reason)
        return Step()
    except Exception as exc:  # never leave a node provisioning because of an unexpected error
        log.exception("launch of node %s failed", node)
        _fail_quietly(node, f"unexpected error while launching: {type(exc).__name__}: {exc}")
        return Step()
    _save_state(node, **state, poll_at=time.time())
    if launcher.asynchronous:
        return Step(again_in=settings.FLEET_LAUNCH_POLL_S, then="poll")
    if not launcher.self_registers:
        # A static endpoint is already up: the health check takes it to ready.
        node_transition(node=node, to=NodeStatus.LOADING, reason="existing endpoint")
    return Step()


def _fail_quietly(node: Node, reason: str) -> None:
    try:
        node_fail(node=node, reason=reason)
    except IllegalTransition:
        log.info("node %s moved on before it could be failed: %s", node, reason)


def poll_launch(node_id: int) -> Step:
    """Follow an asynchronous launch until the machine runs our job, then watch that job until the
    node is ready: a job that dies (setup or vLLM failing) fails the node with its log and tears
    the machine down at once, instead of leaving a GPU up until the launch timeout."""
    node = Node.objects.select_related("model").get(pk=node_id)
    # The node may register (→ loading) before we saw its launch finish; keep going until it is
    # ready (the health check's job from then on).
    if node.status not in {NodeStatus.PROVISIONING, NodeStatus.LOADING}:
        return Step()
    launcher = get_launcher(node.launcher)
    _save_state(node, poll_at=time.time())  # see reconcile.resume_polls
    try:
        result = launcher.poll(node)
    except RetryableLaunchError as exc:
        try:
            return Step(again_in=_api_retry(node, exc, what="poll").again_in, then="poll")
        except LaunchError as final:
            return _failed(node, final.reason)
    except LaunchError as exc:
        return _failed(node, exc.reason)
    except Exception as exc:  # a bug or an SDK surprise must not leave the node polling until the timeout
        log.exception("poll of node %s failed", node)
        return _failed(node, f"unexpected error while following the launch: {type(exc).__name__}: {exc}")
    if node.launcher_state.get("poll_api_retries"):
        _save_state(node, poll_api_retries=0)  # the server answered again: the next outage starts afresh
    if result.progress is Progress.WAITING:
        if (timezone.now() - node.launch_started_at).total_seconds() > settings.FLEET_LAUNCH_TIMEOUT_S:
            return _failed(node, f"launch did not finish within {settings.FLEET_LAUNCH_TIMEOUT_S}s")
        return Step(again_in=settings.FLEET_LAUNCH_POLL_S, then="poll")
    if result.progress is Progress.GONE:
        return _failed(node, result.message or "the machine vanished during launch")
    first_seen = not node.launcher_state.get("launched")
    new_endpoint = result.endpoint_url and not node.endpoint_url
    if first_seen or new_endpoint or result.state:
        with transaction.atomic():
            _save_state(node, launched=True, **result.state)
            fields: dict[str, object] = {"provisioned_at": node.provisioned_at or timezone.now(), **result.placement}
            if new_endpoint:
                fields["endpoint_url"] = result.endpoint_url
            Node.objects.filter(pk=node.pk).update(**fields)
            if first_seen or new_endpoint:
                where = "/".join(
                    str(result.placement[k]) for k in ("cloud", "region", "accelerator") if k in result.placement
                )
                endpoint = fields.get("endpoint_url", node.endpoint_url) or "?"
                node_event(
                    node=node,
                    message=f"machine up{' on ' + where if where else ''}; endpoint {endpoint}; "
                    "waiting for vLLM to register",
                )
            node.endpoint_url = str(fields.get("endpoint_url", node.endpoint_url))
    return _again_unless_late(node)


def _failed(node: Node, reason: str) -> Step:
    """Fail the node and tear its machine down now (the reconciler would, a minute later)."""
    _fail_quietly(node, reason)
    return Step(again_in=1, then="teardown")


def _again_unless_late(node: Node) -> Step:
    if (timezone.now() - node.launch_started_at).total_seconds() > settings.FLEET_LAUNCH_TIMEOUT_S:
        why = "not ready" if node.endpoint_url else "the node's endpoint never became known"
        return _failed(node, f"{why} within {settings.FLEET_LAUNCH_TIMEOUT_S}s of launch")
    return Step(again_in=settings.FLEET_LAUNCH_POLL_S, then="poll")


def teardown_node(node_id: int) -> Step:
    """terminating → (launcher teardown) → terminated. Failed nodes are cleaned up in place."""
    node = Node.objects.get(pk=node_id)
    forced = node.status == NodeStatus.TERMINATED and node.launcher_state.get("teardown_pending")
    if (node.status not in {NodeStatus.TERMINATING, NodeStatus.FAILED} and not forced) or node.launcher_state.get(
        "torn_down"
    ):
        return Step()
    launcher = get_launcher(node.launcher)
    _save_state(node, teardown_at=time.time())  # the reconciler does not queue a second chain meanwhile
    try:
        done = launcher.terminate(node)
    except RetryableLaunchError as exc:
        try:
            return Step(again_in=_api_retry(node, exc, what="teardown").again_in, then="teardown")
        except LaunchError as final:
            node_event(node=node, kind=NodeEvent.Kind.ERROR, message=f"teardown failed: {final.reason}")
            _save_state(node, teardown_api_retries=0)
            return Step()  # the reconciler tries again on its next run
    except Exception as exc:  # a teardown that failed must be retried, never forgotten
        node_event(node=node, kind=NodeEvent.Kind.ERROR, message=f"teardown failed: {exc}")
        _save_state(node, down_request_id="")
        return Step()
    _save_state(node)  # terminate() may have recorded a teardown request id
    if not done:
        return Step(again_in=settings.FLEET_LAUNCH_POLL_S, then="teardown")
    _save_state(node, torn_down=True, teardown_pending=False)
    if forced:
        node_event(node=node, message="machine torn down after the node was forced to terminated")
    elif node.status == NodeStatus.TERMINATING:
        with contextlib.suppress(IllegalTransition):
            node_transition(
                node=node,
                to=NodeStatus.TERMINATED,
                expected_from=NodeStatus.TERMINATING,
                reason=node.status_reason or "torn down",
            )
    else:
        node_event(node=node, message="machine torn down after failure")
    return Step()


def stopped_hourly_cost(node: Node) -> Decimal:
    """What the stopped node's disk costs per hour (the disk SkyPilot gives it)."""
    profile = node.launch_profile
    gb = (profile.disk_size_gb if profile and profile.disk_size_gb else None) or disk_size_gb(node.model.total_bytes)
    rate = Decimal(str(settings.WARM_POOL_DISK_USD_PER_GB_MONTH))
    return (Decimal(gb) * rate / HOURS_PER_MONTH).quantize(Decimal("0.0001"))


def stop_node(node_id: int) -> Step:
    """stopping → (launcher stop) → stopped, its disk cost recorded. A machine that cannot be
    stopped is torn down instead: the warm pool is an optimisation, never a leak."""
    node = Node.objects.select_related("model", "launch_profile").get(pk=node_id)
    if node.status != NodeStatus.STOPPING:
        return Step()
    launcher = get_launcher(node.launcher)
    try:
        done = launcher.stop(node)
    except RetryableLaunchError as exc:
        try:
            return Step(again_in=_api_retry(node, exc, what="stop").again_in, then="stop")
        except LaunchError as final:
            return _stop_failed(node, final.reason)
    except LaunchError as exc:
        return _stop_failed(node, exc.reason)
    except Exception as exc:
        log.exception("stop of node %s failed", node)
        return _stop_failed(node, f"unexpected error while stopping: {type(exc).__name__}: {exc}")
    _save_state(node)  # stop() may have recorded a stop request id
    if not done:
        return Step(again_in=settings.FLEET_LAUNCH_POLL_S, then="stop")
    with contextlib.suppress(IllegalTransition):
        node_transition(
            node=node,
            to=NodeStatus.STOPPED,
            expected_from=NodeStatus.STOPPING,
            reason="stopped (warm pool)",
            stopped_at=timezone.now(),
            stopped_hourly_cost=stopped_hourly_cost(node),
        )
    return Step()


def _stop_failed(node: Node, reason: str) -> Step:
    try:
        node_transition(
            node=node,
            to=NodeStatus.TERMINATING,
            expected_from=NodeStatus.STOPPING,
            reason=f"could not stop ({reason}); tearing down instead",
        )
    except IllegalTransition:
        return Step()
    return Step(again_in=1, then="teardown")
