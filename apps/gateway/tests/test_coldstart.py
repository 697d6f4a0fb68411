"""Scale from zero: a real gateway (uvicorn in a thread) holds requests for a model whose first node
is starting, and serves them from a real simulator process once that node turns ready."""

from __future__ import annotations

import json
import socket
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import timedelta

import httpx
import pytest
from django.utils import timezone

from apps.fleet import demand
from apps.fleet.keys import SEALED_STATIC_KEY, seal_static_key
from apps.fleet.models import Node, NodeStatus
from apps.fleet.services import node_create, node_transition
from apps.gateway.tests.conftest import NODE_KEY, wait_until
from apps.metering.models import UsageRecord
from vllm_sim import run_simulator_process

pytestmark = pytest.mark.slow  # starts a uvicorn gateway and simulator processes

MSG = [{"role": "user", "content": "Say something short"}]


@pytest.fixture
def scaled_to_zero(catalog_model):
    """The model's policy lets a node start on demand: min 0, max 2."""
    type(catalog_model).objects.filter(pk=catalog_model.pk).update(min_replicas=0, max_replicas=2)
    catalog_model.refresh_from_db()
    return catalog_model


def starting_node(model, endpoint_url: str = "", **times) -> Node:
    """A static node in state pending (on its way up), presenting NODE_KEY once it is ready."""
    node = node_create(model=model, launcher="static", endpoint_url=endpoint_url)
    Node.objects.filter(pk=node.pk).update(launcher_state={SEALED_STATIC_KEY: seal_static_key(NODE_KEY)}, **times)
    node.refresh_from_db()
    return node


def measured_cold_start(model, seconds: float) -> None:
    """A terminated node of the model that took ``seconds`` from request to ready."""
    now = timezone.now()
    node = node_create(model=model, launcher="static", endpoint_url="http://127.0.0.1:9")
    ready = now - timedelta(hours=1)
    Node.objects.filter(pk=node.pk).update(
        status=NodeStatus.TERMINATED, requested_at=ready - timedelta(seconds=seconds), ready_at=ready
    )


def post(gateway, api_key: str, body: dict, timeout: float = 60.0) -> httpx.Response:
    return httpx.post(
        gateway.base_url + "/chat/completions",
        json=body,
        headers={"Authorization": f"Bearer {api_key}"},
        timeout=timeout,
    )


def held(gateway, model) -> int:
    return gateway.app.cold.held.get(model.pk, 0)


def records(n: int, timeout_s: float = 10.0) -> list[UsageRecord]:
    wait_until(lambda: UsageRecord.objects.count() >= n, timeout_s)
    return list(UsageRecord.objects.order_by("id"))


def autoscale_triggered(redis_db, model_id: int) -> bool:
    """The fleet's deduplication mark of a triggered autoscale run (set when one is queued)."""
    return bool(redis_db.exists(demand.trigger_key(model_id)))


def test_a_held_stream_is_served_when_the_first_node_is_ready_and_metered_once(
    gateway, api_key, scaled_to_zero, redis_db
) -> None:
    with run_simulator_process(model="llama-3-8b", api_key=NODE_KEY, ttft_ms=5, itl_ms=2, light=True) as sim:
        node = starting_node(scaled_to_zero, sim.url)
        body = {"model": "llama-3-8b", "messages": MSG, "max_tokens": 6, "stream": True}
        with ThreadPoolExecutor(1) as pool:
            started = time.monotonic()
            future = pool.submit(post, gateway, api_key[1], body)
            assert wait_until(lambda: held(gateway, scaled_to_zero) == 1, 10), "the request was not held"
            # Published for the autoscaler, and the scale-up was triggered at once.
            assert wait_until(lambda: demand.held_by_model(redis_db) == {scaled_to_zero.pk: 1}, 5)
            assert wait_until(lambda: autoscale_triggered(redis_db, scaled_to_zero.pk), 2)
            time.sleep(1.0)  # held for a measurable while
            assert not future.done()
            node_transition(node=node, to=NodeStatus.READY, reason="test")
            answer = future.result(timeout=30)
            waited_ms = (time.monotonic() - started) * 1000
    assert answer.status_code == 200, answer.text
    events = [e for e in answer.text.split("\n\n") if e]
    assert events[-1] == "data: [DONE]"
    assert sum(1 for e in events[:-1] if json.loads(e[6:])["choices"][0]["delta"].get("content")) == 6
    assert held(gateway, scaled_to_zero) == 0
    assert wait_until(lambda: demand.held_by_model(redis_db) == {}, 5)
    [record] = records(1)
    assert record.request_id == answer.headers["x-request-id"] and record.status_code == 200 and record.streamed
    assert (record.completion_tokens, record.estimated, record.node_id) == (6, False, node.pk)
    # TTFT counts from the request's arrival: the wait for the node is part of it.
    assert 1000 <= record.ttft_ms <= waited_ms


