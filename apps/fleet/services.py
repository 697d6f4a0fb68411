"""Node writes. Every status change goes through node_transition(), which enforces the state
machine with a conditional UPDATE (so two workers cannot both move a node) and logs it."""

from __future__ import annotations

import logging
from datetime import datetime
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from apps.catalog.models import Model
from apps.core import invalidation
from apps.core.secrets import digest as token_digest
from apps.core.secrets import new_token, split_prefix
from apps.fleet.models import LIVE_STATUSES, TRANSITIONS, Launcher, LaunchProfile, Node, NodeEvent, NodeStatus

log = logging.getLogger(__name__)

REGISTRATION_TOKEN_PREFIX = "clr_"  # noqa: S105 - a public prefix, not a secret


def registration_token_issue() -> tuple[str, str]:
    """(raw token for the node, digest we keep)."""
    raw, _visible, token_hash = new_token(REGISTRATION_TOKEN_PREFIX)
    return raw, token_hash


class IllegalTransition(Exception):  # noqa: N818 - reads as the event it reports
    def __init__(self, node: Node, current: str, to: str) -> None:
        super().__init__(f"{node}: cannot go from {current} to {to}")
        self.node, self.current, self.to = node, current, to


# Phase timestamps set the first time a node reaches a status.
_PHASE_FIELDS: dict[str, tuple[str, ...]] = {
    NodeStatus.LOADING: ("provisioned_at",),
    NodeStatus.READY: ("provisioned_at", "weights_loaded_at", "ready_at"),
    NodeStatus.TERMINATED: ("terminated_at",),
}


def node_event(*, node: Node, message: str, kind: str = NodeEvent.Kind.INFO, actor: str = "system") -> NodeEvent:
    return NodeEvent.objects.create(node=node, kind=kind, message=message, actor=actor,
                                    from_status=node.status, to_status=node.status)


def node_create(
    *,
    model: Model,
    launcher: str = "",
    cloud: str = "",
    region: str = "",
    accelerator: str = "",
    use_spot: bool = True,
    hourly_cost: Any = None,
    endpoint_url: str = "",
    actor: str = "system",
) -> Node:
    launcher = launcher or settings.FLEET_DEFAULT_LAUNCHER
    if launcher not in Launcher.values:
        raise ValidationError({"launcher": f"Unknown launcher {launcher!r}."})
    node = Node(
        model=model, launcher=launcher, cloud=cloud, region=region,
        accelerator=accelerator or model.accelerator, use_spot=use_spot, endpoint_url=endpoint_url,
    )
    if hourly_cost is not None:
        node.hourly_cost = hourly_cost
    node.full_clean(exclude=["cluster_name"])
    with transaction.atomic():
        node.save()
        node.cluster_name = f"{settings.FLEET_CLUSTER_PREFIX}-{node.pk}"
        node.save(update_fields=["cluster_name"])
        NodeEvent.objects.create(node=node, kind=NodeEvent.Kind.ACTION, to_status=node.status,
                                 message=f"requested ({launcher})", actor=actor)
    return node


def node_transition(
    *,
    node: Node,
    to: str,
    reason: str = "",
    actor: str = "system",
    expected_from: str | None = None,
    **fields: Any,
) -> Node:
    """Move ``node`` to ``to`` or raise IllegalTransition. ``fields`` are saved with it."""
    current = expected_from or node.status
    if to not in TRANSITIONS.get(current, frozenset()):
        raise IllegalTransition(node, current, to)
    now = timezone.now()
    updates: dict[str, object] = {
        "status": to, "status_reason": reason, "updated_at": now, "status_changed_at": now, **fields,
    }
    for phase in _PHASE_FIELDS.get(to, ()):
        if getattr(node, phase) is None and phase not in updates:  # a node-reported time wins
            updates[phase] = now
    with transaction.atomic():
        moved = Node.objects.filter(pk=node.pk, status=current).update(**updates)
        if moved != 1:
            node.refresh_from_db(fields=["status"])
            raise IllegalTransition(node, node.status, to)
        NodeEvent.objects.create(node=node, kind=NodeEvent.Kind.TRANSITION, from_status=current,
                                 to_status=to, message=reason, actor=actor)
        invalidation.bump(invalidation.ROUTING)
    for field, value in updates.items():
        setattr(node, field, value)
    log.info("node %s: %s -> %s %s", node, current, to, reason)
    return node


def node_fail(*, node: Node, reason: str, actor: str = "system") -> Node:
    return node_transition(node=node, to=NodeStatus.FAILED, reason=reason, actor=actor)


def node_drain(*, node: Node, actor: str = "system", reason: str = "drain requested") -> Node:
    """Stop routing new requests to the node; the fleet's reconciler finishes the teardown."""
    return node_transition(node=node, to=NodeStatus.DRAINING, reason=reason, actor=actor)


def node_terminate(*, node: Node, actor: str = "system", reason: str = "terminate requested") -> Node:
    """Begin teardown. A node that never got a machine goes straight to terminated."""
    if node.status == NodeStatus.PENDING:
        return node_transition(node=node, to=NodeStatus.TERMINATED, reason=reason, actor=actor)
    node = node_transition(node=node, to=NodeStatus.TERMINATING, reason=reason, actor=actor)
    _enqueue("node_teardown_task", node.pk)
    return node


# --- Launching, registration, relaunch --------------------------------------------------------


def _enqueue(task_name: str, node_id: int, countdown: float = 0) -> None:
    from apps.fleet import tasks

    task = getattr(tasks, task_name)
    transaction.on_commit(lambda: task.apply_async(args=[node_id], countdown=countdown))


