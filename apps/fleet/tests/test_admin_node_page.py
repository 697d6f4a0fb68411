"""The node page: its action buttons (confirmation first for what destroys), its log tail, the
launch preview's replica-cap warning, and money/latency formatted for people."""

from __future__ import annotations

from decimal import Decimal

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client
from django.urls import reverse

from apps.fleet.models import Node, NodeEvent, NodeStatus
from apps.fleet.services import node_create
from apps.fleet.transitions import node_transition

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client_(staff_user) -> Client:
    client = Client()
    client.force_login(staff_user)
    return client


@pytest.fixture
def viewer_client() -> Client:
    """A staff member who may look at nodes but not act on them."""
    viewer = User.objects.create_user("viewer", password="pw-viewer-123456", is_staff=True)
    viewer.user_permissions.set(Permission.objects.filter(codename__in=["view_node", "view_nodeevent"]))
    client = Client()
    client.force_login(viewer)
    return client


def _ready(node: Node) -> Node:
    node_transition(node=node, to=NodeStatus.LOADING)
    return node_transition(node=node, to=NodeStatus.READY)


def _static_node(model) -> Node:
    return node_create(model=model, launcher="static", endpoint_url="http://127.0.0.1:9", hourly_cost="1.2300")


def test_a_ready_node_page_offers_drain_terminate_relaunch_and_check_health(admin_client_, served_model) -> None:
    node = _ready(_static_node(served_model))

    text = admin_client_.get(reverse("admin:fleet_node_change", args=[node.pk])).content.decode()

    for action in ("drain", "terminate", "relaunch"):
        assert f'id="object-action-{action}"' in text
        assert reverse("admin:fleet_node_action", args=[node.pk, action]) in text
    assert 'id="object-action-check-health"' in text and 'id="check-health-form"' in text
    assert 'id="object-action-force_terminated"' not in text  # only for stuck (terminating/failed) nodes
    assert "$1.23/h" in text


def test_an_ended_node_offers_only_relaunch(admin_client_, served_model) -> None:
    node = _static_node(served_model)
    node_transition(node=node, to=NodeStatus.TERMINATED)

    text = admin_client_.get(reverse("admin:fleet_node_change", args=[node.pk])).content.decode()

    assert 'id="object-action-relaunch"' in text
    for absent in ("drain", "terminate", "check-health", "force_terminated"):
        assert f'id="object-action-{absent}"' not in text


def test_terminate_asks_for_confirmation_then_calls_the_service(admin_client_, served_model) -> None:
    node = _ready(_static_node(served_model))
    url = reverse("admin:fleet_node_action", args=[node.pk, "terminate"])

    asked = admin_client_.get(url)

    assert asked.status_code == 200
    assert "Yes, terminate" in asked.content.decode() and str(node) in asked.content.decode()
    assert Node.objects.get(pk=node.pk).status == NodeStatus.READY  # a GET changes nothing

    done = admin_client_.post(url, {"confirm": "1", "reason": "bad GPU"})

    assert done.status_code == 302 and done["Location"] == reverse("admin:fleet_node_change", args=[node.pk])
    node.refresh_from_db()
    assert node.status == NodeStatus.TERMINATING and node.status_reason == "bad GPU"
    assert NodeEvent.objects.filter(node=node, to_status=NodeStatus.TERMINATING, actor="staff:ops").exists()


def test_drain_without_a_reason_records_a_default_one(admin_client_, served_model) -> None:
    node = _ready(_static_node(served_model))

    admin_client_.post(reverse("admin:fleet_node_action", args=[node.pk, "drain"]), {"confirm": "1", "reason": ""})

    node.refresh_from_db()
    assert node.status == NodeStatus.DRAINING and node.status_reason == "drain node"


def test_relaunch_from_the_page_replaces_the_node(admin_client_, served_model) -> None:
    node = _ready(_static_node(served_model))

    admin_client_.post(reverse("admin:fleet_node_action", args=[node.pk, "relaunch"]), {"confirm": "1"})

    node.refresh_from_db()
    assert node.status == NodeStatus.TERMINATING
    assert Node.objects.filter(model=served_model).exclude(pk=node.pk).get().status == NodeStatus.PENDING


