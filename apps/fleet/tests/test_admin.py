"""The fleet's admin: launch with a preview, actions, the node page, the append-only event log."""

from __future__ import annotations

import pytest
from django.test import Client
from django.urls import reverse

from apps.fleet.keys import registration_token_issue
from apps.fleet.models import Node, NodeEvent, NodeStatus
from apps.fleet.services import node_create
from apps.fleet.transitions import node_transition

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client_(staff_user) -> Client:
    client = Client()
    client.force_login(staff_user)
    return client


def test_launch_form_previews_the_skypilot_task_with_secrets_redacted_then_launches(
    admin_client_, served_model, settings
) -> None:
    settings.R2_SECRET_ACCESS_KEY = "r2-secret-that-must-not-show"
    url = reverse("admin:fleet_node_launch")
    empty = admin_client_.get(url)
    assert empty.status_code == 200 and 'value="Preview"' in empty.content.decode()
    changelist = admin_client_.get(reverse("admin:fleet_node_changelist")).content.decode()
    assert f'href="{url}"' in changelist
    form = {
        "model": served_model.pk,
        "launcher": "skypilot",
        "cloud": "aws",
        "region": "us-east-1",
        "accelerator": "",
        "use_spot": "on",
        "count": 2,
    }

    preview = admin_client_.post(url, {**form, "preview": "1"})

    assert preview.status_code == 200
    text = preview.content.decode()
    assert "vllm serve s3://crosslogic-weights/models/llama-3-8b-instruct" in text
    assert "runai_streamer" in text and "&lt;redacted&gt;" in text and "infra: aws/us-east-1" in text
    assert "r2-secret-that-must-not-show" not in text
    assert Node.objects.count() == 0  # nothing launched by a preview

    confirmed = admin_client_.post(url, {**form, "confirm": "1"})
    assert confirmed.status_code == 302
    assert Node.objects.filter(model=served_model, launcher="skypilot", cloud="aws").count() == 2


def test_launch_form_shows_the_local_command_and_field_errors(admin_client_, served_model) -> None:
    url = reverse("admin:fleet_node_launch")
    local = admin_client_.post(url, {"model": served_model.pk, "launcher": "local", "count": 1, "preview": "1"})
    assert (
        "run_local_node" in local.content.decode()
        and "CROSSLOGIC_REGISTRATION_TOKEN=&lt;redacted&gt;" in local.content.decode()
    )
    served_model.max_replicas = 1
    served_model.save()
    refused = admin_client_.post(url, {"model": served_model.pk, "launcher": "local", "count": 2, "confirm": "1"})
    assert refused.status_code == 200 and "raise max replicas" in refused.content.decode()
    assert Node.objects.count() == 0


def test_node_page_shows_events_load_and_cold_start_but_no_secrets(admin_client_, served_model) -> None:
    node = node_create(model=served_model, launcher="local")
    raw, token_hash = registration_token_issue()
    node_transition(node=node, to=NodeStatus.PROVISIONING, registration_token_digest=token_hash)
    node_transition(node=node, to=NodeStatus.LOADING, reason="registered")
    node_transition(node=node, to=NodeStatus.READY, reason="health check passed")
    Node.objects.filter(pk=node.pk).update(
        requests_running=3,
        requests_waiting=1,
        kv_cache_usage=0.4,
        last_health_at=node.ready_at,
        launcher_state={"pid": 4242, "static_api_key": "sk-static-secret-1"},
    )

    page = admin_client_.get(reverse("admin:fleet_node_change", args=[node.pk]))

    text = page.content.decode()
    assert page.status_code == 200
    assert "Cold start" in text and "weights loaded" in text and "health check passed" in text
    assert "3 running · 1 waiting" in text and "40%" in text
    assert token_hash not in text and raw not in text
    assert "4242" in text and "sk-static-secret-1" not in text


def test_changelist_actions_call_the_services(admin_client_, served_model) -> None:
    nodes = [node_create(model=served_model, launcher="static", endpoint_url="http://127.0.0.1:9") for _ in range(2)]
    for n in nodes:
        node_transition(node=n, to="loading")
        node_transition(node=n, to="ready")
    changelist = reverse("admin:fleet_node_changelist")
    assert admin_client_.get(changelist).status_code == 200

    admin_client_.post(changelist, {"action": "drain_nodes", "_selected_action": [nodes[0].pk]})
    admin_client_.post(changelist, {"action": "check_health_now", "_selected_action": [nodes[1].pk]})

    assert Node.objects.get(pk=nodes[0].pk).status == NodeStatus.DRAINING
    assert Node.objects.get(pk=nodes[1].pk).consecutive_failures == 1
    assert NodeEvent.objects.filter(node=nodes[0], actor="staff:ops").exists()


def test_node_events_are_append_only_in_the_admin(admin_client_, node) -> None:
    event = NodeEvent.objects.filter(node=node).first()
    assert admin_client_.get(reverse("admin:fleet_nodeevent_changelist")).status_code == 200
    assert admin_client_.get(reverse("admin:fleet_nodeevent_add")).status_code == 403
    assert (
        admin_client_.post(reverse("admin:fleet_nodeevent_delete", args=[event.pk]), {"post": "yes"}).status_code == 403
    )
    view = admin_client_.post(reverse("admin:fleet_nodeevent_change", args=[event.pk]), {"message": "rewritten"})
    assert view.status_code == 403 or NodeEvent.objects.get(pk=event.pk).message != "rewritten"


def test_changelist_queries_do_not_grow_with_the_fleet(
    admin_client_, served_model, django_assert_max_num_queries
) -> None:
    Node.objects.bulk_create(
        [
            Node(model=served_model, launcher="static", cluster_name=f"bulk-{i}", status=NodeStatus.READY)
            for i in range(300)
        ]
    )
    url = reverse("admin:fleet_node_changelist")
    with django_assert_max_num_queries(12):
        page = admin_client_.get(url)
    assert page.status_code == 200 and "bulk-299" in page.content.decode()
    with django_assert_max_num_queries(12):
        assert admin_client_.get(url, {"status__exact": "ready", "launcher__exact": "static"}).status_code == 200
    ended = admin_client_.get(url, {"live": "no"}).content.decode()
    assert "bulk-1" not in ended


def test_the_node_page_shows_only_the_newest_events(admin_client_, node) -> None:
    NodeEvent.objects.bulk_create([NodeEvent(node=node, message=f"event number {i:03d}") for i in range(60)])
    text = admin_client_.get(reverse("admin:fleet_node_change", args=[node.pk])).content.decode()
    assert "event number 059" in text and "event number 010" in text and "event number 009" not in text
