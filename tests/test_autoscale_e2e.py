"""The autoscaler end to end with the local launcher: simulator nodes, a real Celery worker, real
load on the nodes' vLLM metrics.

Scale up under load → scale down after the window (the drained node paused: the warm pool) → the
next load restarts it warm; zero → one on a held request; a preempted spot node replaced on-demand.
The autoscaler and the reconciler run as Celery tasks in the worker; the health checks run here
(the beat's interval would only slow the test). Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import threading
import time
from pathlib import Path

import httpx
import pytest
from django.db import connection

from apps.catalog.services import model_create
from apps.core import redis as redis_lib
from apps.fleet import demand, health, triggers
from apps.fleet.keys import node_api_key
from apps.fleet.models import ModelScale, Node, NodeEvent, NodeStatus
from apps.fleet.periodic import fleet_autoscale, fleet_reconcile
from apps.fleet.placement import Placement
from apps.fleet.services import node_request_launch
from tests.test_fleet_e2e import _alive, _wait, worker  # noqa: F401 - the fixture autoscale_worker uses

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]
S = NodeStatus


@pytest.fixture
def autoscale_worker(worker: Path) -> Path:  # noqa: F811 - test_fleet_e2e's worker, its log's path
    return worker


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except FileNotFoundError:
        return ""


def _ready_nodes(model) -> list[Node]:
    return list(Node.objects.filter(model=model, status=S.READY).order_by("pk"))


def _check_health(model) -> None:
    health.run_health_checks(list(Node.objects.filter(model=model).values_list("pk", flat=True)))
    connection.close()  # the check ran asyncio in this thread; start the next query afresh


def _checked_ready(model) -> list[Node]:
    """Health-check the model's nodes (as beat would), then its ready nodes."""
    _check_health(model)
    return _ready_nodes(model)


def _checked_running(node: Node) -> int:
    _check_health(node.model)
    return Node.objects.get(pk=node.pk).requests_running


class Load:
    """``n`` long streaming requests straight to a node's simulator, each in its own thread."""

    def __init__(self, node: Node, n: int, tokens: int = 1000) -> None:
        self.done: list[int] = []
        body = {
            "model": node.model.name,
            "messages": [{"role": "user", "content": "go"}],
            "max_tokens": tokens,
            "stream": True,
        }
        headers = {"Authorization": f"Bearer {node_api_key(node.pk)}"}

        def one() -> None:
            with httpx.stream(
                "POST", node.endpoint_url + "/v1/chat/completions", json=body, headers=headers, timeout=60
            ) as response:
                for _ in response.iter_bytes():
                    pass
                self.done.append(response.status_code)

        self.threads = [threading.Thread(target=one, daemon=True) for _ in range(n)]
        for t in self.threads:
            t.start()

    def join(self) -> list[int]:
        for t in self.threads:
            t.join(60)
        return self.done


def _autoscale_until(what: str, predicate, worker_log: Path, timeout_s: float = 60.0):
    """Send the autoscaler task (as beat would) until ``predicate`` holds."""

    def tick():
        fleet_autoscale.delay()
        time.sleep(0.5)
        return predicate()

    return _wait(what, tick, timeout_s=timeout_s, log=worker_log)