def test_an_action_that_does_not_apply_changes_nothing_and_says_so(admin_client_, served_model) -> None:
    node = _static_node(served_model)  # pending: nothing to drain

    response = admin_client_.post(
        reverse("admin:fleet_node_action", args=[node.pk, "drain"]), {"confirm": "1"}, follow=True
    )

    assert response.status_code == 200 and "Nothing to do" in response.content.decode()
    assert Node.objects.get(pk=node.pk).status == NodeStatus.PENDING


def test_what_the_service_refuses_is_a_message_not_a_500(admin_client_, served_model) -> None:
    node = _ready(_static_node(served_model))
    served_model.is_active = False  # relaunching needs an active model: node_request_launch refuses
    served_model.save()

    response = admin_client_.post(
        reverse("admin:fleet_node_action", args=[node.pk, "relaunch"]), {"confirm": "1"}, follow=True
    )

    assert response.status_code == 200 and "Refused:" in response.content.decode()
    assert "is not active" in response.content.decode()
    assert Node.objects.get(pk=node.pk).status == NodeStatus.READY  # the whole relaunch rolled back
    assert Node.objects.filter(model=served_model).count() == 1


def test_unknown_actions_and_nodes_are_404(admin_client_, served_model) -> None:
    node = _static_node(served_model)
    assert admin_client_.get(reverse("admin:fleet_node_action", args=[node.pk, "explode"])).status_code == 404
    assert admin_client_.get(reverse("admin:fleet_node_action", args=[999999, "terminate"])).status_code == 404
    assert admin_client_.get(reverse("admin:fleet_node_log", args=[999999])).status_code == 404


def test_staff_without_change_permission_see_no_buttons_and_cannot_act(viewer_client, served_model) -> None:
    node = _ready(_static_node(served_model))

    page = viewer_client.get(reverse("admin:fleet_node_change", args=[node.pk]))

    assert page.status_code == 200 and "object-action-" not in page.content.decode()
    url = reverse("admin:fleet_node_action", args=[node.pk, "terminate"])
    assert viewer_client.get(url).status_code == 403
    assert viewer_client.post(url, {"confirm": "1"}).status_code == 403
    assert viewer_client.post(reverse("admin:fleet_node_check_health", args=[node.pk])).status_code == 403
    assert Node.objects.get(pk=node.pk).status == NodeStatus.READY
    assert viewer_client.get(reverse("admin:fleet_node_log", args=[node.pk])).status_code == 200  # reading is fine


def test_anonymous_users_are_sent_to_the_login_page(served_model) -> None:
    node = _static_node(served_model)
    for url in (
        reverse("admin:fleet_node_action", args=[node.pk, "terminate"]),
        reverse("admin:fleet_node_log", args=[node.pk]),
    ):
        response = Client().get(url)
        assert response.status_code == 302 and "/admin/login/" in response["Location"]


def test_check_health_button_runs_a_check_now(admin_client_, served_model) -> None:
    node = _ready(_static_node(served_model))  # its endpoint (port 9) refuses connections
    url = reverse("admin:fleet_node_check_health", args=[node.pk])

    assert admin_client_.get(url).status_code == 302  # a GET checks nothing
    assert Node.objects.get(pk=node.pk).consecutive_failures == 0

    response = admin_client_.post(url, follow=True)

    assert response.status_code == 200 and "not healthy" in response.content.decode()
    assert Node.objects.get(pk=node.pk).consecutive_failures == 1


def test_local_node_log_tail_reads_its_own_log_file(admin_client_, served_model, settings, tmp_path) -> None:
    settings.VAR_DIR = tmp_path
    node = node_create(model=served_model, launcher="local")
    log_url = reverse("admin:fleet_node_log", args=[node.pk])
    assert "No log yet" in admin_client_.get(log_url).content.decode()

    (tmp_path / "fleet").mkdir(exist_ok=True)
    lines = [f"line {i}" for i in range(100)]
    (tmp_path / "fleet" / f"node-{node.pk}.log").write_text("\n".join(lines) + "\n")
    # A path planted in launcher_state is never followed: the file name comes from the node id.
    Node.objects.filter(pk=node.pk).update(launcher_state={"pid": 1, "log": "/etc/passwd"})

    response = admin_client_.get(log_url)

    assert response.status_code == 200 and response["Content-Type"].startswith("text/plain")
    assert response.content.decode().splitlines() == lines[-40:]
    page = admin_client_.get(reverse("admin:fleet_node_change", args=[node.pk])).content.decode()
    assert f'data-url="{log_url}"' in page


