"""The reconciler: replacement, preemption, orphans and draining."""

from __future__ import annotations

import time
from datetime import timedelta

import pytest
from django.utils import timezone

from apps.fleet import lifecycle
from apps.fleet.models import Node, NodeEvent, NodeStatus
from apps.fleet.reconcile import reconcile
from apps.fleet.services import node_create
from apps.fleet.transitions import node_fail, node_transition

pytestmark = pytest.mark.django_db


def _walk(node: Node, *statuses: str) -> Node:
    for status in statuses:
        node_transition(node=node, to=status)
    return Node.objects.get(pk=node.pk)


def _keep(model, n: int, maximum: int = 3) -> None:
    model.min_replicas, model.max_replicas = n, maximum
    model.save()


def test_a_failed_node_is_replaced_with_the_same_placement_and_a_reason(served_model, settings) -> None:
    settings.FLEET_RELAUNCH_BACKOFF_S = 0  # the back-off has its own tests below
    _keep(served_model, 1)
    node = node_create(model=served_model, launcher="local", accelerator="L4:1", use_spot=True)
    node = _walk(node, "provisioning")
    node_fail(node=node, reason="no capacity: tried 3 placement(s)")

    report = reconcile()

    (new,) = Node.objects.exclude(pk=node.pk)
    assert new.status == NodeStatus.PENDING and (new.launcher, new.accelerator) == ("local", "L4:1")
    assert report.launched == [str(new)]
    event = NodeEvent.objects.filter(node=new, actor="reconciler").first()
    assert f"replaces {node}" in event.message and "no capacity" in event.message
    assert node.pk in report.teardowns  # the failed node's machine gets cleaned up
    assert reconcile().launched == []  # a second pass sees the pending replacement


def test_never_more_than_max_replicas_and_no_relaunch_storm(served_model) -> None:
    _keep(served_model, 3, maximum=2)
    reconcile()
    assert Node.objects.filter(model=served_model).count() == 2
    Node.objects.update(status=NodeStatus.FAILED, status_changed_at=timezone.now())
    node_create(model=served_model, launcher="local")
    Node.objects.filter(status=NodeStatus.PENDING).update(status=NodeStatus.FAILED)
    report = reconcile()
    assert report.launched == [] and "launches failed" in report.errors[0]


def test_a_vanished_cluster_is_marked_preempted_and_replaced(served_model, fake_sky, real_sky) -> None:
    _keep(served_model, 1)
    node = node_create(model=served_model, launcher="skypilot", cloud="aws")
    lifecycle.launch_node(node.pk)
    fake_sky.finish(fake_sky.last("launch"), result=(1, "h"))
    lifecycle.poll_launch(node.pk)
    node = _walk(Node.objects.get(pk=node.pk), "loading", "ready")
    assert reconcile().preempted == []  # the cluster is there

    fake_sky.clusters.clear()  # the spot instance was reclaimed
    report = reconcile()

    node.refresh_from_db()
    assert node.status == NodeStatus.TERMINATED and node.status_reason == "preempted"
    assert report.preempted == [str(node)]
    (replacement,) = Node.objects.exclude(pk=node.pk)
    assert (replacement.launcher, replacement.cloud, replacement.status) == ("skypilot", "aws", "pending")


def test_a_status_refresh_that_never_ends_is_cancelled_and_nothing_is_called_vanished(
    served_model, fake_sky, settings
) -> None:
    settings.FLEET_SKY_STATUS_TIMEOUT_S = 0.3
    _keep(served_model, 1)
    node = _walk(node_create(model=served_model, launcher="skypilot"), "provisioning", "loading", "ready")
    fake_sky.status_hangs = True  # a cloud that does not answer the refresh

    started = time.monotonic()
    report = reconcile()

    assert time.monotonic() - started < 5  # the worker was not held
    assert any("did not answer a cluster status request within 0.3 s" in e for e in report.errors), report.errors
    assert fake_sky.cancelled == [fake_sky.last("status")]
    node.refresh_from_db()
    assert node.status == NodeStatus.READY and report.preempted == []  # unknown is not gone


def test_orphan_clusters_are_torn_down_after_the_grace_period(served_model, fake_sky, real_sky, settings) -> None:
    settings.FLEET_ORPHAN_GRACE_S = 600
    up = real_sky.ClusterStatus.UP
    now = timezone.now().timestamp()
    live = _walk(node_create(model=served_model, launcher="skypilot"), "provisioning", "loading")
    fake_sky.clusters.update(
        {
            "crosslogic-99999": {"name": "crosslogic-99999", "status": up, "launched_at": now - 3600},  # orphan
            "crosslogic-99998": {"name": "crosslogic-99998", "status": up, "launched_at": now - 30},  # too young
            "crosslogic-dev-box": {"name": "crosslogic-dev-box", "status": up, "launched_at": 1},  # not one of ours
            live.cluster_name: {"name": live.cluster_name, "status": up, "launched_at": now - 3600},
        }
    )

    report = reconcile()

    assert report.orphans == ["crosslogic-99999"], report.errors
    assert [c for c in fake_sky.calls if c[0] == "down"] == [("down", "crosslogic-99999")]


