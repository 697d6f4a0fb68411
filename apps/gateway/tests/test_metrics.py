"""Prometheus metrics: what the counters say after real requests through the gateway, and that
every worker's counts appear whichever worker answers the scrape."""

from __future__ import annotations

import asyncio
import os
import socket
import subprocess
import sys
import time
from decimal import Decimal
from pathlib import Path

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from apps.core import redis as redis_lib
from apps.fleet.models import Node
from apps.gateway import metrics
from apps.gateway.metrics import GatewayMetrics
from apps.gateway.tests.conftest import NODE_KEY, ready_node, wait_until
from apps.tenancy.services import api_key_issue, staff_token_issue, tenant_update
from vllm_sim import run_simulator_process

ROOT = Path(__file__).resolve().parents[3]
MSG = [{"role": "user", "content": "Say something short"}]


def samples(text: str) -> dict[tuple[str, frozenset], float]:
    """(sample name, labels without the worker) -> value, summed over workers."""
    out: dict[tuple[str, frozenset], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            labels = frozenset((k, v) for k, v in sample.labels.items() if k != "worker")
            out[(sample.name, labels)] = out.get((sample.name, labels), 0) + sample.value
    return out


def workers_in(text: str, name: str) -> set[str]:
    return {s.labels["worker"] for f in text_string_to_metric_families(text) for s in f.samples if s.name == name}


def value(found: dict, name: str, **labels: str) -> float:
    return found.get((name, frozenset(labels.items())), 0)


@pytest.fixture
def staff_token(db, django_user_model) -> str:
    user = django_user_model.objects.create_user(username="prometheus", password="x", is_staff=True)
    return staff_token_issue(user=user, name="scraper")[1]


# --- the counters and their rendering (no server) ----------------------------------------------


def test_histograms_are_cumulative_and_counts_add_up():
    m = GatewayMetrics()
    for ttft_ms, latency_ms in ((20, 400), (80, 900), (3000, 4000)):
        m.request_done(
            model="m", status=200, tenant_id=1, prompt_tokens=10, completion_tokens=5, ttft_ms=ttft_ms,
            latency_ms=latency_ms,
        )  # fmt: skip
    m.refused(model="m", status=429, tenant_id=1, reason="requests")
    m.refused(model="m", status=429, tenant_id=1, reason="budget", budget="tenant_dollars")

    found = samples(metrics.render({m.worker: m.snapshot()}, None).decode())

    assert value(found, "crosslogic_gateway_requests_total", model="m", status="200") == 3
    assert value(found, "crosslogic_gateway_requests_total", model="m", status="429") == 2
    assert value(found, "crosslogic_gateway_tokens_total", model="m", kind="prompt") == 30
    assert value(found, "crosslogic_gateway_ttft_seconds_bucket", model="m", le="0.025") == 1
    assert value(found, "crosslogic_gateway_ttft_seconds_bucket", model="m", le="0.1") == 2
    assert value(found, "crosslogic_gateway_ttft_seconds_bucket", model="m", le="+Inf") == 3
    assert value(found, "crosslogic_gateway_ttft_seconds_count", model="m") == 3
    assert value(found, "crosslogic_gateway_ttft_seconds_sum", model="m") == pytest.approx(3.1)
    assert value(found, "crosslogic_gateway_rate_limited_total", model="m", reason="requests") == 1
    assert value(found, "crosslogic_gateway_budget_denials_total", model="m", budget="tenant_dollars") == 1


def test_no_tenant_label_unless_enabled():
    plain, labelled = GatewayMetrics(), GatewayMetrics(tenant_label=True)
    for m in (plain, labelled):
        m.request_done(
            model="m", status=200, tenant_id=7, prompt_tokens=1, completion_tokens=1, ttft_ms=None, latency_ms=1
        )

    assert "tenant=" not in metrics.render({"w": plain.snapshot()}, None).decode()
    assert 'tenant="7"' in metrics.render({"w": labelled.snapshot()}, None).decode()


async def test_each_worker_reads_every_live_workers_snapshot_through_redis(redis_db):
    client = redis_lib.async_client()
    one, two = GatewayMetrics(), GatewayMetrics()
    one.worker, two.worker = "host:1", "host:2"
    one.refused(model="m", status=429, tenant_id=1, reason="tokens")
    for _ in range(3):
        two.refused(model="m", status=429, tenant_id=1, reason="tokens")
    try:
        await metrics.publish(client, one, ttl_s=1)
        await metrics.publish(client, two, ttl_s=60)
        both = await metrics.gather(client, two)
        # Worker one stops publishing: its snapshot expires (a 1 s TTL, the shortest used).
        deadline = time.monotonic() + 5
        after = both
        while set(after) != {"host:2"} and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
            after = await metrics.gather(client, two)
    finally:
        await client.aclose()

    assert set(both) == {"host:1", "host:2"} and set(after) == {"host:2"}
    found = samples(metrics.render(both, None).decode())
    assert value(found, "crosslogic_gateway_rate_limited_total", model="m", reason="tokens") == 4


async def test_a_workers_series_never_goes_back_whichever_worker_answers_the_scrape(redis_db):
    # Worker one answered a scrape with its live count; worker two answers the next one before one's
    # periodic publish. Serving one's older snapshot would make its counter drop, which Prometheus
    # reads as a reset.
    client = redis_lib.async_client()
    one, two = GatewayMetrics(), GatewayMetrics()
    one.worker, two.worker = "host:1", "host:2"
    one.refused(model="m", status=429, tenant_id=1, reason="tokens")
    try:
        await metrics.publish(client, one, ttl_s=60)
        await metrics.publish(client, two, ttl_s=60)
        for _ in range(2):
            one.refused(model="m", status=429, tenant_id=1, reason="tokens")
        via_one = await metrics.gather(client, one)
        via_two = await metrics.gather(client, two)
    finally:
        await client.aclose()

    def ones(snaps: dict) -> float:
        return value(
            samples(metrics.render({"host:1": snaps["host:1"]}, None).decode()),
            "crosslogic_gateway_rate_limited_total",
            model="m",
            reason="tokens",
        )

    assert ones(via_one) == 3 and ones(via_two) == 3


# --- through the gateway -------------------------------------------------------------------------


@pytest.mark.slow  # starts a uvicorn gateway and a simulator process
def test_metrics_after_real_requests(gateway, api_key, tenant, catalog_model, staff_token, redis_db):
    gateway.app.metrics.reset()
    with run_simulator_process(model="llama-3-8b", api_key=NODE_KEY, ttft_ms=5, itl_ms=2, light=True) as sim:
        node = ready_node(catalog_model, sim.url, gateway=gateway)
        Node.objects.filter(pk=node.pk).update(hourly_cost=Decimal("2.5000"))
        client = openai.OpenAI(base_url=gateway.base_url, api_key=api_key[1], max_retries=0)
        done = [client.chat.completions.create(model="llama-3-8b", messages=MSG, max_tokens=7) for _ in range(2)]
        list(client.chat.completions.create(model="llama-3-8b", messages=MSG, max_tokens=3, stream=True))
        _, slow_raw = api_key_issue(tenant=tenant, name="one-per-minute", requests_per_minute=1)
        slow = openai.OpenAI(base_url=gateway.base_url, api_key=slow_raw, max_retries=0)
        slow.chat.completions.create(model="llama-3-8b", messages=MSG, max_tokens=1)
        with pytest.raises(openai.RateLimitError):
            slow.chat.completions.create(model="llama-3-8b", messages=MSG, max_tokens=1)
        tenant_update(tenant=tenant, monthly_spend_limit_micros=0)
        assert wait_until(lambda: gateway.app.keys._entries == {})
        with pytest.raises(openai.RateLimitError):
            client.chat.completions.create(model="llama-3-8b", messages=MSG, max_tokens=1)

    anonymous = httpx.get(gateway.url + "/metrics")
    customer = httpx.get(gateway.url + "/metrics", headers={"Authorization": f"Bearer {api_key[1]}"})
    scraped = httpx.get(gateway.url + "/metrics", headers={"Authorization": f"Bearer {staff_token}"})

    assert anonymous.status_code == 401 and customer.status_code == 401
    assert anonymous.json()["error"]["type"] == "authentication_error"
    assert scraped.status_code == 200 and scraped.headers["content-type"].startswith("text/plain; version=0.0.4")
    found = samples(scraped.text)
    model = {"model": "llama-3-8b"}
    assert value(found, "crosslogic_gateway_requests_total", status="200", **model) == 4
    assert value(found, "crosslogic_gateway_requests_total", status="429", **model) == 2
    prompt = sum(c.usage.prompt_tokens for c in done)
    assert value(found, "crosslogic_gateway_tokens_total", kind="completion", **model) == 7 + 7 + 3 + 1
    assert value(found, "crosslogic_gateway_tokens_total", kind="prompt", **model) >= prompt
    assert value(found, "crosslogic_gateway_ttft_seconds_count", **model) == 4
    assert value(found, "crosslogic_gateway_request_duration_seconds_count", **model) == 4
    assert value(found, "crosslogic_gateway_rate_limited_total", reason="requests", **model) == 1
    assert value(found, "crosslogic_gateway_budget_denials_total", budget="tenant_dollars", **model) == 1
    assert value(found, "crosslogic_fleet_nodes", status="ready") == 1
    assert value(found, "crosslogic_fleet_gpu_cost_dollars_per_hour") == 2.5
    assert "tenant=" not in scraped.text


@pytest.mark.slow  # starts a uvicorn gateway
def test_upstream_errors_are_counted_per_node(gateway, api_key, catalog_model, staff_token, redis_db):
    gateway.app.metrics.reset()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    dead = ready_node(catalog_model, f"http://127.0.0.1:{closed}", gateway=gateway)
    client = openai.OpenAI(base_url=gateway.base_url, api_key=api_key[1], max_retries=0)

    with pytest.raises(openai.APIStatusError) as failed:
        client.chat.completions.create(model="llama-3-8b", messages=MSG, max_tokens=1)
    scraped = httpx.get(gateway.url + "/metrics", headers={"Authorization": f"Bearer {staff_token}"})

    assert failed.value.status_code == 503
    found = samples(scraped.text)
    assert value(found, "crosslogic_gateway_upstream_errors_total", node=str(dead.pk), kind="unreachable") == 1
    assert value(found, "crosslogic_gateway_requests_total", model="llama-3-8b", status="503") == 1


# --- several worker processes ----------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow  # starts a two-worker server process and a simulator process
def test_both_workers_counts_appear_whichever_worker_is_scraped(
    transactional_db, redis_db, api_key, catalog_model, staff_token
):
    from django.db import connection

    db = connection.settings_dict
    port = _free_port()
    env = {
        **os.environ,
        "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}",
        "METRICS_PUBLISH_INTERVAL_S": "0.2",
        "CROSSLOGIC_ENV_FILE": "",
    }
    with run_simulator_process(model="llama-3-8b", api_key=NODE_KEY, ttft_ms=1, itl_ms=1, light=True) as sim:
        ready_node(catalog_model, sim.url)
        proc = subprocess.Popen(
            [sys.executable, "-m", "crosslogic.serve", "--port", str(port), "--workers", "2", "--log-level", "warning"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
        )
        try:
            url = f"http://127.0.0.1:{port}"
            assert wait_until(lambda: _up(url), timeout_s=60), "the two-worker server did not start"
            headers = {"Authorization": f"Bearer {staff_token}"}
            sent = 0
            scraped = ""
            deadline = time.monotonic() + 60
            # A fresh connection per request: the kernel hands each to either worker.
            while time.monotonic() < deadline:
                answer = httpx.post(
                    url + "/v1/chat/completions",
                    json={"model": "llama-3-8b", "messages": MSG, "max_tokens": 1},
                    headers={"Authorization": f"Bearer {api_key[1]}"},
                    timeout=20,
                )
                assert answer.status_code == 200, answer.text
                sent += 1
                scraped = httpx.get(url + "/metrics", headers=headers).text
                if len(workers_in(scraped, "crosslogic_gateway_requests_total")) == 2:
                    break
            # Every request shows up once the workers have published (every 0.2 s).
            assert wait_until(
                lambda: _requests(httpx.get(url + "/metrics", headers=headers).text) == sent, timeout_s=10
            ), (sent, scraped)
            final = httpx.get(url + "/metrics", headers=headers).text
        finally:
            proc.terminate()
            try:
                proc.wait(15)
            except subprocess.TimeoutExpired:
                proc.kill()

    assert len(workers_in(final, "crosslogic_gateway_requests_total")) == 2
    per_worker = [
        s.value
        for f in text_string_to_metric_families(final)
        for s in f.samples
        if s.name == "crosslogic_gateway_requests_total"
    ]
    assert all(v >= 1 for v in per_worker) and sum(per_worker) == sent


def _up(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def _requests(text: str) -> float:
    return value(samples(text), "crosslogic_gateway_requests_total", model="llama-3-8b", status="200")


def test_a_forked_worker_starts_from_zero_under_its_own_id():
    metrics.METRICS.refused(model="m", status=429, tenant_id=1, reason="tokens")
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: report what it inherited, then leave without running any cleanup
        os.close(read)
        os.write(write, f"{metrics.METRICS.worker}|{len(metrics.METRICS.models)}".encode())
        os._exit(0)
    os.close(write)
    with os.fdopen(read) as pipe:
        worker, models = pipe.read().split("|")
    os.waitpid(pid, 0)

    assert worker == f"{socket.gethostname()}:{pid}" and models == "0"
    assert metrics.METRICS.worker.endswith(f":{os.getpid()}") and "m" in metrics.METRICS.models
