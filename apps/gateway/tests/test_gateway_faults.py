"""Node faults and hostile input: a node refusing our key, poison requests, one tenant's flood,
PostgreSQL away, unfinished bodies; and what is metered when the node rejects a request."""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import time

import httpx
import openai
import pytest
from aiohttp import web
from django.db import connections

from apps.catalog.services import model_update
from apps.fleet.models import Node, NodeEvent, NodeStatus
from apps.gateway.tests.conftest import NODE_KEY, ready_node, running_gateway, wait_until
from apps.gateway.tests.fake_node import FakeNode, answer_like_vllm, vllm_error
from apps.metering.models import UsageRecord
from apps.tenancy.services import api_key_issue, tenant_create, tenant_update
from vllm_sim import run_simulator_process

pytestmark = pytest.mark.slow  # real gateway and node servers

MSG = [{"role": "user", "content": "Say something short"}]
POISON = [{"role": "user", "content": "\ud800"}]  # a lone surrogate: crashed a node once


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def unlimited(tenant) -> None:
    tenant_update(
        tenant=tenant, requests_per_minute=100_000, tokens_per_minute=100_000_000, max_concurrent_requests=10_000
    )


def records(n: int, timeout_s: float = 8.0) -> list[UsageRecord]:
    wait_until(lambda: UsageRecord.objects.count() >= n, timeout_s)
    return list(UsageRecord.objects.order_by("created_at"))


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


def chat(gateway, raw_key: str, messages=MSG, **extra) -> httpx.Response:
    # Bytes of our own: httpx would refuse to encode a lone surrogate.
    body = json.dumps({"model": "llama-3-8b", "messages": messages, "max_tokens": 3, **extra}).encode()
    return httpx.post(
        gateway.base_url + "/chat/completions",
        content=body,
        timeout=20,
        headers={"Authorization": f"Bearer {raw_key}", "Content-Type": "application/json"},
    )


# --- a node that refuses our node key (issue #10, 13) ---------------------------------------------


def test_a_node_refusing_our_key_is_failed_over_and_marked_unhealthy(gateway, api_key, catalog_model) -> None:
    with (
        run_simulator_process(model="llama-3-8b", api_key="rotated-key", light=True) as rotated,
        run_simulator_process(model="llama-3-8b", api_key=NODE_KEY, ttft_ms=1, itl_ms=0, light=True) as good,
    ):
        wrong = ready_node(catalog_model, rotated.url)
        ready_node(catalog_model, good.url, gateway=gateway)
        client = openai.OpenAI(base_url=gateway.base_url, api_key=api_key[1], max_retries=0)
        for _ in range(6):
            assert client.chat.completions.create(model="llama-3-8b", messages=MSG, max_tokens=3).usage
        assert good.stats()["requests_completed"] == 6

    assert wait_until(lambda: Node.objects.get(pk=wrong.pk).status == NodeStatus.UNHEALTHY)
    wrong.refresh_from_db()
    assert "node key" in wrong.status_reason and "401" in wrong.status_reason
    event = NodeEvent.objects.filter(node=wrong, to_status=NodeStatus.UNHEALTHY).get()
    assert event.actor == "gateway" and event.from_status == NodeStatus.READY
    assert {r.status_code for r in records(6)} == {200}


def test_the_only_node_refusing_our_key_is_a_503_never_an_auth_error(gateway, api_key, catalog_model) -> None:
    with run_simulator_process(model="llama-3-8b", api_key="rotated-key", light=True) as rotated:
        only = ready_node(catalog_model, rotated.url, gateway=gateway)
        r = chat(gateway, api_key[1])

    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
    err = error_of(r)
    assert err["type"] == "server_error" and err["code"] == "upstream_unavailable"
    assert wait_until(lambda: Node.objects.get(pk=only.pk).status == NodeStatus.UNHEALTHY)


async def forbidden(request: web.Request, raw: bytes) -> web.StreamResponse:
    return web.json_response({"error": "Forbidden"}, status=403)  # e.g. a proxy in front of the node


