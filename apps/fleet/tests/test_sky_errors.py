"""What the real SkyPilot SDK does that our first fake did not: user-scoped status, enabled_clouds
only in sky.client.sdk, and every exception class sky.get can re-raise (issue #10, items 1, 2, 4)."""

from __future__ import annotations

import inspect
import os

import pytest
import requests

from apps.fleet import lifecycle
from apps.fleet.models import Node, NodeStatus
from apps.fleet.reconcile import reconcile
from apps.fleet.services import node_create, node_transition

pytestmark = pytest.mark.django_db


def _reload(node: Node) -> Node:
    return Node.objects.get(pk=node.pk)


def _ready_sky_node(model, fake_sky, real_sky, *, owner: str) -> Node:
    node = node_create(model=model, launcher="skypilot", cloud="aws", region="us-east-1")
    for status in ("provisioning", "loading", "ready"):
        node_transition(node=node, to=status)
    fake_sky.clusters[node.cluster_name] = {
        "name": node.cluster_name,
        "status": real_sky.ClusterStatus.UP,
        "launched_at": 1_000_000,
        "user_hash": owner,
    }
    return _reload(node)


# --- item 1: one identity, all users, our prefix ------------------------------------------------


def test_a_worker_with_another_skypilot_identity_still_sees_the_live_clusters(served_model, fake_sky, real_sky) -> None:
    # Launched by the previous deployment (another user hash); this worker is "worker-a".
    node = _ready_sky_node(served_model, fake_sky, real_sky, owner="old-deploy-7f3a")

    report = reconcile()

    assert report.preempted == [] and report.orphans == []
    assert _reload(node).status == NodeStatus.READY
    ((_, status_call),) = [c for c in fake_sky.calls if c[0] == "status"]
    assert status_call["all_users"] is True


def test_clusters_of_other_teams_on_a_shared_api_server_are_never_ours(
    served_model, fake_sky, real_sky, settings
) -> None:
    settings.FLEET_ORPHAN_GRACE_S = 0
    up = real_sky.ClusterStatus.UP
    fake_sky.clusters.update(
        {
            "research-42": {"name": "research-42", "status": up, "launched_at": 1, "user_hash": "alice"},
            "worker-a-scratch": {"name": "worker-a-scratch", "status": up, "launched_at": 1, "user_hash": "worker-a"},
            "crosslogic-777": {"name": "crosslogic-777", "status": up, "launched_at": 1, "user_hash": "worker-a"},
        }
    )
    from apps.fleet import sky

    assert [c.name for c in sky.clusters()] == ["crosslogic-777"]
    assert reconcile().orphans == ["crosslogic-777"]
    assert ("down", "research-42") not in fake_sky.calls and ("down", "worker-a-scratch") not in fake_sky.calls


def test_the_pinned_skypilot_identity_is_what_the_sdk_sends(monkeypatch, settings) -> None:
    from apps.fleet import sky

    for name in (
        "SKYPILOT_API_SERVER_ENDPOINT",
        "SKYPILOT_USER_ID",
        "SKYPILOT_SERVICE_ACCOUNT_TOKEN",
        "SKYPILOT_DISABLE_LOCAL_API_SERVER",
    ):
        monkeypatch.delenv(name, raising=False)  # restored after the test
    settings.SKYPILOT_API_SERVER_ENDPOINT = "http://skypilot.test:46580"
    settings.SKYPILOT_USER_ID = "crosslogic-fleet"
    settings.SKYPILOT_SERVICE_ACCOUNT_TOKEN = "sky_test_token"
    sky._sdk()
    assert os.environ["SKYPILOT_USER_ID"] == "crosslogic-fleet"
    assert os.environ["SKYPILOT_SERVICE_ACCOUNT_TOKEN"] == "sky_test_token"
    # The worker must never start an API server of its own when the configured one is down.
    assert os.environ["SKYPILOT_DISABLE_LOCAL_API_SERVER"] == "1"

    settings.SKYPILOT_SERVICE_ACCOUNT_TOKEN = ""
    sky._sdk()
    assert "SKYPILOT_SERVICE_ACCOUNT_TOKEN" not in os.environ