def test_draining_waits_for_in_flight_requests_then_terminates(served_model, settings) -> None:
    settings.FLEET_DRAIN_TIMEOUT_S = 300
    node = node_create(model=served_model, launcher="static", endpoint_url="http://127.0.0.1:9")
    node = _walk(node, "loading", "ready", "draining")
    Node.objects.filter(pk=node.pk).update(requests_running=2, last_health_at=timezone.now() + timedelta(seconds=1))
    reconcile()
    assert Node.objects.get(pk=node.pk).status == NodeStatus.DRAINING

    Node.objects.filter(pk=node.pk).update(requests_running=0, last_health_at=timezone.now() + timedelta(seconds=2))
    report = reconcile()
    node.refresh_from_db()
    assert node.status == NodeStatus.TERMINATING and node.status_reason.startswith("drained")
    assert report.drained == [str(node)] and node.pk in report.teardowns
    lifecycle.teardown_node(node.pk)
    assert Node.objects.get(pk=node.pk).status == NodeStatus.TERMINATED


def test_a_drain_that_never_empties_is_bounded(served_model, settings) -> None:
    settings.FLEET_DRAIN_TIMEOUT_S = 60
    node = _walk(
        node_create(model=served_model, launcher="static", endpoint_url="http://127.0.0.1:9"),
        "loading",
        "ready",
        "draining",
    )
    Node.objects.filter(pk=node.pk).update(
        requests_running=5, last_health_at=timezone.now(), status_changed_at=timezone.now() - timedelta(seconds=61)
    )
    reconcile()
    node.refresh_from_db()
    assert node.status == NodeStatus.TERMINATING and "drain timed out" in node.status_reason


def test_a_long_unhealthy_node_is_replaced(served_model, settings) -> None:
    settings.FLEET_REPLACE_UNHEALTHY_AFTER_S = 120
    _keep(served_model, 1)
    node = _walk(
        node_create(model=served_model, launcher="static", endpoint_url="http://127.0.0.1:9"),
        "loading",
        "ready",
        "unhealthy",
    )
    assert reconcile().replaced_unhealthy == []
    Node.objects.filter(pk=node.pk).update(status_changed_at=timezone.now() - timedelta(seconds=121))
    report = reconcile()
    assert report.replaced_unhealthy == [str(node)] and len(report.launched) == 1
    assert Node.objects.get(pk=node.pk).status == NodeStatus.TERMINATING


def test_a_node_stuck_loading_past_the_launch_timeout_fails(served_model, settings) -> None:
    settings.FLEET_LAUNCH_TIMEOUT_S = 600
    node = _walk(node_create(model=served_model, launcher="static", endpoint_url="http://127.0.0.1:9"), "loading")
    reconcile()
    assert Node.objects.get(pk=node.pk).status == NodeStatus.LOADING
    Node.objects.filter(pk=node.pk).update(requested_at=timezone.now() - timedelta(seconds=601))
    reconcile()
    node.refresh_from_db()
    assert node.status == NodeStatus.FAILED and "not ready within 600s" in node.status_reason


def test_a_stopped_cluster_is_torn_down_and_replaced(served_model, fake_sky, real_sky) -> None:
    _keep(served_model, 1)
    node = _walk(node_create(model=served_model, launcher="skypilot", cloud="gcp"), "provisioning", "loading", "ready")
    fake_sky.clusters[node.cluster_name] = {
        "name": node.cluster_name,
        "status": real_sky.ClusterStatus.STOPPED,
        "launched_at": 1.0,
    }
    report = reconcile()
    node.refresh_from_db()
    assert node.status == NodeStatus.TERMINATING and node.status_reason == "preempted: cluster stopped"
    assert node.pk in report.teardowns and len(report.launched) == 1
    lifecycle.teardown_node(node.pk)
    assert ("down", node.cluster_name) in fake_sky.calls


def test_a_teardown_in_progress_is_not_queued_twice(served_model, fake_sky, real_sky) -> None:
    node = _walk(node_create(model=served_model, launcher="skypilot"), "provisioning", "loading", "ready")
    fake_sky.clusters[node.cluster_name] = {
        "name": node.cluster_name,
        "status": real_sky.ClusterStatus.UP,
        "launched_at": 1.0,
    }
    node_transition(node=Node.objects.get(pk=node.pk), to="terminating")
    assert lifecycle.teardown_node(node.pk).then == "teardown"  # sky.down submitted, still running

    assert node.pk not in reconcile().teardowns
    state = Node.objects.get(pk=node.pk).launcher_state
    Node.objects.filter(pk=node.pk).update(launcher_state={**state, "teardown_at": 0})  # the chain was lost
    assert node.pk in reconcile().teardowns
    assert len([c for c in fake_sky.calls if c[0] == "down"]) == 1


def test_a_lost_launch_poll_is_resumed(served_model, fake_sky) -> None:
    node = node_create(model=served_model, launcher="skypilot")
    lifecycle.launch_node(node.pk)
    assert reconcile().resumed_polls == []  # its poll chain is alive
    state = Node.objects.get(pk=node.pk).launcher_state
    Node.objects.filter(pk=node.pk).update(launcher_state={**state, "poll_at": 0})
    assert reconcile().resumed_polls == [node.pk]


