"""The warm pool: drained nodes stopped instead of torn down, restarted on scale-up, torn down after
WARM_POOL_TTL_S; spot nodes never stopped. SkyPilot through the strict fake (conftest.FakeSky)."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal
from types import SimpleNamespace

import pytest
from django.utils import timezone

from apps.fleet import lifecycle, replicas
from apps.fleet.models import LIVE_STATUSES, ModelScale, Node, NodeEvent, NodeStatus
from apps.fleet.reconcile import reconcile
from apps.fleet.services import node_create, node_drain, node_register
from apps.fleet.transitions import IllegalTransition, node_transition
from apps.fleet.warm import node_stop

pytestmark = pytest.mark.django_db
S = NodeStatus


def _reload(node: Node) -> Node:
    return Node.objects.get(pk=node.pk)


def _launch_to_ready(node: Node, fake_sky, real_sky) -> Node:
    """The SkyPilot launch path up to ready; returns the node (its registration token used)."""
    lifecycle.launch_node(node.pk)
    node = _reload(node)
    rid = node.launcher_state["launch_request_id"]
    handle = SimpleNamespace(launched_resources=real_sky.Resources(infra="aws/us-east-1", accelerators="L4:1"))
    fake_sky.finish(rid, result=(1, handle))
    fake_sky.jobs[(node.cluster_name, 1)] = "RUNNING"
    lifecycle.poll_launch(node.pk)
    launch = [c for c in fake_sky.calls if c[0] == "launch"][-1][1]
    node_register(token=launch["task"].secrets["CROSSLOGIC_REGISTRATION_TOKEN"].get_secret_value())
    return node_transition(node=_reload(node), to=S.READY, reason="health check passed")


def _drained(node: Node) -> Node:
    node = node_drain(node=node, reason="scale down")
    # A health check after the drain began saw nothing in flight.
    Node.objects.filter(pk=node.pk).update(last_health_at=timezone.now() + timedelta(seconds=1), requests_running=0)
    return _reload(node)


@pytest.fixture
def on_demand(served_model, fake_sky, real_sky) -> Node:
    served_model.min_replicas, served_model.max_replicas, served_model.warm_pool = 0, 2, True
    served_model.save()
    node = node_create(model=served_model, launcher="skypilot", cloud="aws", region="us-east-1", use_spot=False)
    return _launch_to_ready(node, fake_sky, real_sky)


def test_the_state_machine_allows_the_warm_pool_moves_and_no_others() -> None:
    from apps.fleet.models import TRANSITIONS

    assert TRANSITIONS[S.DRAINING] == {S.STOPPING, S.TERMINATING, S.FAILED}
    assert TRANSITIONS[S.STOPPED] == {S.PROVISIONING, S.LOADING, S.TERMINATING, S.TERMINATED, S.FAILED}
    assert S.STOPPED not in TRANSITIONS[S.READY]  # a serving node is drained first, never stopped under load
    assert S.STOPPING in LIVE_STATUSES and S.STOPPED not in LIVE_STATUSES  # a stopped node holds no GPU


def test_a_drained_on_demand_node_is_stopped_with_its_disk_cost_then_restarted_warm(
    on_demand, fake_sky, real_sky, settings, redis_db
) -> None:
    settings.WARM_POOL_DISK_USD_PER_GB_MONTH = 0.10
    node = _drained(on_demand)

    report = reconcile()
    assert report.stopped == [str(node)] and _reload(node).status == S.STOPPING

    assert lifecycle.stop_node(node.pk).then == "stop"  # sky.stop submitted; follow it
    assert ("stop", node.cluster_name) in fake_sky.calls
    fake_sky.finish(fake_sky.last("stop"))
    assert lifecycle.stop_node(node.pk).again_in is None
    node = _reload(node)
    assert node.status == S.STOPPED and node.stopped_at is not None
    # 16 GB of weights → a 117 GB disk at $0.10 per GB-month = $0.016 an hour.
    assert node.stopped_hourly_cost == Decimal("0.0160")
    assert fake_sky.clusters[node.cluster_name]["status"] == real_sky.ClusterStatus.STOPPED

    # Scale-up: the stopped node is restarted before anything is launched.
    outcome = replicas.ensure_model(model=node.model, target=1, reason="desired 1 (test)", actor="autoscaler")
    assert outcome.restarted == [str(node)] and outcome.launched == []
    node = _reload(node)
    assert node.status == S.PROVISIONING and node.warm_starts == 1 and node.restart_requested_at
    assert node.registered_at is None and node.ready_at is None and node.endpoint_url == ""

    launches_before = len([c for c in fake_sky.calls if c[0] == "launch"])
    node = _launch_to_ready(node, fake_sky, real_sky)  # relaunched onto its own cluster, fresh token
    launches = [c for c in fake_sky.calls if c[0] == "launch"]
    assert len(launches) == launches_before + 1 and launches[-1][1]["cluster_name"] == node.cluster_name
    node = _reload(node)
    assert node.status == S.READY and node.warm_start_seconds is not None and node.cold_start_seconds is None
    assert NodeEvent.objects.filter(node=node, message__startswith="warm restart: desired 1").exists()


def test_a_spot_node_is_torn_down_not_stopped(served_model, fake_sky, real_sky, redis_db) -> None:
    node = node_create(model=served_model, launcher="skypilot", cloud="aws", use_spot=True)
    node = _drained(_launch_to_ready(node, fake_sky, real_sky))

    report = reconcile()

    assert report.drained == [str(node)] and report.stopped == []
    node = _reload(node)
    assert node.status == S.TERMINATING and "spot nodes cannot be stopped" in node.status_reason


def test_a_stop_skypilot_refuses_tears_the_node_down_instead(served_model, fake_sky, real_sky) -> None:
    # Forced past the policy: sky.stop's request fails for a spot cluster, as on AWS.
    node = node_create(model=served_model, launcher="skypilot", cloud="aws", use_spot=True)
    node = node_stop(node=_drained(_launch_to_ready(node, fake_sky, real_sky)), reason="test")
    assert lifecycle.stop_node(node.pk).then == "stop"  # submitted; the fake fails it as the server would
    step = lifecycle.stop_node(node.pk)
    node = _reload(node)
    assert node.status == S.TERMINATING and step.then == "teardown"
    assert "NotSupportedError: Stopping spot instances is currently not supported on AWS" in node.status_reason


def test_the_drain_waits_for_the_gateways_in_flight_requests(on_demand, redis_db) -> None:
    node = _drained(on_demand)
    now = timezone.now() + timedelta(seconds=2)
    assert replicas.drain_finished(node, now, {node.pk: 1}) is None  # a stream still runs through the gateway
    assert replicas.drain_finished(node, now, {}) == (True, "drained: no requests in flight")


def test_a_model_without_warm_pool_or_a_zero_ttl_tears_down(on_demand, settings, redis_db) -> None:
    node = _drained(on_demand)
    settings.WARM_POOL_TTL_S = 0
    assert replicas.why_not_warm(node) == "warm pool off (WARM_POOL_TTL_S=0)"
    settings.WARM_POOL_TTL_S = 600
    node.model.warm_pool = False
    assert replicas.why_not_warm(node) == "the model keeps no warm pool"


def test_a_node_stopped_past_the_ttl_is_torn_down(on_demand, fake_sky, settings, redis_db) -> None:
    settings.WARM_POOL_TTL_S = 600
    node = node_stop(node=_drained(on_demand), reason="test")
    lifecycle.stop_node(node.pk)
    fake_sky.finish(fake_sky.last("stop"))
    lifecycle.stop_node(node.pk)
    Node.objects.filter(pk=node.pk).update(stopped_at=timezone.now() - timedelta(seconds=599))
    assert reconcile().expired == []
    Node.objects.filter(pk=node.pk).update(stopped_at=timezone.now() - timedelta(seconds=601))

    report = reconcile()

    assert report.expired == [str(node)]
    assert _reload(node).status == S.TERMINATING and "WARM_POOL_TTL_S=600" in _reload(node).status_reason


def test_a_stopped_cluster_that_vanished_is_terminated(on_demand, fake_sky, redis_db) -> None:
    node = node_stop(node=_drained(on_demand), reason="test")
    lifecycle.stop_node(node.pk)
    fake_sky.finish(fake_sky.last("stop"))
    lifecycle.stop_node(node.pk)
    fake_sky.clusters.pop(node.cluster_name)  # deleted in the cloud console

    reconcile()

    node = _reload(node)
    assert node.status == S.TERMINATED and node.status_reason == "the stopped machine vanished"


def test_a_stopped_node_is_not_an_orphan_and_not_routed(on_demand, fake_sky, settings, redis_db) -> None:
    settings.FLEET_ORPHAN_GRACE_S = 0
    node = node_stop(node=_drained(on_demand), reason="test")
    lifecycle.stop_node(node.pk)
    fake_sky.finish(fake_sky.last("stop"))
    lifecycle.stop_node(node.pk)

    report = reconcile()

    assert report.orphans == [] and not any(c == ("down", node.cluster_name) for c in fake_sky.calls)
    with pytest.raises(IllegalTransition):
        node_transition(node=_reload(node), to=S.READY)


def test_the_autoscaler_restarts_warm_nodes_newest_first(served_model, fake_sky, real_sky, redis_db) -> None:
    served_model.min_replicas, served_model.max_replicas = 0, 3
    served_model.save()
    stopped = []
    for age in (300, 100):
        node = node_create(model=served_model, launcher="skypilot", cloud="aws", use_spot=False)
        node = node_stop(node=_drained(_launch_to_ready(node, fake_sky, real_sky)), reason="test")
        lifecycle.stop_node(node.pk)
        fake_sky.finish(fake_sky.last("stop"))
        lifecycle.stop_node(node.pk)
        Node.objects.filter(pk=node.pk).update(stopped_at=timezone.now() - timedelta(seconds=age))
        stopped.append(node)
    ModelScale.objects.create(model=served_model, desired=1)

    outcome = replicas.ensure_model(model=served_model, target=1, reason="desired 1", actor="autoscaler")

    assert outcome.restarted == [str(stopped[1])]  # stopped 100 s ago: its disk is the freshest
    assert _reload(stopped[0]).status == S.STOPPED