def test_a_node_answering_403_is_treated_like_a_refused_key(gateway, api_key, catalog_model) -> None:
    with FakeNode(forbidden) as walled, FakeNode() as good:
        bad = ready_node(catalog_model, walled.url)
        ready_node(catalog_model, good.url, gateway=gateway)
        answers = [chat(gateway, api_key[1]) for _ in range(4)]

    assert [r.status_code for r in answers] == [200] * 4
    assert wait_until(lambda: Node.objects.get(pk=bad.pk).status == NodeStatus.UNHEALTHY)
    assert "403" in Node.objects.get(pk=bad.pk).status_reason


# --- what a node's rejection costs (issue #10, 14) ------------------------------------------------


def test_a_request_the_node_rejects_is_recorded_with_zero_tokens(gateway, api_key, tenant, catalog_model) -> None:
    unlimited(tenant)
    with run_simulator_process(model="llama-3-8b", api_key=NODE_KEY, light=True) as sim:
        ready_node(catalog_model, sim.url, gateway=gateway)
        gateway.app.keys.clear()
        r = chat(gateway, api_key[1], max_tokens=100_000)  # beyond the model's context: vLLM's 400

    assert r.status_code == 400 and "maximum context length" in r.text
    [record] = records(1)
    assert record.status_code == 400 and record.request_id == r.headers["x-request-id"]
    assert (record.prompt_tokens, record.completion_tokens, record.estimated, record.cost_micros) == (0, 0, False, 0)


