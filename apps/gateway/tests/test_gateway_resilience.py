"""Failover, broken upstreams, disconnects, exact limits and usage under concurrency, Redis loss."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import subprocess
import threading
import time
from urllib.parse import urlsplit

import httpx
import openai
import pytest

from apps.fleet.models import Node
from apps.gateway.tests.conftest import NODE_KEY, ready_node, running_gateway, wait_until
from apps.metering.models import UsageRecord
from apps.tenancy.services import tenant_update
from vllm_sim import run_simulator_process

pytestmark = pytest.mark.slow  # starts a uvicorn gateway, simulators and redis-server processes

MSG = [{"role": "user", "content": "Tell me a long story"}]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def records(n: int, timeout_s: float = 8.0) -> list[UsageRecord]:
    wait_until(lambda: UsageRecord.objects.count() >= n, timeout_s)
    return list(UsageRecord.objects.order_by("created_at"))


def unlimited(tenant) -> None:
    tenant_update(
        tenant=tenant, requests_per_minute=100_000, tokens_per_minute=100_000_000, max_concurrent_requests=10_000
    )


def test_requests_fail_over_from_a_dead_node_and_a_5xx_node(gateway, api_key, catalog_model) -> None:
    dead = ready_node(catalog_model, f"http://127.0.0.1:{free_port()}")
    with (
        run_simulator_process(model="llama-3-8b", api_key=NODE_KEY, ttft_ms=1, itl_ms=0, light=True) as good,
        run_simulator_process(model="llama-3-8b", api_key=NODE_KEY, fail_rate=1.0, light=True) as broken,
    ):
        ready_node(catalog_model, broken.url)
        ready_node(catalog_model, good.url, gateway=gateway)
        client = openai.OpenAI(base_url=gateway.base_url, api_key=api_key[1], max_retries=0)
        broken_id = Node.objects.get(endpoint_url=broken.url).pk
        sent = 0
        # A 5xx node is cooled down once enough different requests failed on it and worked elsewhere.
        while sent < 30 and broken_id not in gateway.app.board.cooldown_until:
            answer = client.chat.completions.create(model="llama-3-8b", messages=MSG, max_tokens=3)
            assert answer.usage.completion_tokens == 3
            sent += 1
        assert good.stats()["requests_completed"] == sent
        cooled = gateway.app.board.cooldown_until
        assert dead.pk in cooled and broken_id in cooled
    served = {r.node_id for r in records(sent)}
    assert served == {Node.objects.get(endpoint_url=good.url).pk}


def test_upstream_death_mid_stream_ends_with_an_error_event_and_estimated_usage(
    gateway, api_key, catalog_model
) -> None:
    with run_simulator_process(model="llama-3-8b", api_key=NODE_KEY, itl_ms=1, die_after_tokens=3, light=True) as sim:
        ready_node(catalog_model, sim.url, gateway=gateway)
        r = httpx.post(
            gateway.base_url + "/chat/completions",
            json={"model": "llama-3-8b", "messages": MSG, "max_tokens": 50, "stream": True},
            headers={"Authorization": f"Bearer {api_key[1]}"},
            timeout=10,
        )
    events = [e for e in r.text.split("\n\n") if e]
    last = json.loads(events[-1][len("data: ") :])
    assert last["error"]["type"] == "server_error" and set(last["error"]) == {"message", "type", "param", "code"}
    assert "data: [DONE]" not in events
    [record] = records(1)
    assert record.estimated and record.status_code == 502 and record.completion_tokens == 3


def test_client_disconnect_cancels_the_upstream_and_records_partial_usage(gateway, api_key, catalog_model) -> None:
    with run_simulator_process(model="llama-3-8b", api_key=NODE_KEY, ttft_ms=1, itl_ms=30, light=True) as sim:
        ready_node(catalog_model, sim.url, gateway=gateway)
        with httpx.stream(
            "POST",
            gateway.base_url + "/chat/completions",
            json={"model": "llama-3-8b", "messages": MSG, "max_tokens": 500, "stream": True},
            headers={"Authorization": f"Bearer {api_key[1]}"},
            timeout=10,
        ) as r:
            seen = 0
            for line in r.iter_lines():
                if line.startswith("data: "):
                    seen += 1
                if seen >= 4:
                    break
        closed_at = time.monotonic()
        stats = sim.wait_for(lambda s: s["requests_cancelled"] >= 1, timeout_s=2.0)
        assert stats["requests_cancelled"] == 1 and time.monotonic() - closed_at < 2.0
        assert stats["tokens_generated"] < 100  # generation stopped long before 500 tokens
    [record] = records(1)
    assert record.status_code == 499 and record.estimated and record.streamed
    assert 3 <= record.completion_tokens < 100


def test_fifty_simultaneous_requests_against_a_limit_of_ten_admit_exactly_ten(
    gateway, api_key, tenant, catalog_model
) -> None:
    tenant_update(tenant=tenant, requests_per_minute=10, tokens_per_minute=10_000_000, max_concurrent_requests=10_000)
    with run_simulator_process(model="llama-3-8b", api_key=NODE_KEY, ttft_ms=1, itl_ms=0, light=True) as sim:
        ready_node(catalog_model, sim.url, gateway=gateway)
        wait_until(lambda: gateway.app.keys.clear() or True)  # limits are read with the key

        async def fire() -> list[httpx.Response]:
            async with httpx.AsyncClient(timeout=20, limits=httpx.Limits(max_connections=60)) as c:
                return await asyncio.gather(
                    *[
                        c.post(
                            gateway.base_url + "/chat/completions",
                            json={"model": "llama-3-8b", "messages": MSG, "max_tokens": 2},
                            headers={"Authorization": f"Bearer {api_key[1]}"},
                        )
                        for _ in range(50)
                    ]
                )

        responses = asyncio.run(fire())
    codes = [r.status_code for r in responses]
    assert codes.count(200) == 10 and codes.count(429) == 40
    refused = next(r for r in responses if r.status_code == 429)
    assert int(refused.headers["retry-after"]) >= 1
    assert refused.headers["x-ratelimit-limit-requests"] == "10"
    assert refused.headers["x-ratelimit-remaining-requests"] == "0"
    assert refused.json()["error"]["type"] == "rate_limit_error"
    ok = next(r for r in responses if r.status_code == 200)
    assert ok.headers["x-ratelimit-limit-requests"] == "10"


def test_usage_totals_are_exact_across_a_hundred_concurrent_streams(gateway, api_key, tenant, catalog_model) -> None:
    unlimited(tenant)
    with run_simulator_process(
        model="llama-3-8b", api_key=NODE_KEY, ttft_ms=2, itl_ms=2, light=True, max_num_seqs=512
    ) as sim:
        ready_node(catalog_model, sim.url, gateway=gateway)
        gateway.app.keys.clear()

        async def stream(c: openai.AsyncOpenAI, i: int) -> tuple[int, int]:
            chunks = await c.chat.completions.create(
                model="llama-3-8b",
                messages=[{"role": "user", "content": "word " * (i % 7 + 1)}],
                max_tokens=5 + i % 11,
                stream=True,
                stream_options={"include_usage": True},
            )
            usage = None
            async for chunk in chunks:
                usage = chunk.usage or usage
            return usage.prompt_tokens, usage.completion_tokens

        async def run_all() -> list[tuple[int, int]]:
            c = openai.AsyncOpenAI(base_url=gateway.base_url, api_key=api_key[1], max_retries=0, timeout=30)
            return await asyncio.gather(*[stream(c, i) for i in range(100)])

        seen = asyncio.run(run_all())
    rows = records(100)
    assert len(rows) == 100 and not any(r.estimated for r in rows)
    assert sum(p for p, _ in seen) == sum(r.prompt_tokens for r in rows)
    assert sum(c for _, c in seen) == sum(r.completion_tokens for r in rows)
    expected_cost = sum(
        r.prompt_tokens * catalog_model.price_input_per_mtok + r.completion_tokens * catalog_model.price_output_per_mtok
        for r in rows
    )
    assert sum(r.cost_micros for r in rows) == pytest.approx(float(expected_cost), abs=100)


@pytest.mark.skipif(shutil.which("redis-server") is None, reason="needs the redis-server binary")
def test_gateway_keeps_serving_when_redis_stops(transactional_db, api_key, tenant, catalog_model, settings) -> None:
    port = free_port()
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"]
    proc = subprocess.Popen(command, stdout=subprocess.DEVNULL)
    try:
        assert wait_until(lambda: _port_open(port), 5)
        settings.REDIS_URL = f"redis://127.0.0.1:{port}/0"
        tenant_update(tenant=tenant, requests_per_minute=1000)
        with (
            run_simulator_process(model="llama-3-8b", api_key=NODE_KEY, ttft_ms=1, itl_ms=0, light=True) as sim,
            running_gateway() as gateway,
        ):
            ready_node(catalog_model, sim.url, gateway=gateway)
            client = openai.OpenAI(base_url=gateway.base_url, api_key=api_key[1], max_retries=0)
            first = client.chat.completions.with_raw_response.create(model="llama-3-8b", messages=MSG, max_tokens=2)
            assert first.headers.get("x-ratelimit-limit-requests") == "1000"  # limits really went through Redis
            proc.kill()
            proc.wait(5)
            for _ in range(5):
                answer = client.chat.completions.create(model="llama-3-8b", messages=MSG, max_tokens=2)
                assert answer.usage.completion_tokens == 2
            ready = httpx.get(gateway.url + "/ready")
            assert ready.status_code == 503 and ready.json()["checks"]["redis"].startswith("unreachable")
            assert len(records(6)) == 6

            # Redis comes back (empty): limits resume on a fresh connection, scripts reloaded.
            proc = subprocess.Popen(command, stdout=subprocess.DEVNULL)
            assert wait_until(lambda: _port_open(port), 5)

            def limited_again() -> bool:
                again = client.chat.completions.with_raw_response.create(model="llama-3-8b", messages=MSG, max_tokens=2)
                return again.headers.get("x-ratelimit-remaining-requests") == "999"

            assert wait_until(limited_again, 5, interval_s=0.3)
    finally:
        proc.kill()


def _port_open(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


class DroppingFront:
    """A TCP front for a node that drops its first ``drop`` connections once a request arrived
    (what a reset kept-alive connection looks like to the gateway) and pipes the rest through."""

    def __init__(self, target_port: int, drop: int) -> None:
        self.target_port, self.drop, self.dropped = target_port, drop, 0
        self.port = free_port()
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(started,), daemon=True)
        self.thread.start()
        assert started.wait(5)

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(asyncio.start_server(self._serve, "127.0.0.1", self.port))
        started.set()
        self.loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.dropped < self.drop:
            self.dropped += 1
            await reader.read(1)
            writer.transport.abort()  # an RST, not a polite close
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))

    def close(self) -> None:
        async def shut_down() -> None:
            self.server.close()
            others = asyncio.all_tasks() - {asyncio.current_task()}
            for task in others:
                task.cancel()
            await asyncio.gather(*others, return_exceptions=True)
            self.loop.stop()

        asyncio.run_coroutine_threadsafe(shut_down(), self.loop)
        self.thread.join(5)


@contextlib.contextmanager
def only_node_behind_a_dropping_front(gateway, catalog_model, raw_key: str, *, drop: int):
    """The model's only node: a simulator behind a DroppingFront. Yields (front, node, client)."""
    with run_simulator_process(model="llama-3-8b", api_key=NODE_KEY, ttft_ms=1, itl_ms=0, light=True) as sim:
        front = DroppingFront(urlsplit(sim.url).port, drop=drop)
        try:
            node = ready_node(catalog_model, f"http://127.0.0.1:{front.port}", gateway=gateway)
            yield front, node, openai.OpenAI(base_url=gateway.base_url, api_key=raw_key, max_retries=0)
        finally:
            front.close()


