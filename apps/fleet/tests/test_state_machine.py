from __future__ import annotations

import itertools

import pytest

from apps.fleet.models import TRANSITIONS, NodeEvent, NodeStatus
from apps.fleet.transitions import IllegalTransition, node_transition

pytestmark = pytest.mark.django_db


def _put(node, status: str) -> None:
    type(node).objects.filter(pk=node.pk).update(status=status)
    node.status = status


@pytest.mark.parametrize(("current", "to"), list(itertools.product(NodeStatus.values, NodeStatus.values)))
def test_every_transition_is_allowed_or_refused_per_the_table(node, current: str, to: str) -> None:
    _put(node, current)
    before = NodeEvent.objects.filter(node=node).count()
    if to in TRANSITIONS[current]:
        node_transition(node=node, to=to, reason="test", actor="tester")
        node.refresh_from_db()
        assert node.status == to
        event = NodeEvent.objects.filter(node=node).first()
        assert (event.from_status, event.to_status, event.actor) == (current, to, "tester")
    else:
        with pytest.raises(IllegalTransition):
            node_transition(node=node, to=to)
        node.refresh_from_db()
        assert node.status == current
        assert NodeEvent.objects.filter(node=node).count() == before


def test_terminated_is_final(node) -> None:
    assert TRANSITIONS[NodeStatus.TERMINATED] == frozenset()


def test_stale_copy_cannot_transition_a_node_another_worker_moved(node) -> None:
    stale = type(node).objects.get(pk=node.pk)
    node_transition(node=node, to=NodeStatus.PROVISIONING)
    node_transition(node=node, to=NodeStatus.FAILED, reason="boom")
    with pytest.raises(IllegalTransition):
        node_transition(node=stale, to=NodeStatus.PROVISIONING)


def test_phase_timestamps_are_stamped_once(node) -> None:
    node_transition(node=node, to=NodeStatus.PROVISIONING)
    node_transition(node=node, to=NodeStatus.LOADING)
    node.refresh_from_db()
    assert node.provisioned_at is not None and node.ready_at is None
    node_transition(node=node, to=NodeStatus.READY)
    node.refresh_from_db()
    first_ready = node.ready_at
    assert node.weights_loaded_at is not None and first_ready is not None
    node_transition(node=node, to=NodeStatus.UNHEALTHY)
    node_transition(node=node, to=NodeStatus.READY)
    node.refresh_from_db()
    assert node.ready_at == first_ready


def test_cluster_name_derives_from_id(node) -> None:
    assert node.cluster_name == f"crosslogic-{node.pk}"


def test_cold_start_median_is_per_accelerator(catalog_model) -> None:
    from datetime import timedelta

    from apps.fleet.models import Node
    from apps.fleet.selectors import model_cold_start_medians
    from apps.fleet.services import node_create

    for accel, seconds in (("L4:1", 30), ("L4:1", 50), ("L4:1", 90), ("A100:1", 20)):
        n = node_create(model=catalog_model, launcher="static", accelerator=accel)
        Node.objects.filter(pk=n.pk).update(ready_at=n.requested_at + timedelta(seconds=seconds))
    node_create(model=catalog_model, launcher="static", accelerator="H100:1")  # never ready: ignored
    assert model_cold_start_medians(model_id=catalog_model.pk) == [
        {"accelerator": "A100:1", "median_seconds": 20.0, "samples": 1},
        {"accelerator": "L4:1", "median_seconds": 50.0, "samples": 3},
    ]