def test_a_node_stuck_terminating_can_be_forced_to_terminated_and_its_teardown_is_retried(
    served_model, fake_sky, real_sky
) -> None:
    from apps.fleet.services import node_force_terminated

    node = _walk(
        node_create(model=served_model, launcher="skypilot"), "provisioning", "loading", "ready", "terminating"
    )
    fake_sky.clusters[node.cluster_name] = {
        "name": node.cluster_name,
        "status": real_sky.ClusterStatus.UP,
        "launched_at": 1.0,
    }
    state = Node.objects.get(pk=node.pk).launcher_state
    # A teardown chain that claims to be running (and never finishes): the reconciler leaves it alone.
    Node.objects.filter(pk=node.pk).update(launcher_state={**state, "teardown_at": time.time() + 3600})
    assert node.pk not in reconcile().teardowns

    node = node_force_terminated(node=Node.objects.get(pk=node.pk), actor="staff:ops")
    assert node.status == NodeStatus.TERMINATED
    assert "teardown retried" in node.status_reason
    assert node.pk in reconcile().teardowns  # a forced node's teardown is queued until confirmed

    assert lifecycle.teardown_node(node.pk).then == "teardown"  # sky.down submitted
    assert ("down", node.cluster_name) in fake_sky.calls
    for request in fake_sky.requests.values():  # the API server finishes the down request
        request["status"] = "SUCCEEDED"
    fake_sky.clusters.pop(node.cluster_name)
    assert lifecycle.teardown_node(node.pk).then == ""  # done: nothing follows
    node.refresh_from_db()
    assert node.status == NodeStatus.TERMINATED and node.launcher_state["torn_down"] is True
    assert node.pk not in reconcile().teardowns
    assert NodeEvent.objects.filter(node=node, message__contains="forced to terminated").exists()


def test_only_a_stuck_node_can_be_forced_to_terminated(served_model) -> None:
    from django.core.exceptions import ValidationError

    from apps.fleet.services import node_force_terminated

    node = _walk(node_create(model=served_model, launcher="local"), "provisioning", "loading", "ready")
    with pytest.raises(ValidationError, match="terminate or drain it first"):
        node_force_terminated(node=node)
    assert Node.objects.get(pk=node.pk).status == NodeStatus.READY


# --- issue #10 item 3: the relaunch brake counts failures over hours, with back-off -------------


def _failed_at(model, minutes_ago: float) -> Node:
    node = _walk(node_create(model=model, launcher="local"), "provisioning")
    node_fail(node=node, reason="vLLM is not running: job 1 failed setup")
    Node.objects.filter(pk=node.pk).update(status_changed_at=timezone.now() - timedelta(minutes=minutes_ago))
    return node


def test_failures_an_hour_apart_still_stop_the_relaunches(served_model, settings) -> None:
    # A failing job shows up about an hour after each launch: a 15-minute window never saw 3.
    settings.FLEET_RELAUNCH_MAX_FAILURES, settings.FLEET_RELAUNCH_FAILURE_WINDOW_S = 3, 6 * 3600
    _keep(served_model, 1)
    for minutes_ago in (125, 65, 5):
        _failed_at(served_model, minutes_ago)

    report = reconcile()

    assert report.launched == []
    assert "3 launches failed in the last 6 h" in report.errors[0]


def test_each_failure_doubles_the_wait_before_the_next_launch(served_model, settings) -> None:
    settings.FLEET_RELAUNCH_BACKOFF_S = 120
    _keep(served_model, 1)
    first = _failed_at(served_model, 1)  # 1 failure: wait 2 min
    report = reconcile()
    assert report.launched == [] and "next attempt in" in report.errors[0]
    Node.objects.filter(pk=first.pk).update(status_changed_at=timezone.now() - timedelta(minutes=3))
    assert len(reconcile().launched) == 1

    Node.objects.filter(model=served_model, status=NodeStatus.PENDING).delete()
    _failed_at(served_model, 3)  # 2 failures, the last 3 min ago: wait 4 min
    assert reconcile().launched == []
    Node.objects.filter(model=served_model).update(status_changed_at=timezone.now() - timedelta(minutes=5))
    assert len(reconcile().launched) == 1


def test_a_ready_node_clears_the_brake(served_model, settings) -> None:
    settings.FLEET_RELAUNCH_BACKOFF_S = 0
    _keep(served_model, 1)
    for minutes_ago in (50, 40, 30):
        _failed_at(served_model, minutes_ago)
    assert reconcile().launched == []

    ok = _walk(
        node_create(model=served_model, launcher="static", endpoint_url="http://127.0.0.1:9"), "loading", "ready"
    )  # staff fixed the cause and launched one by hand
    Node.objects.filter(pk=ok.pk).update(ready_at=timezone.now() - timedelta(minutes=20))
    _walk(Node.objects.get(pk=ok.pk), "draining", "terminating", "terminated")

    assert len(reconcile().launched) == 1