def test_a_reset_connection_is_retried_on_the_same_node_without_cooling_it_down(
    gateway, api_key, catalog_model
) -> None:
    with only_node_behind_a_dropping_front(gateway, catalog_model, api_key[1], drop=1) as (front, only, client):
        answer = client.chat.completions.create(model="llama-3-8b", messages=MSG, max_tokens=3)
        assert answer.usage.completion_tokens == 3
        assert front.dropped == 1
        assert only.pk not in gateway.app.board.cooldown_until
    [record] = records(1)
    assert record.node_id == only.pk and record.status_code == 200


def test_a_node_that_keeps_resetting_is_cooled_down_after_its_second_chance(gateway, api_key, catalog_model) -> None:
    with only_node_behind_a_dropping_front(gateway, catalog_model, api_key[1], drop=1000) as (front, only, client):
        with pytest.raises(openai.APIStatusError) as exc:
            client.chat.completions.create(model="llama-3-8b", messages=MSG, max_tokens=3)
        body = exc.value.body  # typed object by the SDK; the gateway sends a JSON object
        assert exc.value.status_code == 503 and isinstance(body, dict) and body["code"] == "upstream_unavailable"
        assert front.dropped == 2  # the first try and one fresh connection, no more
        assert only.pk in gateway.app.board.cooldown_until