async def lingers_after_done(request: web.Request, raw: bytes) -> web.StreamResponse:
    """A stream that ends with [DONE] but whose connection the node closes only a second later."""
    body = json.loads(raw)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
    await resp.prepare(request)
    delta = {"id": "c", "object": "chat.completion.chunk", "created": 0, "model": body["model"]}
    for text in ("Hello", " there"):
        chunk = {**delta, "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]}
        await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\n")
    usage = {"prompt_tokens": 9, "completion_tokens": 2, "total_tokens": 11}
    await resp.write(b"data: " + json.dumps({**delta, "choices": [], "usage": usage}).encode() + b"\n\n")
    await resp.write(b"data: [DONE]\n\n")
    await asyncio.sleep(1.0)
    await resp.write_eof()
    return resp


def test_a_client_hanging_up_after_done_is_a_finished_stream_not_a_499(gateway, api_key, tenant, catalog_model) -> None:
    """The client closes its connection as soon as it reads [DONE] (SDKs do) while the gateway is
    still reading the node's end of stream: the answer was delivered, so it is recorded as a 200
    with the node's usage, not as a request the client cut short."""
    unlimited(tenant)
    with FakeNode(lingers_after_done) as node:
        ready_node(catalog_model, node.url, gateway=gateway)
        gateway.app.keys.clear()
        body = json.dumps({"model": "llama-3-8b", "messages": MSG, "stream": True}).encode()
        port = int(gateway.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                b"Authorization: Bearer " + api_key[1].encode() + b"\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            received = b""
            while b"data: [DONE]" not in received:
                chunk = s.recv(65536)
                assert chunk, received
                received += chunk
        [record] = records(1)

    assert received.startswith(b"HTTP/1.1 200")
    assert record.status_code == 200 and record.streamed
    assert (record.prompt_tokens, record.completion_tokens, record.estimated) == (9, 2, False)


def test_a_node_400_passes_through_with_its_integer_code(gateway, api_key, tenant, catalog_model) -> None:
    """vLLM's ErrorResponse carries the HTTP status as an integer ``code``; the gateway passes the
    node's error through untouched (stream or not), so clients see what vLLM and OpenAI send."""
    unlimited(tenant)
    with run_simulator_process(model="llama-3-8b", api_key=NODE_KEY, light=True) as sim:
        ready_node(catalog_model, sim.url, gateway=gateway)
        direct = httpx.post(
            sim.base_url + "/chat/completions",
            json={"model": "llama-3-8b", "messages": MSG, "max_tokens": 100_000},
            headers={"Authorization": f"Bearer {NODE_KEY}"},
        )
        answers = [chat(gateway, api_key[1], max_tokens=100_000, stream=stream) for stream in (False, True)]
        client = openai.OpenAI(base_url=gateway.base_url, api_key=api_key[1], max_retries=0)
        with pytest.raises(openai.BadRequestError) as exc:
            client.chat.completions.create(model="llama-3-8b", messages=MSG, max_tokens=100_000)

    assert direct.status_code == 400
    for r in answers:
        assert r.status_code == 400 and r.headers["content-type"].startswith("application/json")
        assert r.json() == direct.json()
        err = error_of(r)
        assert err["code"] == 400 and type(err["code"]) is int and err["type"] == "BadRequestError"
    # The SDK keeps the body as sent; its ``.code`` attribute is typed Optional[str] and reads "400".
    assert isinstance(exc.value.body, dict) and exc.value.body["code"] == 400
    assert exc.value.code == "400" and "maximum context length" in exc.value.message


# --- stream_options (issue #10, 16) ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("options", "usage_chunk", "usage_in_every_chunk"),
    [
        (None, False, False),
        ({}, False, False),
        ({"continuous_usage_stats": True}, False, False),
        ({"include_usage": False, "continuous_usage_stats": True}, False, False),
        ({"include_usage": True}, True, False),
        ({"include_usage": True, "continuous_usage_stats": True}, True, True),
    ],
)
def test_stream_usage_follows_openai_and_metering_stays_exact(
    gateway, api_key, catalog_model, options, usage_chunk, usage_in_every_chunk
) -> None:
    extra = {"stream": True, **({"stream_options": options} if options is not None else {})}
    with FakeNode() as node:
        ready_node(catalog_model, node.url, gateway=gateway)
        r = chat(gateway, api_key[1], max_tokens=4, **extra)
        forwarded = json.loads(node.bodies[0])["stream_options"]

    events = [json.loads(e[len("data: ") :]) for e in r.text.split("\n\n") if e and e != "data: [DONE]"]
    assert r.text.endswith("data: [DONE]\n\n")
    finals = [e for e in events if e["choices"] == []]
    assert len(finals) == (1 if usage_chunk else 0)
    content = [e for e in events if e["choices"]]
    assert all(bool(e.get("usage")) == usage_in_every_chunk for e in content)
    # The node is always asked for the total (metering), and for per-chunk usage only when the client wants it.
    assert forwarded["include_usage"] is True
    assert forwarded.get("continuous_usage_stats", False) is usage_in_every_chunk
    [record] = records(1)
    assert (record.prompt_tokens, record.completion_tokens, record.estimated) == (5, 4, False)


# --- /v1/models/{id} and max_model_len (issue #10, 17) ---------------------------------------------


def test_models_retrieve_and_list_carry_max_model_len(gateway, api_key, tenant, catalog_model) -> None:
    from apps.catalog.services import model_create

    model_update(model=catalog_model, max_model_len=8192)
    model_create(name="private-model")
    client = openai.OpenAI(base_url=gateway.base_url, api_key=api_key[1], max_retries=0)

    assert wait_until(
        lambda: (
            gateway.app.table.models.get("llama-3-8b") and gateway.app.table.models["llama-3-8b"].max_model_len == 8192
        )
    )
    model = client.models.retrieve("llama-3-8b")
    assert model.model_extra is not None
    assert (model.id, model.object, model.owned_by, model.model_extra["max_model_len"]) == (
        "llama-3-8b",
        "model",
        "crosslogic",
        8192,
    )
    listed = {m.id: (m.model_extra or {})["max_model_len"] for m in client.models.list().data}
    assert listed["llama-3-8b"] == 8192
    with pytest.raises(openai.NotFoundError) as exc:
        client.models.retrieve("no-such-model")
    assert isinstance(exc.value.body, dict)
    assert exc.value.body["code"] == "model_not_found"
    _, restricted = api_key_issue(tenant=tenant, allowed_models=["llama-3-8b"])
    hidden = httpx.get(gateway.base_url + "/models/private-model", headers={"Authorization": f"Bearer {restricted}"})
    assert hidden.status_code == 404 and error_of(hidden)["code"] == "model_not_found"
    assert (
        httpx.post(
            gateway.base_url + "/models/llama-3-8b", headers={"Authorization": f"Bearer {api_key[1]}"}
        ).status_code
        == 405
    )


# --- poison requests (issue #11, 6) ---------------------------------------------------------------


async def poisoned(request: web.Request, raw: bytes) -> web.StreamResponse:
    if b"\\ud800" in raw:
        return vllm_error(500, "'utf-8' codec can't encode character '\\ud800'")
    return await answer_like_vllm(request, raw)


async def always_failing(request: web.Request, raw: bytes) -> web.StreamResponse:
    return vllm_error(500, "engine error")


def test_a_poison_request_fails_alone_and_cools_no_node_down(gateway, api_key, tenant, catalog_model) -> None:
    unlimited(tenant)
    other = tenant_create(slug="other", name="Other", contact_email="o@other.test")
    unlimited(other)
    _, other_key = api_key_issue(tenant=other, scopes=["inference"])
    with FakeNode(poisoned) as a, FakeNode(poisoned) as b:
        ready_node(catalog_model, a.url)
        ready_node(catalog_model, b.url, gateway=gateway)
        poison = chat(gateway, api_key[1], POISON)

        assert poison.status_code == 502  # the engine's 500 is never passed on as ours
        err = error_of(poison)
        assert err["type"] == "server_error" and err["code"] == "upstream_error"
        assert (len(a.bodies), len(b.bodies)) == (1, 1)  # tried on a second node, no further
        assert gateway.app.board.cooldown_until == {}
        answers = [chat(gateway, other_key) for _ in range(20)]
    assert [r.status_code for r in answers] == [200] * 20
    assert len(records(21)) == 21
    poisoned_record = UsageRecord.objects.get(request_id=poison.headers["x-request-id"])
    assert poisoned_record.status_code == 502
    assert (poisoned_record.prompt_tokens, poisoned_record.completion_tokens) == (0, 0)


def test_a_poison_request_on_the_only_node_does_not_cool_it_down(gateway, api_key, tenant, catalog_model) -> None:
    unlimited(tenant)
    with FakeNode(poisoned) as only:
        node = ready_node(catalog_model, only.url, gateway=gateway)
        gateway.app.keys.clear()
        for _ in range(5):  # the client retrying it changes nothing
            assert chat(gateway, api_key[1], POISON).status_code == 502
        # (Only this node matters: the load board is shared through Redis, so an earlier test's
        # nodes may still be listed as cooling down.)
        assert node.pk not in gateway.app.board.cooldown_until
        assert chat(gateway, api_key[1]).status_code == 200
        assert len(only.bodies) == 6


def test_a_node_failing_different_requests_that_work_elsewhere_is_cooled_down(
    gateway, api_key, tenant, catalog_model, settings
) -> None:
    unlimited(tenant)
    with FakeNode(always_failing) as broken, FakeNode() as good:
        bad = ready_node(catalog_model, broken.url)
        ready_node(catalog_model, good.url, gateway=gateway)
        gateway.app.keys.clear()
        codes = []
        for _ in range(30):
            codes.append(chat(gateway, api_key[1]).status_code)
            if bad.pk in gateway.app.board.cooldown_until:
                break
        assert bad.pk in gateway.app.board.cooldown_until
        assert len(broken.bodies) == settings.GATEWAY_NODE_FAILURES_TO_COOL_DOWN
        assert set(codes) == {200}  # every one was served by the good node
        for _ in range(5):
            assert chat(gateway, api_key[1]).status_code == 200
        assert len(broken.bodies) == settings.GATEWAY_NODE_FAILURES_TO_COOL_DOWN  # skipped while cooled


# --- per-tenant fairness (issue #11, 6) -----------------------------------------------------------


def test_one_tenants_flood_leaves_room_for_another_tenant(gateway, api_key, tenant, catalog_model, settings) -> None:
    settings.GATEWAY_TENANT_INFLIGHT_PER_NODE = 3
    unlimited(tenant)
    other = tenant_create(slug="other", name="Other", contact_email="o@other.test")
    _, other_key = api_key_issue(tenant=other, scopes=["inference"])
    with run_simulator_process(
        model="llama-3-8b", api_key=NODE_KEY, ttft_ms=1, itl_ms=80, light=True, max_num_seqs=64
    ) as sim:
        ready_node(catalog_model, sim.url, gateway=gateway)
        gateway.app.keys.clear()

        async def send(c: httpx.AsyncClient, key: str) -> httpx.Response:
            return await c.post(
                gateway.base_url + "/chat/completions",
                headers={"Authorization": f"Bearer {key}"},
                json={"model": "llama-3-8b", "messages": MSG, "max_tokens": 25},
            )

        async def flood_then_other() -> tuple[list[httpx.Response], httpx.Response]:
            async with httpx.AsyncClient(timeout=20) as c:
                flood = [asyncio.ensure_future(send(c, api_key[1])) for _ in range(8)]
                await asyncio.sleep(0.3)  # the flood is in flight (each answer takes ~2 s)
                theirs = await send(c, other_key)
                return list(await asyncio.gather(*flood)), theirs

        flood, theirs = asyncio.run(flood_then_other())
    codes = [r.status_code for r in flood]
    assert codes.count(200) == 3 and codes.count(429) == 5
    refused = next(r for r in flood if r.status_code == 429)
    assert error_of(refused)["code"] == "rate_limit_concurrency" and int(refused.headers["retry-after"]) >= 1
    assert theirs.status_code == 200


# --- PostgreSQL away (issue #11, 4) ---------------------------------------------------------------


def test_database_down_with_an_uncached_key_is_503_with_retry_after(gateway, api_key) -> None:
    db = connections["default"].settings_dict  # the dict every thread's connection is built from
    port = db.get("PORT")
    db["PORT"] = str(free_port())  # nothing listens: psycopg raises OperationalError, as when PostgreSQL is down
    try:
        chat_answer = httpx.post(
            gateway.base_url + "/chat/completions",
            json={"model": "x", "messages": MSG},
            headers={"Authorization": f"Bearer {api_key[1]}"},
            timeout=20,
        )
        models = httpx.get(gateway.base_url + "/models", headers={"Authorization": f"Bearer {api_key[1]}"}, timeout=20)
    finally:
        db["PORT"] = port
    for r in (chat_answer, models):
        assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
        assert r.headers["content-type"] == "application/json"
        err = error_of(r)
        assert err["type"] == "server_error" and err["code"] == "service_unavailable"


# --- an unfinished body (issue #11, 7) ------------------------------------------------------------


@pytest.mark.parametrize("http", ["h11", "httptools"])
def test_an_unfinished_body_is_answered_408_and_the_connection_closed(
    transactional_db, redis_db, api_key, settings, http
) -> None:
    settings.GATEWAY_BODY_TIMEOUT_S = 0.5
    with running_gateway(http=http) as gateway:
        port = int(gateway.url.rsplit(":", 1)[1])
        with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
            s.sendall(
                b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                b"Authorization: Bearer " + api_key[1].encode() + b"\r\nContent-Length: 1000\r\n\r\n{"
            )
            started = time.monotonic()
            received = b""
            while chunk := s.recv(65536):  # until the server closes the connection
                received += chunk
            elapsed = time.monotonic() - started
    assert received.startswith(b"HTTP/1.1 408")
    assert b'"code": "request_timeout"' in received
    assert 0.4 < elapsed < 5


@pytest.mark.parametrize("http", ["h11", "httptools"])
def test_a_client_leaving_mid_body_logs_one_info_line_and_no_traceback(
    transactional_db, redis_db, api_key, http
) -> None:
    # Found by the fuzzer: the gateway raised CancelledError out of the application, which uvicorn
    # logs as "Exception in ASGI application" with a traceback at ERROR (issue #11, 9).
    class Collect(logging.Handler):
        def __init__(self) -> None:
            super().__init__(logging.DEBUG)
            self.records: list[logging.LogRecord] = []

        def emit(self, record: logging.LogRecord) -> None:
            self.records.append(record)

    # Own handlers rather than caplog: uvicorn's logging set-up closes the handlers it finds.
    collect = Collect()
    loggers = [logging.getLogger("uvicorn.error"), logging.getLogger("apps.gateway.app")]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.addHandler(collect)
        logger.setLevel(logging.INFO)
    try:
        with running_gateway(http=http) as gateway:
            port = int(gateway.url.rsplit(":", 1)[1])
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(
                    b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
                    b"Authorization: Bearer " + api_key[1].encode() + b"\r\nContent-Length: 1000\r\n\r\n{"
                )
                time.sleep(0.3)  # the gateway is waiting for the rest of the body

            def gone() -> list[logging.LogRecord]:
                return [r for r in collect.records if "before its request body was complete" in r.getMessage()]

            assert wait_until(gone)
            assert httpx.get(gateway.url + "/health", timeout=5).status_code == 200
    finally:
        for logger, level in zip(loggers, levels, strict=True):
            logger.removeHandler(collect)
            logger.setLevel(level)
    assert len(gone()) == 1 and gone()[0].levelno == logging.INFO
    assert not [r for r in collect.records if r.levelno >= logging.ERROR], [r.getMessage() for r in collect.records]
