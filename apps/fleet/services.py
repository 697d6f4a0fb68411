"""Node writes. Every status change goes through node_transition(), which enforces the state
machine with a conditional UPDATE (so two workers cannot both move a node) and logs it."""

from __future__ import annotations

import logging

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from apps.catalog.models import Model
from apps.core import invalidation
from apps.fleet.models import TRANSITIONS, Launcher, Node, NodeEvent, NodeStatus

log = logging.getLogger(__name__)


class IllegalTransition(Exception):  # noqa: N818 - reads as the event it reports
    def __init__(self, node: Node, current: str, to: str) -> None:
        super().__init__(f"{node}: cannot go from {current} to {to}")
        self.node, self.current, self.to = node, current, to


# Phase timestamps set the first time a node reaches a status.
_PHASE_FIELDS = {
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
    hourly_cost: object = None,
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
    **fields: object,
) -> Node:
    """Move ``node`` to ``to`` or raise IllegalTransition. ``fields`` are saved with it."""
    current = expected_from or node.status
    if to not in TRANSITIONS.get(current, frozenset()):
        raise IllegalTransition(node, current, to)
    now = timezone.now()
    updates: dict[str, object] = {"status": to, "status_reason": reason, "updated_at": now, **fields}
    for phase in _PHASE_FIELDS.get(to, ()):
        if getattr(node, phase) is None:
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
    return node_transition(node=node, to=NodeStatus.TERMINATING, reason=reason, actor=actor)