def test_scale_up_under_load_then_down_after_the_window_into_the_warm_pool_and_back(autoscale_worker: Path) -> None:
    model = model_create(name="auto-llama", storage_uri="s3://weights/auto-llama", min_replicas=1, max_replicas=3)
    model.target_ongoing_requests, model.target_kv_cache_usage = 2, None
    model.scale_down_window_s, model.spot_fallback, model.warm_pool = 2, False, True
    model.save()
    (first,) = node_request_launch(model=model, placement=Placement(launcher="local", use_spot=False))
    _wait("the first node to be ready", lambda: _checked_ready(model), log=autoscale_worker)
    first.refresh_from_db()

    # 1. Six long streams on one node (target 2 per node): the autoscaler asks for 3 and launches 2.
    load = Load(first, 6)
    _wait(
        "vLLM to report the 6 running requests",
        lambda: _checked_running(first) >= 6,
        timeout_s=20,
    )
    _autoscale_until("desired 3", lambda: ModelScale.objects.filter(model=model, desired=3).exists(), autoscale_worker)
    scale = ModelScale.objects.get(model=model)
    assert "6 running" in scale.reason and "scale up" in scale.reason, scale.reason

    def three_ready() -> bool:
        return len(_checked_ready(model)) == 3

    _wait("three ready nodes", three_ready, timeout_s=120, log=autoscale_worker)
    assert all(code == 200 for code in load.join())  # the streams were never cut
    new = [n for n in _ready_nodes(model) if n.pk != first.pk]
    assert all(
        NodeEvent.objects.filter(node=n, actor="autoscaler", message__contains="6 running").exists() for n in new
    )

    # 2. Load gone: after scale_down_window_s (2 s) the autoscaler drains two nodes; drained, they
    #    are stopped (paused processes), not terminated.
    def two_stopped() -> bool:
        _check_health(model)
        fleet_autoscale.delay()
        time.sleep(0.5)
        return Node.objects.filter(model=model, status=S.STOPPED).count() == 2

    _wait("two nodes drained into the warm pool", two_stopped, timeout_s=90, log=autoscale_worker)
    assert ModelScale.objects.get(model=model).desired == 1
    stopped = list(Node.objects.filter(model=model, status=S.STOPPED))
    for node in stopped:
        assert _state(node.launcher_state["pid"]) == "T"  # paused, memory kept
        assert node.stopped_at is not None and node.stopped_hourly_cost > 0
    (serving,) = _ready_nodes(model)

    # 3. Load again: the warm nodes are restarted (resumed), not launched anew.
    before = Node.objects.filter(model=model).count()
    load = Load(serving, 6)
    _wait(
        "vLLM to report the new load",
        lambda: _checked_running(serving) >= 6,
        timeout_s=20,
    )
    _autoscale_until(
        "desired 3 again", lambda: ModelScale.objects.filter(model=model, desired=3).exists(), autoscale_worker
    )
    _wait("three ready nodes again", three_ready, timeout_s=60, log=autoscale_worker)
    assert Node.objects.filter(model=model).count() == before  # no new machine
    for node in Node.objects.filter(pk__in=[n.pk for n in stopped]):
        assert node.warm_starts == 1 and node.warm_start_seconds is not None
        assert node.warm_start_seconds < 30 and _state(node.launcher_state["pid"]) in {"S", "R"}
    assert all(code == 200 for code in load.join())


def test_a_held_request_scales_from_zero_to_a_ready_node(autoscale_worker: Path) -> None:
    model = model_create(name="cold-llama", storage_uri="s3://weights/cold-llama", min_replicas=0, max_replicas=2)

    async def hold() -> None:
        client = redis_lib.async_client()
        assert client is not None
        try:
            await demand.report_held(client, model_id=model.pk, worker_id="gw-1", held=1)
        finally:
            await client.aclose()

    asyncio.run(hold())
    assert triggers.enqueue_autoscale(model_id=model.pk) is True

    _wait("a node from zero", lambda: _checked_ready(model), timeout_s=60, log=autoscale_worker)
    assert ModelScale.objects.get(model=model).reason.startswith("desired 1 (scale from zero")


def test_a_preempted_spot_node_is_replaced_on_demand_under_spot_fallback(autoscale_worker: Path) -> None:
    import os
    import signal

    model = model_create(name="spot-llama", storage_uri="s3://weights/spot-llama", min_replicas=1, max_replicas=2)
    model.spot_fallback, model.spot_fallback_preemptions = True, 1
    model.save()
    (spot,) = node_request_launch(model=model, placement=Placement(launcher="local", use_spot=True))
    _wait("the spot node to be ready", lambda: _checked_ready(model), log=autoscale_worker)
    spot.refresh_from_db()

    os.killpg(spot.launcher_state["pid"], signal.SIGKILL)  # the cloud took the machine back
    _wait("its process to be gone", lambda: not _alive(spot.launcher_state["pid"]), timeout_s=10)
    fleet_reconcile.delay()

    _wait("a replacement", lambda: Node.objects.filter(model=model).exclude(pk=spot.pk).exists(), log=autoscale_worker)
    spot.refresh_from_db()
    assert (spot.status, spot.status_reason) == (S.TERMINATED, "preempted")
    replacement = Node.objects.filter(model=model).exclude(pk=spot.pk).get()
    assert replacement.use_spot is False
    _wait(
        "the reason on the replacement",
        lambda: NodeEvent.objects.filter(node=replacement, message__contains="on-demand: 1 spot preemption").exists(),
        timeout_s=10,
        log=autoscale_worker,
    )
    _wait("the on-demand node to be ready", lambda: _checked_ready(model), log=autoscale_worker)