# --- item 2: enabled_clouds ---------------------------------------------------------------------


def test_enabled_clouds_comes_from_the_client_sdk_module(fake_sky, real_sky) -> None:
    from apps.fleet import sky

    assert not hasattr(real_sky, "enabled_clouds")  # the fact the first version tripped over
    fake_sky.enabled = ["AWS", "Azure"]
    assert sky.server_report() == ("0.14.1", ["AWS", "Azure"])


# --- item 4: every exception sky.get can raise has an outcome ------------------------------------


def _instance(cls: type[BaseException]) -> BaseException:
    """An instance built the way the server's deserializer does: positional args of the right kind."""
    args = []
    for param in list(inspect.signature(cls.__init__).parameters.values())[1:]:
        if param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD) or param.default is not param.empty:
            continue
        hint = str(param.annotation)
        if "Reason" in hint:
            args.append(next(iter(cls.Reason)))  # type: ignore[attr-defined]  # the classes taking a Reason define it
            continue
        args.append(1 if "int" in hint else [] if "List" in hint or "list" in hint else f"{param.name} from the server")
    return cls(*args) if args else cls(f"{cls.__name__} from the server")


def _sky_exception_classes() -> list[type[BaseException]]:
    import sky.exceptions as exc_mod

    return [
        obj
        for _, obj in inspect.getmembers(exc_mod, inspect.isclass)
        if issubclass(obj, BaseException) and obj.__module__ == exc_mod.__name__
    ]


def test_the_fake_can_raise_every_exception_class_of_the_installed_skypilot() -> None:
    classes = _sky_exception_classes()
    assert len(classes) > 50  # 0.14.1 defines ~75; all constructible as the server sends them
    for cls in classes:
        assert isinstance(_instance(cls), cls)


ERRORS = [
    *_sky_exception_classes(),
    requests.exceptions.ConnectionError,
    requests.exceptions.ReadTimeout,
    RuntimeError,
    ValueError,
    KeyError,
]


@pytest.mark.parametrize("error_cls", ERRORS, ids=lambda c: c.__name__)
def test_every_error_a_launch_request_can_finish_with_gets_a_node_outcome(
    error_cls, served_model, fake_sky, settings
) -> None:
    settings.FLEET_LAUNCH_POLL_S = 1
    node = node_create(model=served_model, launcher="skypilot", cloud="aws", region="us-east-1")
    lifecycle.launch_node(node.pk)
    error = _instance(error_cls)
    fake_sky.finish(fake_sky.last("launch"), error=error)

    steps = [lifecycle.poll_launch(node.pk) for _ in range(lifecycle.MAX_API_RETRIES + 1)]  # never raises

    node = _reload(node)
    retried = [s for s in steps if s.then == "poll"]
    assert node.status == NodeStatus.FAILED, f"{error_cls.__name__} left the node {node.status}"
    assert node.status_reason.strip()
    if retried:  # a transient error: retried with back-off, then given up with the reason
        assert "gave up" in node.status_reason
    assert len(node.status_reason) < 5000


@pytest.mark.parametrize("unreachable_from", ["api_status", "get"])
def test_a_server_that_went_away_mid_poll_is_retried_not_a_crash(
    unreachable_from, served_model, fake_sky, real_sky
) -> None:
    node = node_create(model=served_model, launcher="skypilot", cloud="aws", region="us-east-1")
    lifecycle.launch_node(node.pk)
    if unreachable_from == "get":
        fake_sky.finish(fake_sky.last("launch"), result=(1, "handle"))
    fake_sky.unreachable = True  # get/api_status now raise requests.ConnectionError, like the real client

    step = lifecycle.poll_launch(node.pk)

    assert step.then == "poll" and step.again_in > 0
    assert _reload(node).status == NodeStatus.PROVISIONING
    fake_sky.unreachable = False
    fake_sky.finish(fake_sky.last("launch"), result=(1, "handle")) if unreachable_from == "api_status" else None
    lifecycle.poll_launch(node.pk)
    assert _reload(node).launcher_state["launched"] is True
