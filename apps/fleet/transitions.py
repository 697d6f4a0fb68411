"""The node state machine's writes: every status change goes through node_transition(), which
enforces TRANSITIONS with a conditional UPDATE (so two workers cannot both move a node) and logs
it. Lifecycle, health and the reconciler import this module, not services, so imports run one way:
services → enqueue → tasks → lifecycle/health → transitions."""

from __future__ import annotations

import logging

from django.db import transaction
from django.utils import timezone

from apps.core import invalidation
from apps.fleet.models import TRANSITIONS, Node, NodeEvent, NodeStatus

log = logging.getLogger(__name__)


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
    return NodeEvent.objects.create(
        node=node, kind=kind, message=message, actor=actor, from_status=node.status, to_status=node.status
    )


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
    updates: dict[str, object] = {
        "status": to,
        "status_reason": reason,
        "updated_at": now,
        "status_changed_at": now,
        **fields,
    }
    for phase in _PHASE_FIELDS.get(to, ()):
        if getattr(node, phase) is None and phase not in updates:  # a node-reported time wins
            updates[phase] = now
    with transaction.atomic():
        moved = Node.objects.filter(pk=node.pk, status=current).update(**updates)
        if moved != 1:
            node.refresh_from_db(fields=["status"])
            raise IllegalTransition(node, node.status, to)
        NodeEvent.objects.create(
            node=node, kind=NodeEvent.Kind.TRANSITION, from_status=current, to_status=to, message=reason, actor=actor
        )
        invalidation.bump(invalidation.ROUTING)
    for field, value in updates.items():
        setattr(node, field, value)
    log.info("node %s: %s -> %s %s", node, current, to, reason)
    return node


def node_fail(*, node: Node, reason: str, actor: str = "system") -> Node:
    return node_transition(node=node, to=NodeStatus.FAILED, reason=reason, actor=actor)
