"""Node writes: creating, launching, relaunching, draining, terminating and registering nodes.
Every status change goes through apps.fleet.transitions.node_transition (the state machine);
queued work goes through apps.fleet.enqueue."""

from __future__ import annotations

from datetime import datetime
from decimal import Decimal
from typing import Any

from django.conf import settings
from django.core.exceptions import ValidationError
from django.db import transaction
from django.utils import timezone

from apps.catalog.models import ServedModel
from apps.core.secrets import digest as token_digest
from apps.core.secrets import split_prefix
from apps.fleet.enqueue import enqueue_health_check, enqueue_node_launch, enqueue_node_teardown
from apps.fleet.keys import REGISTRATION_TOKEN_PREFIX
from apps.fleet.models import LIVE_STATUSES, Launcher, LaunchProfile, Node, NodeEvent, NodeStatus
from apps.fleet.placement import Placement

# The state machine's writes live in apps.fleet.transitions. IllegalTransition and node_transition
# stay importable from here for the callers outside the fleet that use them beside node_create
# (the add_node command, test fixtures, bench).
from apps.fleet.transitions import IllegalTransition as IllegalTransition
from apps.fleet.transitions import node_event, node_transition


def node_create(
    *,
    model: ServedModel,
    launcher: str = "",
    cloud: str = "",
    region: str = "",
    accelerator: str = "",
    use_spot: bool = True,
    launch_profile: LaunchProfile | None = None,
    hourly_cost: Decimal | float | str | None = None,
    endpoint_url: str = "",
    actor: str = "system",
) -> Node:
    """One node row, pending, nothing queued (node_request_launch launches; add_node registers)."""
    launcher = launcher or settings.FLEET_DEFAULT_LAUNCHER
    if launcher not in Launcher.values:
        raise ValidationError({"launcher": f"Unknown launcher {launcher!r}."})
    node = Node(
        model=model,
        launcher=launcher,
        cloud=cloud,
        region=region,
        accelerator=accelerator or model.accelerator,
        use_spot=use_spot,
        launch_profile=launch_profile,
        endpoint_url=endpoint_url,
    )
    if hourly_cost is not None:
        node.hourly_cost = hourly_cost
    node.full_clean(exclude=["cluster_name"])
    with transaction.atomic():
        node.save()
        node.cluster_name = f"{settings.FLEET_CLUSTER_PREFIX}-{node.pk}"
        node.save(update_fields=["cluster_name"])
        NodeEvent.objects.create(
            node=node, kind=NodeEvent.Kind.ACTION, to_status=node.status, message=f"requested ({launcher})", actor=actor
        )
    return node


def node_drain(*, node: Node, actor: str = "system", reason: str = "drain requested") -> Node:
    """Stop routing new requests to the node; the fleet's reconciler finishes the teardown."""
    return node_transition(node=node, to=NodeStatus.DRAINING, reason=reason, actor=actor)


def node_terminate(*, node: Node, actor: str = "system", reason: str = "terminate requested") -> Node:
    """Begin teardown. A node that never got a machine goes straight to terminated."""
    if node.status == NodeStatus.PENDING:
        return node_transition(node=node, to=NodeStatus.TERMINATED, reason=reason, actor=actor)
    node = node_transition(node=node, to=NodeStatus.TERMINATING, reason=reason, actor=actor)
    enqueue_node_teardown(node_id=node.pk)
    return node


def node_force_terminated(*, node: Node, actor: str = "system", reason: str = "forced to terminated by staff") -> Node:
    """For a node stuck in terminating (or failed with its machine maybe still up): mark it
    terminated now, so it leaves every count and list of live nodes, and keep retrying the
    teardown in the background (the reconciler re-queues it) until the launcher confirms it."""
    if node.status not in {NodeStatus.TERMINATING, NodeStatus.FAILED}:
        raise ValidationError(
            f"Only a node stuck in terminating or failed can be forced to terminated; this one is {node.status}: "
            "terminate or drain it first."
        )
    needs_teardown = not node.launcher_state.get("torn_down")
    if needs_teardown:
        # teardown_at 0: whatever chain was following it is presumed dead, so the next one starts now.
        state = {**node.launcher_state, "teardown_pending": True, "teardown_at": 0}
        Node.objects.filter(pk=node.pk).update(launcher_state=state)
        node.launcher_state = state
    node = node_transition(
        node=node,
        to=NodeStatus.TERMINATED,
        reason=f"{reason} (teardown retried until confirmed)" if needs_teardown else reason,
        actor=actor,
    )
    if needs_teardown:
        enqueue_node_teardown(node_id=node.pk)
    return node


# --- Launching, registration, relaunch --------------------------------------------------------


def node_request_launch(
    *,
    model: ServedModel,
    placement: Placement | None = None,
    count: int = 1,
    actor: str = "system",
    respect_max_replicas: bool = True,
) -> list[Node]:
    """Create ``count`` pending nodes and queue their launch (after the transaction commits).
    No ``placement``: the default launcher, anywhere, spot, on the model's accelerator."""
    placement = placement or Placement()
    if count < 1 or count > 100:
        raise ValidationError({"count": "Launch between 1 and 100 nodes at a time."})
    if not model.is_active:
        raise ValidationError({"model": f"Model {model.name} is not active."})
    launcher = placement.launcher or settings.FLEET_DEFAULT_LAUNCHER
    if launcher == Launcher.STATIC and not placement.endpoint_url:
        raise ValidationError({"endpoint_url": "A static node needs the URL of its running vLLM server."})
    if launcher == Launcher.STATIC and count != 1:
        raise ValidationError({"count": "A static endpoint is one node."})
    with transaction.atomic():
        # Lock the model row so two concurrent launches cannot both pass the replica check.
        ServedModel.objects.select_for_update().filter(pk=model.pk).first()
        if respect_max_replicas:
            live = Node.objects.filter(model=model, status__in=LIVE_STATUSES).count()
            if live + count > model.max_replicas:
                raise ValidationError(
                    {
                        "count": (
                            f"{model.name} allows {model.max_replicas} live node(s) and has {live}; "
                            "raise max replicas on the model first."
                        )
                    }
                )
        nodes = []
        for _ in range(count):
            node = node_create(model=model, actor=actor, **placement.as_kwargs())
            enqueue_node_launch(node_id=node.pk)
            nodes.append(node)
    return nodes


def node_relaunch(*, node: Node, actor: str = "system", reason: str = "relaunch requested") -> Node:
    """Replace ``node`` with a fresh one with the same placement; the old one is torn down."""
    with transaction.atomic():
        if node.status in LIVE_STATUSES:
            node_terminate(node=node, actor=actor, reason=reason)
        (new,) = node_request_launch(model=node.model, placement=Placement.of(node), actor=actor)
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
            enqueue_health_check(node_ids=[node.pk])
    return node