def test_a_model_with_no_node_at_all_holds_until_one_is_started_and_ready(
    gateway, api_key, scaled_to_zero, redis_db
) -> None:
    body = {"model": "llama-3-8b", "messages": MSG, "max_tokens": 3}
    with (
        run_simulator_process(model="llama-3-8b", api_key=NODE_KEY, ttft_ms=5, itl_ms=2, light=True) as sim,
        ThreadPoolExecutor(1) as pool,
    ):
        future = pool.submit(post, gateway, api_key[1], body)
        assert wait_until(lambda: held(gateway, scaled_to_zero) == 1, 10)
        assert wait_until(lambda: autoscale_triggered(redis_db, scaled_to_zero.pk), 2)
        # What the autoscaler does next: a node starts, and later is ready.
        node = starting_node(scaled_to_zero, sim.url)
        assert wait_until(lambda: gateway.app.table.models["llama-3-8b"].starting == 1, 5)
        assert not future.done()
        node_transition(node=node, to=NodeStatus.READY, reason="test")
        answer = future.result(timeout=30)
    assert answer.status_code == 200, answer.text
    assert answer.json()["usage"]["completion_tokens"] == 3
    [record] = records(1)
    assert (record.status_code, record.completion_tokens, record.node_id) == (200, 3, node.pk)


def test_a_full_queue_answers_503_with_retry_after_from_the_measured_cold_start(
    gateway, api_key, scaled_to_zero, settings
) -> None:
    settings.GATEWAY_COLD_QUEUE_MAX = 1
    settings.GATEWAY_COLD_WAIT_S = 5.0  # the held request then ends on its own
    measured_cold_start(scaled_to_zero, 40)
    measured_cold_start(scaled_to_zero, 50)
    measured_cold_start(scaled_to_zero, 44)  # median 44 s
    starting_node(scaled_to_zero, requested_at=timezone.now() - timedelta(seconds=10))
    assert wait_until(lambda: gateway.app.table.models["llama-3-8b"].cold_start_s == 44.0, 5)
    body = {"model": "llama-3-8b", "messages": MSG, "max_tokens": 3}
    with ThreadPoolExecutor(1) as pool:
        first = pool.submit(post, gateway, api_key[1], body)
        assert wait_until(lambda: held(gateway, scaled_to_zero) == 1, 10)
        second = post(gateway, api_key[1], body)
        assert second.status_code == 503
        assert second.json()["error"]["code"] == "cold_start_queue_full"
        # 44 s measured, the node has been starting for 10 s (and a little while this test ran).
        assert 28 <= int(second.headers["retry-after"]) <= 34
        assert not first.done()
        assert first.result(timeout=30).json()["error"]["code"] == "cold_start_timeout"
    assert held(gateway, scaled_to_zero) == 0


def test_the_wait_is_bounded_then_503_with_retry_after(gateway, api_key, scaled_to_zero, settings) -> None:
    settings.GATEWAY_COLD_WAIT_S = 1.0
    starting_node(scaled_to_zero)
    started = time.monotonic()
    answer = post(gateway, api_key[1], {"model": "llama-3-8b", "messages": MSG, "max_tokens": 3, "stream": True})
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "cold_start_timeout"
    assert time.monotonic() - started >= 1.0
    assert int(answer.headers["retry-after"]) >= 1  # nothing measured: the 60 s default, less the node's age
    assert held(gateway, scaled_to_zero) == 0
    [record] = records(1)
    assert (record.status_code, record.prompt_tokens, record.completion_tokens, record.node_id) == (503, 0, 0, None)


def test_a_client_that_leaves_while_held_frees_its_slot_and_is_metered_as_aborted(
    gateway, api_key, scaled_to_zero, redis_db, settings
) -> None:
    settings.GATEWAY_COLD_QUEUE_MAX = 1
    starting_node(scaled_to_zero)
    body = json.dumps({"model": "llama-3-8b", "messages": MSG, "max_tokens": 3, "stream": True}).encode()
    host, port = gateway.url.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            + f"Authorization: Bearer {api_key[1]}\r\nContent-Length: {len(body)}\r\n\r\n".encode()
            + body
        )
        assert wait_until(lambda: held(gateway, scaled_to_zero) == 1, 10)
        assert wait_until(lambda: demand.held_by_model(redis_db) == {scaled_to_zero.pk: 1}, 5)
    # The client is gone: its place in the queue is free (the next request is held, not refused).
    assert wait_until(lambda: held(gateway, scaled_to_zero) == 0, 5), "the slot was not released"
    assert wait_until(lambda: demand.held_by_model(redis_db) == {}, 5)
    [record] = records(1)
    assert (record.status_code, record.prompt_tokens, record.completion_tokens, record.cost_micros) == (499, 0, 0, 0)
    assert record.node_id is None


def test_a_model_that_cannot_start_a_node_is_not_held(gateway, api_key, catalog_model) -> None:
    type(catalog_model).objects.filter(pk=catalog_model.pk).update(min_replicas=1, max_replicas=1)
    started = time.monotonic()
    answer = post(gateway, api_key[1], {"model": "llama-3-8b", "messages": MSG, "max_tokens": 3})
    assert answer.status_code == 503 and answer.json()["error"]["code"] == "no_capacity"
    assert time.monotonic() - started < 5 and held(gateway, catalog_model) == 0
