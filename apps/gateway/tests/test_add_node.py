"""`manage.py add_node` registers an existing vLLM server as a static node after one health probe."""

from __future__ import annotations

import socket
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from apps.fleet.models import Node, NodeEvent, NodeStatus
from apps.gateway.simulator import run_simulator_process

pytestmark = pytest.mark.django_db


@pytest.fixture(scope="module")
def sim():
    with run_simulator_process(model="llama-3-8b", api_key="static-node-key", ttft_ms=1, itl_ms=0,
                               light=True) as handle:
        yield handle


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_a_healthy_endpoint_becomes_a_ready_static_node_with_its_key_kept(catalog_model, sim):
    out = StringIO()

    call_command("add_node", model="llama-3-8b", endpoint=sim.url + "/", api_key="static-node-key", stdout=out)

    node = Node.objects.get()
    assert node.launcher == "static" and node.model == catalog_model
    assert node.status == NodeStatus.READY and node.ready_at is not None
    assert node.endpoint_url == sim.url
    assert node.launcher_state["static_api_key"] == "static-node-key"
    assert node.health_latency_ms is not None and node.last_health_at is not None
    assert NodeEvent.objects.filter(node=node, from_status=NodeStatus.PENDING, to_status=NodeStatus.READY,
                                    actor="add_node").exists()
    assert "is ready" in out.getvalue()
    assert "static-node-key" not in out.getvalue()


def test_an_sdk_style_base_url_is_accepted(catalog_model, sim):
    call_command("add_node", model="llama-3-8b", endpoint=sim.url + "/v1", stdout=StringIO())

    node = Node.objects.get()
    assert node.endpoint_url == sim.url and node.status == NodeStatus.READY
    assert "static_api_key" not in node.launcher_state


def test_an_unreachable_endpoint_leaves_a_failed_node_and_a_nonzero_exit(catalog_model):
    url = f"http://127.0.0.1:{closed_port()}"

    with pytest.raises(CommandError, match="failed: health probe failed: ConnectError"):
        call_command("add_node", model="llama-3-8b", endpoint=url, api_key="k", timeout=1, stdout=StringIO())

    node = Node.objects.get()
    assert node.status == NodeStatus.FAILED
    assert "ConnectError" in node.status_reason
    assert "static_api_key" not in node.launcher_state
    assert NodeEvent.objects.filter(node=node, to_status=NodeStatus.FAILED).exists()


def test_an_unknown_model_is_refused_before_anything_is_created(db):
    with pytest.raises(CommandError, match="Unknown model 'nope'"):
        call_command("add_node", model="nope", endpoint="http://127.0.0.1:8000", stdout=StringIO())

    assert not Node.objects.exists()


@pytest.mark.parametrize("endpoint", ["not a url", "ftp://host/x", "127.0.0.1:8000"])
def test_a_bad_url_is_refused(catalog_model, endpoint):
    with pytest.raises(CommandError, match="is not an http"):
        call_command("add_node", model="llama-3-8b", endpoint=endpoint, stdout=StringIO())

    assert not Node.objects.exists()
