"""Node registration (one-time token) and the staff-only node management API."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.conf import settings
from django.utils import timezone
from rest_framework.test import APIClient

from apps.fleet import lifecycle
from apps.fleet.keys import registration_token_issue
from apps.fleet.models import Node, NodeEvent, NodeStatus
from apps.fleet.services import node_create
from apps.fleet.transitions import node_transition

pytestmark = pytest.mark.django_db
REGISTER = "/api/v1/nodes/register"


@pytest.fixture
def provisioning(served_model):
    """A node mid-launch, and the raw token its machine received."""
    node = node_create(model=served_model, launcher="local")
    Node.objects.filter(pk=node.pk).update(requested_at=timezone.now() - timedelta(seconds=120))
    node.refresh_from_db()
    raw, token_hash = registration_token_issue()
    node_transition(node=node, to=NodeStatus.PROVISIONING, registration_token_digest=token_hash)
    return node, raw


def test_a_good_token_registers_the_node_once(provisioning) -> None:
    node, raw = provisioning
    t0 = node.requested_at
    body = {
        "endpoint_url": "http://10.0.0.5:8000",
        "provisioned_at": int((t0 + timedelta(seconds=40)).timestamp()),
        "weights_loaded_at": (t0 + timedelta(seconds=46)).isoformat(),
    }

    response = APIClient().post(REGISTER, body, format="json", HTTP_AUTHORIZATION=f"Bearer {raw}")

    assert response.status_code == 200, response.content
    assert response.json()["status"] == "loading"
    node.refresh_from_db()
    assert node.status == NodeStatus.LOADING and node.endpoint_url == "http://10.0.0.5:8000"
    assert node.registered_at is not None
    assert 39 < (node.provisioned_at - t0).total_seconds() <= 40  # Unix seconds from the node's shell
    assert (node.weights_loaded_at - t0).total_seconds() == pytest.approx(46, abs=0.001)

    again = APIClient().post(REGISTER, {"token": raw}, format="json")
    assert again.status_code == 409 and "already used" in again.json()["error"]["message"]


def test_a_wrong_token_is_401_and_changes_nothing(provisioning) -> None:
    node, raw = provisioning
    for bad in (raw[:-1] + ("x" if raw[-1] != "x" else "y"), "clr_short", "", "clk_" + raw[4:]):
        response = APIClient().post(REGISTER, {"token": bad, "endpoint_url": "http://10.6.6.6:8000"}, format="json")
        assert response.status_code == 401, bad
        assert response.json()["error"]["message"] == "Invalid registration token."
    node.refresh_from_db()
    assert node.status == NodeStatus.PROVISIONING and node.endpoint_url == ""


def test_registration_attempts_are_throttled_per_address_and_a_good_token_still_waits(provisioning, redis_db) -> None:
    node, raw = provisioning
    allowed = int(settings.REST_FRAMEWORK["DEFAULT_THROTTLE_RATES"]["node-register"].split("/")[0])
    client = APIClient(REMOTE_ADDR="203.0.113.7")
    statuses = [client.post(REGISTER, {"token": "clr_guess"}, format="json").status_code for _ in range(allowed)]

    throttled = client.post(REGISTER, {"token": raw, "endpoint_url": "http://10.0.0.5:8000"}, format="json")

    assert statuses == [401] * allowed
    assert throttled.status_code == 429 and int(throttled["Retry-After"]) > 0
    assert set(throttled.json()["error"]) >= {"message", "type"}
    assert redis_db.keys("crosslogic:*throttle_node-register_203.0.113.7")  # counted in the shared Redis
    node.refresh_from_db()
    assert node.status == NodeStatus.PROVISIONING  # nothing happened
    other = APIClient(REMOTE_ADDR="203.0.113.8").post(
        REGISTER, {"token": raw, "endpoint_url": "http://10.0.0.5:8000"}, format="json"
    )
    assert other.status_code == 200  # another address is not held back


def test_a_terminated_node_cannot_register(provisioning) -> None:
    node, raw = provisioning
    node_transition(node=node, to=NodeStatus.TERMINATING)
    node_transition(node=node, to=NodeStatus.TERMINATED)
    response = APIClient().post(REGISTER, {"token": raw}, format="json")
    assert response.status_code == 409 and "terminated" in response.json()["error"]["message"]


def test_node_clock_skew_is_clamped_and_bad_timestamps_name_the_field(provisioning) -> None:
    node, raw = provisioning
    bad = APIClient().post(REGISTER, {"token": raw, "provisioned_at": "yesterday-ish"}, format="json")
    assert bad.status_code == 400 and "provisioned_at" in bad.json()["error"]["fields"]
    future = (timezone.now() + timedelta(days=2)).isoformat()
    ok = APIClient().post(REGISTER, {"token": raw, "weights_loaded_at": future}, format="json")
    assert ok.status_code == 200
    node.refresh_from_db()
    assert node.weights_loaded_at <= timezone.now()


def test_customers_get_403_on_the_node_api(api_key) -> None:
    _, raw = api_key
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    assert client.get("/api/v1/nodes/").status_code == 403
    assert client.post("/api/v1/nodes/", {"model": "x"}, format="json").status_code == 403
    assert APIClient().get("/api/v1/nodes/").status_code in (401, 403)


def test_staff_launch_filter_and_act_on_nodes(staff_client, served_model) -> None:
    created = staff_client.post("/api/v1/nodes/", {"model": served_model.name, "launcher": "local"}, format="json")
    assert created.status_code == 201, created.content
    node_id = created.json()["id"]
    assert created.json()["status"] == "pending" and created.json()["cluster_name"] == f"crosslogic-{node_id}"
    assert "registration_token_digest" not in created.json()
    node_create(model=served_model, launcher="static", endpoint_url="http://127.0.0.1:9")

    listed = staff_client.get("/api/v1/nodes/", {"launcher": "local", "model": served_model.name}).json()
    assert [n["id"] for n in listed["results"]] == [node_id]

    relaunched = staff_client.post(f"/api/v1/nodes/{node_id}/relaunch/")
    assert relaunched.status_code == 201 and relaunched.json()["id"] != node_id
    assert Node.objects.get(pk=node_id).status == NodeStatus.TERMINATED  # never got a machine

    again = staff_client.post(f"/api/v1/nodes/{node_id}/terminate/")
    assert again.status_code == 409 and "cannot go from terminated" in again.json()["error"]["message"]

    events = staff_client.get(f"/api/v1/nodes/{node_id}/events/").json()["results"]
    assert any("replaced by" in e["message"] for e in events)
    assert events[0]["created_at"] >= events[-1]["created_at"]


def test_launch_input_errors_name_the_field(staff_client, served_model) -> None:
    unknown = staff_client.post("/api/v1/nodes/", {"model": "no-such-model"}, format="json")
    assert unknown.status_code == 400 and "model" in unknown.json()["error"]["fields"]
    static = staff_client.post("/api/v1/nodes/", {"model": served_model.name, "launcher": "static"}, format="json")
    assert static.status_code == 400 and "endpoint_url" in static.json()["error"]["fields"]
    served_model.max_replicas = 0
    served_model.save()
    full = staff_client.post("/api/v1/nodes/", {"model": served_model.name, "launcher": "local"}, format="json")
    assert full.status_code == 400 and "max replicas" in full.json()["error"]["message"]


def test_drain_then_terminate_actions(staff_client, served_model) -> None:
    node = node_create(model=served_model, launcher="static", endpoint_url="http://127.0.0.1:9")
    lifecycle.launch_node(node.pk)
    node_transition(node=Node.objects.get(pk=node.pk), to=NodeStatus.READY)

    drained = staff_client.post(f"/api/v1/nodes/{node.pk}/drain/")
    assert drained.status_code == 200 and drained.json()["status"] == "draining"
    terminated = staff_client.post(f"/api/v1/nodes/{node.pk}/terminate/")
    assert terminated.status_code == 200 and terminated.json()["status"] == "terminating"
    assert NodeEvent.objects.filter(node=node, actor="staff:ops", to_status="terminating").exists()


def test_check_health_action_reports_an_unreachable_node(staff_client, served_model) -> None:
    node = node_create(model=served_model, launcher="static", endpoint_url="http://127.0.0.1:9")
    lifecycle.launch_node(node.pk)
    response = staff_client.post(f"/api/v1/nodes/{node.pk}/check-health/")
    assert response.status_code == 200
    assert response.json()["consecutive_failures"] == 1 and response.json()["last_health_at"]
    assert response.json()["status"] == "loading"


def test_registration_still_works_when_the_throttle_cache_is_unreachable(provisioning, monkeypatch, caplog) -> None:
    import socket

    from django.core.cache.backends.redis import RedisCache

    from apps.fleet.api import RegistrationThrottle

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        dead_port = s.getsockname()[1]
    monkeypatch.setattr(RegistrationThrottle, "cache", RedisCache(f"redis://127.0.0.1:{dead_port}/0", {}))
    node, raw = provisioning

    response = APIClient().post(REGISTER, {"token": raw, "endpoint_url": "http://10.0.0.5:8000"}, format="json")

    assert response.status_code == 200  # the token check still guards the door
    node.refresh_from_db()
    assert node.status == NodeStatus.LOADING
    assert "registration throttle skipped: cache unavailable" in caplog.text