def test_static_node_log_is_not_available(admin_client_, served_model) -> None:
    node = _static_node(served_model)
    text = admin_client_.get(reverse("admin:fleet_node_log", args=[node.pk])).content.decode()
    assert text.startswith("Not available")


def test_skypilot_node_log_tail_comes_from_the_job_log(admin_client_, served_model, fake_sky) -> None:
    node = node_create(model=served_model, launcher="skypilot")
    log_url = reverse("admin:fleet_node_log", args=[node.pk])
    assert "not been launched" in admin_client_.get(log_url).content.decode()  # pending: no SDK call
    assert not [c for c in fake_sky.calls if c[0] == "tail_logs"]

    fake_sky.clusters[node.cluster_name] = {"name": node.cluster_name, "status": None, "launched_at": 1.0}
    fake_sky.jobs[(node.cluster_name, 1)] = "RUNNING"
    fake_sky.job_logs[(node.cluster_name, 1)] = "\n".join(f"vllm line {i}" for i in range(60))
    Node.objects.filter(pk=node.pk).update(launcher_state={"launch_request_id": "req-1", "job_id": 1})

    text = admin_client_.get(log_url).content.decode()

    assert text.splitlines() == [f"vllm line {i}" for i in range(20, 60)]
    ((_, tail_call),) = [c for c in fake_sky.calls if c[0] == "tail_logs"]
    assert tail_call[1]["follow"] is False and tail_call[1]["tail"] == 40


def test_skypilot_log_tail_says_why_when_the_cluster_is_gone_or_the_server_is_down(
    admin_client_, served_model, fake_sky
) -> None:
    node = node_create(model=served_model, launcher="skypilot")
    Node.objects.filter(pk=node.pk).update(launcher_state={"launch_request_id": "req-1", "job_id": 1})
    log_url = reverse("admin:fleet_node_log", args=[node.pk])

    assert admin_client_.get(log_url).content.decode().startswith("(job log unavailable")  # no such cluster

    fake_sky.unreachable = True
    down = admin_client_.get(log_url)
    assert down.status_code == 200 and "SkyPilot API server unreachable" in down.content.decode()


def test_skypilot_log_tail_without_an_api_server_configured_says_so(admin_client_, served_model, settings) -> None:
    settings.SKYPILOT_API_SERVER_ENDPOINT = ""  # the real apps.fleet.sky._sdk, which refuses to start one
    node = node_create(model=served_model, launcher="skypilot")
    Node.objects.filter(pk=node.pk).update(launcher_state={"launch_request_id": "req-1", "job_id": 1})

    unset = admin_client_.get(reverse("admin:fleet_node_log", args=[node.pk]))

    assert unset.status_code == 200 and "SKYPILOT_API_SERVER_ENDPOINT is not set" in unset.content.decode()


def test_launch_preview_warns_about_the_replica_cap_before_confirm(admin_client_, served_model) -> None:
    served_model.max_replicas = 2
    served_model.save()
    _ready(_static_node(served_model))
    url = reverse("admin:fleet_node_launch")
    form = {"model": served_model.pk, "launcher": "local", "count": 1}

    within = admin_client_.post(url, {**form, "preview": "1"}).content.decode()
    assert 'id="replica-warning"' not in within

    over = admin_client_.post(url, {**form, "count": 2, "preview": "1"})

    text = over.content.decode()
    assert over.status_code == 200 and 'id="replica-warning"' in text
    assert "at most 2 live node(s)" in text and "has 1" in text and "would make 3" in text
    assert text.index('id="replica-warning"') < text.index('name="confirm"')
    refused = admin_client_.post(url, {**form, "count": 2, "confirm": "1"})
    assert refused.status_code == 200 and Node.objects.filter(model=served_model).count() == 1


def test_node_list_and_page_format_money_and_milliseconds(admin_client_, served_model) -> None:
    node = _ready(_static_node(served_model))
    Node.objects.filter(pk=node.pk).update(hourly_cost=Decimal("0.7100"), health_latency_ms=12.345678912)

    listing = admin_client_.get(reverse("admin:fleet_node_changelist")).content.decode()
    page = admin_client_.get(reverse("admin:fleet_node_change", args=[node.pk])).content.decode()

    assert "$0.71/h" in listing and "Cost per hour" in listing and "0.7100" not in listing
    assert "12.3 ms" in page and "12.345678912" not in page