def node_request_launch(
    *,
    model: Model,
    launcher: str = "",
    cloud: str = "",
    region: str = "",
    accelerator: str = "",
    use_spot: bool = True,
    launch_profile: LaunchProfile | None = None,
    endpoint_url: str = "",
    count: int = 1,
    actor: str = "system",
    respect_max_replicas: bool = True,
) -> list[Node]:
    """Create ``count`` pending nodes and queue their launch (after the transaction commits)."""
    if count < 1 or count > 100:
        raise ValidationError({"count": "Launch between 1 and 100 nodes at a time."})
    if not model.is_active:
        raise ValidationError({"model": f"Model {model.name} is not active."})
    launcher = launcher or settings.FLEET_DEFAULT_LAUNCHER
    if launcher == Launcher.STATIC and not endpoint_url:
        raise ValidationError({"endpoint_url": "A static node needs the URL of its running vLLM server."})
    if launcher == Launcher.STATIC and count != 1:
        raise ValidationError({"count": "A static endpoint is one node."})
    with transaction.atomic():
        # Lock the model row so two concurrent launches cannot both pass the replica check.
        Model.objects.select_for_update().filter(pk=model.pk).first()
        if respect_max_replicas:
            live = Node.objects.filter(model=model, status__in=LIVE_STATUSES).count()
            if live + count > model.max_replicas:
                raise ValidationError({"count": (
                    f"{model.name} allows {model.max_replicas} live node(s) and has {live}; "
                    "raise max replicas on the model first.")})
        nodes = []
        for _ in range(count):
            node = node_create(model=model, launcher=launcher, cloud=cloud, region=region,
                               accelerator=accelerator, use_spot=use_spot, endpoint_url=endpoint_url, actor=actor)
            if launch_profile is not None:
                node.launch_profile = launch_profile
                node.save(update_fields=["launch_profile"])
            _enqueue("node_launch_task", node.pk)
            nodes.append(node)
    return nodes


def node_relaunch(*, node: Node, actor: str = "system", reason: str = "relaunch requested") -> Node:
    """Replace ``node`` with a fresh one with the same placement; the old one is torn down."""
    with transaction.atomic():
        if node.status in LIVE_STATUSES:
            node_terminate(node=node, actor=actor, reason=reason)
        (new,) = node_request_launch(
            model=node.model, launcher=node.launcher, cloud=node.cloud, region=node.region,
            accelerator=node.accelerator, use_spot=node.use_spot, launch_profile=node.launch_profile,
            endpoint_url=node.endpoint_url if node.launcher == Launcher.STATIC else "", actor=actor,
        )
        node_event(node=node, message=f"replaced by {new}: {reason}", kind=NodeEvent.Kind.ACTION, actor=actor)
        node_event(node=new, message=f"replaces {node}: {reason}", kind=NodeEvent.Kind.ACTION, actor=actor)
    return new


class RegistrationError(Exception):
    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


def _clamp(value: datetime | None, low: datetime, high: datetime) -> datetime | None:
    # The node's clock is not ours: keep its timings inside what we know to be possible.
    if value is None:
        return None
    return min(max(value, low), high)


def node_register(
    *,
    token: str,
    endpoint_url: str = "",
    provisioned_at: datetime | None = None,
    weights_loaded_at: datetime | None = None,
    health_ok: bool = False,
) -> Node:
    """A node calls home with its one-time token: record endpoint and timings, move it to loading.

    The node's word that vLLM is healthy is not trusted for routing: it triggers an immediate
    health check, which moves the node to ready.
    """
    if not token or split_prefix(token, REGISTRATION_TOKEN_PREFIX) is None:
        raise RegistrationError(401, "Invalid registration token.")
    with transaction.atomic():
        node = Node.objects.select_for_update().filter(registration_token_digest=token_digest(token)).first()
        if node is None:
            raise RegistrationError(401, "Invalid registration token.")
        if node.registered_at is not None:
            raise RegistrationError(409, f"This registration token was already used ({node} registered).")
        if node.status in {NodeStatus.TERMINATING, NodeStatus.TERMINATED, NodeStatus.FAILED, NodeStatus.DRAINING}:
            raise RegistrationError(409, f"{node} is {node.status}: shut down.")
        now = timezone.now()
        provisioned_at = _clamp(provisioned_at, node.requested_at, now)
        weights_loaded_at = _clamp(weights_loaded_at, provisioned_at or node.requested_at, now)
        fields: dict[str, Any] = {"registered_at": now}
        if endpoint_url:
            fields["endpoint_url"] = endpoint_url
        if provisioned_at and node.provisioned_at is None:
            fields["provisioned_at"] = provisioned_at
        if weights_loaded_at and node.weights_loaded_at is None:
            fields["weights_loaded_at"] = weights_loaded_at
        if node.status in {NodeStatus.PENDING, NodeStatus.PROVISIONING}:
            node = node_transition(node=node, to=NodeStatus.LOADING, reason="registered", actor="node", **fields)
        else:
            Node.objects.filter(pk=node.pk).update(**fields)
            for key, value in fields.items():
                setattr(node, key, value)
            node_event(node=node, message="registered", actor="node")
        if health_ok and node.endpoint_url:
            transaction.on_commit(lambda: _check_now(node.pk))
    return node


def _check_now(node_id: int) -> None:
    from apps.fleet import tasks

    tasks.node_check_health_task.delay([node_id])
