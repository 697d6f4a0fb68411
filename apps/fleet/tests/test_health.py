"""Health checks against real vLLM simulator processes on localhost."""

from __future__ import annotations

import threading

import httpx
import pytest

from apps.core import invalidation
from apps.fleet.health import run_health_checks
from apps.fleet.keys import SEALED_STATIC_KEY, seal_static_key
from apps.fleet.models import Node, NodeStatus
from apps.fleet.services import node_create
from apps.fleet.transitions import node_transition
from vllm_sim import run_simulator_process

pytestmark = [pytest.mark.django_db, pytest.mark.slow]


def _node(model, url: str, status: str) -> Node:
    node = node_create(model=model, launcher="static", endpoint_url=url)
    for step in {"loading": ["loading"], "ready": ["loading", "ready"]}[status]:
        node_transition(node=node, to=step)
    return Node.objects.get(pk=node.pk)


def test_loading_becomes_ready_on_first_success_and_load_is_recorded(
    served_model, redis_db, django_capture_on_commit_callbacks
) -> None:
    with run_simulator_process(model=served_model.name, itl_ms=50, ttft_ms=5) as sim:
        node = _node(served_model, sim.url, "loading")
        version_before = int(redis_db.get(invalidation.version_key(invalidation.ROUTING)) or 0)

        # Two streams in flight, so the node reports load.
        def stream() -> None:
            with httpx.stream(
                "POST",
                sim.base_url + "/chat/completions",
                timeout=30,
                json={
                    "model": served_model.name,
                    "stream": True,
                    "max_tokens": 60,
                    "messages": [{"role": "user", "content": "hi"}],
                },
            ) as response:
                for _ in response.iter_bytes():
                    pass

        threads = [threading.Thread(target=stream) for _ in range(2)]
        for t in threads:
            t.start()
        sim.wait_for(lambda s: s["running"] >= 2)

        with django_capture_on_commit_callbacks(execute=True):
            summary = run_health_checks()
        for t in threads:
            t.join()

    node.refresh_from_db()
    assert summary.checked == 1 and summary.healthy == 1
    assert node.status == NodeStatus.READY and node.ready_at is not None
    assert node.requests_running == 2 and node.requests_waiting == 0
    assert node.kv_cache_usage is not None and 0 < node.kv_cache_usage < 1
    assert node.health_latency_ms is not None and node.consecutive_failures == 0
    # The gateway's routing table is told at once.
    assert int(redis_db.get(invalidation.version_key(invalidation.ROUTING))) > version_before


def test_three_failures_make_a_ready_node_unhealthy_and_it_recovers(served_model, settings) -> None:
    settings.FLEET_HEALTH_TIMEOUT_S = 1.0
    with run_simulator_process(model=served_model.name) as sim:
        node = _node(served_model, sim.url, "ready")
        port = sim.port
        run_health_checks()
        sim.kill()  # vLLM died: nothing answers any more

        for expected_failures in (1, 2):
            run_health_checks()
            node.refresh_from_db()
            assert (node.status, node.consecutive_failures) == (NodeStatus.READY, expected_failures)
        run_health_checks()
        node.refresh_from_db()
        assert node.status == NodeStatus.UNHEALTHY and node.consecutive_failures == 3
        assert "3 consecutive health check failures" in node.status_reason

    with run_simulator_process(model=served_model.name, port=port):
        run_health_checks()
    node.refresh_from_db()
    assert node.status == NodeStatus.READY and node.consecutive_failures == 0
    assert node.status_reason.startswith("recovered")


def test_one_dead_node_does_not_slow_or_spoil_the_others(served_model, settings) -> None:
    settings.FLEET_HEALTH_TIMEOUT_S = 0.5
    with run_simulator_process(model=served_model.name) as sim:
        good = [_node(served_model, sim.url, "loading") for _ in range(3)]
        bad = _node(served_model, "http://10.255.255.1:8000", "ready")  # blackholed: times out
        summary = run_health_checks()
    assert summary.checked == 4 and summary.healthy == 3
    assert summary.seconds < 3  # concurrent: one timeout, not four
    assert {n.status for n in Node.objects.filter(pk__in=[g.pk for g in good])} == {NodeStatus.READY}
    bad.refresh_from_db()
    assert bad.consecutive_failures == 1 and bad.status == NodeStatus.READY


def test_a_503_engine_dead_answer_counts_as_a_failure_and_200_recovers(served_model) -> None:
    with run_simulator_process(model=served_model.name) as sim:
        node = _node(served_model, sim.url, "ready")
        sim.set_faults(health_status=503)
        for _ in range(3):
            run_health_checks()
        node.refresh_from_db()
        assert node.status == NodeStatus.UNHEALTHY and "/health answered 503" in node.status_reason
        assert node.health_latency_ms is not None  # it answered, just not OK

        sim.set_faults(health_status=200)
        run_health_checks()
    node.refresh_from_db()
    assert node.status == NodeStatus.READY


def _static_node(model, url: str, key: str) -> Node:
    """A ready static node whose sealed key (what the gateway presents) is ``key``."""
    node = _node(model, url, "ready")
    Node.objects.filter(pk=node.pk).update(launcher_state={SEALED_STATIC_KEY: seal_static_key(key)})
    return Node.objects.get(pk=node.pk)


def test_a_node_that_refused_our_key_does_not_flap_back_to_ready(served_model, settings) -> None:
    """The gateway marks a node unhealthy when it refuses the node key; /health needs no key, so
    the health check must try the key too, or the node came back at the next pass (issue #11)."""
    with run_simulator_process(model=served_model.name, api_key="rotated-key") as sim:
        node = _static_node(served_model, sim.url, "the-key-we-present")
        node_transition(
            node=node, to=NodeStatus.UNHEALTHY, reason="the node refused the gateway's node key", actor="gateway"
        )
        for _ in range(settings.FLEET_UNHEALTHY_AFTER + 1):
            summary = run_health_checks()
            node.refresh_from_db()
            assert node.status == NodeStatus.UNHEALTHY and summary.healthy == 0
        assert node.consecutive_failures == settings.FLEET_UNHEALTHY_AFTER + 1
        assert node.health_latency_ms is not None  # /health answered; the key did not pass

        # The same key presented as the node expects: it recovers.
        Node.objects.filter(pk=node.pk).update(launcher_state={SEALED_STATIC_KEY: seal_static_key("rotated-key")})
        run_health_checks()
    node.refresh_from_db()
    assert node.status == NodeStatus.READY and node.consecutive_failures == 0


def test_a_ready_node_refusing_our_key_becomes_unhealthy_with_the_reason(served_model, settings) -> None:
    with run_simulator_process(model=served_model.name, api_key="rotated-key") as sim:
        node = _static_node(served_model, sim.url, "the-key-we-present")
        for _ in range(settings.FLEET_UNHEALTHY_AFTER):
            run_health_checks()
    node.refresh_from_db()
    assert node.status == NodeStatus.UNHEALTHY
    assert "refused the gateway's node key (HTTP 401 on /v1/models)" in node.status_reason
    assert "the-key-we-present" not in node.status_reason and "rotated-key" not in node.status_reason
