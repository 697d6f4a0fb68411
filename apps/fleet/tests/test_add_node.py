"""`manage.py add_node` (apps.fleet.static_nodes.static_node_add) registers an existing vLLM server as a
static node after one probe, the health checker's own."""

from __future__ import annotations

import json
import re
import socket
from io import StringIO

import pytest
from django.core.exceptions import ValidationError
from django.core.management import CommandError, call_command

from apps.fleet.keys import static_key
from apps.fleet.models import Node, NodeEvent, NodeStatus
from apps.fleet.static_nodes import static_node_add
from vllm_sim import run_simulator_process

pytestmark = [pytest.mark.django_db, pytest.mark.slow]  # starts simulator processes


@pytest.fixture(scope="module")
def sim():
    with run_simulator_process(
        model="llama-3-8b", api_key="static-node-key", ttft_ms=1, itl_ms=0, light=True
    ) as handle:
        yield handle


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_healthy_endpoint_becomes_a_ready_static_node_with_its_key_kept(catalog_model, sim):
    sim.reset()
    out = StringIO()

    call_command("add_node", model="llama-3-8b", endpoint=sim.url + "/", api_key="static-node-key", stdout=out)

    node = Node.objects.get()
    assert node.launcher == "static" and node.model == catalog_model
    assert node.status == NodeStatus.READY and node.ready_at is not None
    assert node.endpoint_url == sim.url
    assert static_key(node.pk, node.launcher_state) == "static-node-key"
    assert "static-node-key" not in json.dumps(node.launcher_state)  # sealed, never in clear
    assert node.health_latency_ms is not None and node.last_health_at is not None
    assert NodeEvent.objects.filter(
        node=node, from_status=NodeStatus.PENDING, to_status=NodeStatus.READY, actor="add_node"
    ).exists()
    assert "is ready" in out.getvalue()
    assert "static-node-key" not in out.getvalue()
    assert sim.stats()["authorization_headers"] == ["Bearer static-node-key"]  # the /v1/models check


def test_an_sdk_style_base_url_is_accepted(catalog_model, sim):
    call_command("add_node", model="llama-3-8b", endpoint=sim.url + "/v1", api_key="static-node-key", stdout=StringIO())

    node = Node.objects.get()
    assert node.endpoint_url == sim.url and node.status == NodeStatus.READY


def test_an_unreachable_endpoint_leaves_a_failed_node_and_a_nonzero_exit(catalog_model):
    url = f"http://127.0.0.1:{closed_port()}"

    with pytest.raises(CommandError, match="failed: health probe failed: ClientConnectorError"):
        call_command("add_node", model="llama-3-8b", endpoint=url, api_key="k", timeout=1, stdout=StringIO())

    node = Node.objects.get()
    assert node.status == NodeStatus.FAILED
    assert "ClientConnectorError" in node.status_reason
    assert static_key(node.pk, node.launcher_state) is None
    assert NodeEvent.objects.filter(node=node, to_status=NodeStatus.FAILED).exists()


@pytest.mark.parametrize(
    ("api_key", "reason"),
    [("wrong-key", "the server refused the API key"), (None, "the server requires an API key (--api-key)")],
)
def test_a_server_that_refuses_our_key_is_failed(catalog_model, sim, api_key, reason):
    with pytest.raises(CommandError, match=re.escape(reason)):
        call_command("add_node", model="llama-3-8b", endpoint=sim.url, api_key=api_key, stdout=StringIO())

    node = Node.objects.get()
    assert node.status == NodeStatus.FAILED and node.status_reason == reason


def test_a_server_serving_another_model_is_failed(db, sim):
    from apps.catalog.services import model_create

    model_create(name="mistral-7b")

    with pytest.raises(CommandError, match="the server serves llama-3-8b, not mistral-7b"):
        call_command("add_node", model="mistral-7b", endpoint=sim.url, api_key="static-node-key", stdout=StringIO())

    assert Node.objects.get().status == NodeStatus.FAILED


def test_an_unknown_model_is_refused_before_anything_is_created(db):
    with pytest.raises(CommandError, match="Unknown model 'nope'"):
        call_command("add_node", model="nope", endpoint="http://127.0.0.1:8000", stdout=StringIO())

    assert not Node.objects.exists()


@pytest.mark.parametrize("endpoint", ["not a url", "ftp://host/x", "127.0.0.1:8000"])
def test_a_bad_url_is_refused(catalog_model, endpoint):
    with pytest.raises(CommandError, match="is not an http"):
        call_command("add_node", model="llama-3-8b", endpoint=endpoint, stdout=StringIO())

    assert not Node.objects.exists()


def test_a_server_whose_health_fails_is_failed_with_the_health_checkers_reason(catalog_model, sim):
    sim.set_faults(health_status=503)
    try:
        node = static_node_add(model=catalog_model, endpoint_url=sim.url, api_key="static-node-key", timeout_s=2)
    finally:
        sim.set_faults(health_status=200)

    assert node.status == NodeStatus.FAILED
    assert node.status_reason == "health probe failed: /health answered 503"  # health.check_targets' words
    assert Node.objects.get().consecutive_failures == 1


@pytest.mark.parametrize("timeout_s", [0, -1.5])
def test_a_non_positive_timeout_is_refused_before_anything_is_created(catalog_model, timeout_s):
    with pytest.raises(ValidationError, match="timeout must be positive"):
        static_node_add(model=catalog_model, endpoint_url="http://127.0.0.1:8000", timeout_s=timeout_s)

    assert not Node.objects.exists()
