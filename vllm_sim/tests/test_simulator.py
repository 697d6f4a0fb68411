"""The vLLM simulator speaks vLLM's OpenAI server surface, checked with the official openai SDK
and raw HTTP against a real `python -m vllm_sim` subprocess."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import time

import httpx
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from vllm_sim import run_simulator_process, simulator_server
from vllm_sim.process import command_line

pytestmark = pytest.mark.slow

KEY = "sim-secret-key"
MODEL = "sim-llama"


@pytest.fixture(scope="module")
def sim():
    with run_simulator_process(model=MODEL, api_key=KEY, ttft_ms=5, itl_ms=2, max_tokens_default=12) as handle:
        yield handle


@pytest.fixture
def client(sim):
    sim.reset()
    return openai.OpenAI(base_url=sim.base_url, api_key=KEY, max_retries=0)


def chat_body(**extra):
    return {
        "model": MODEL,
        "messages": [{"role": "system", "content": "be brief"}, {"role": "user", "content": "tell me a story please"}],
        **extra,
    }


def sse_events(raw: bytes) -> list[str]:
    """Split an SSE body into its `data:` payloads, insisting on vLLM's exact framing."""
    assert raw.endswith(b"\n\n")
    events = raw.decode().split("\n\n")[:-1]
    assert all(e.startswith("data: ") and "\n" not in e for e in events), events
    return [e[len("data: ") :] for e in events]


def raw_post(sim, path: str, body: dict, *, timeout: float = 10, **headers) -> httpx.Response:
    return httpx.post(sim.url + path, json=body, headers={"Authorization": f"Bearer {KEY}", **headers}, timeout=timeout)


def metric(sim, name: str) -> float:
    text = httpx.get(sim.url + "/metrics", timeout=5).text
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name:
                assert sample.labels == {"model_name": MODEL, "engine": "0"}
                return sample.value
    raise AssertionError(f"{name} missing from /metrics")


# --- chat and completions ----------------------------------------------------------------


def test_streaming_chat_sends_role_then_content_then_finish_then_done(sim):
    raw = raw_post(sim, "/v1/chat/completions", chat_body(stream=True, max_tokens=4))

    assert raw.status_code == 200
    assert raw.headers["content-type"].startswith("text/event-stream")
    events = sse_events(raw.content)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert len(chunks) == 1 + 4  # role chunk, then one chunk per token; no usage chunk unasked
    first = chunks[0]
    assert first["id"].startswith("chatcmpl-") and first["object"] == "chat.completion.chunk"
    assert first["model"] == MODEL and isinstance(first["created"], int)
    assert first["choices"] == [
        {"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None, "finish_reason": None}
    ]
    assert {c["id"] for c in chunks} == {first["id"]}
    assert [c["choices"][0]["finish_reason"] for c in chunks[1:]] == [None, None, None, "length"]
    assert chunks[-1]["choices"][0]["stop_reason"] is None
    assert all("usage" not in c for c in chunks)


def test_streamed_and_non_streamed_chat_give_the_same_text_and_usage(client):
    full = client.chat.completions.create(**chat_body(max_tokens=6))
    stream = client.chat.completions.create(
        **chat_body(max_tokens=6, stream=True, stream_options={"include_usage": True})
    )
    chunks = list(stream)

    streamed_text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert full.choices[0].message.content == streamed_text
    assert len(streamed_text.split()) == 6
    assert full.choices[0].finish_reason == "length"
    assert full.usage.completion_tokens == 6
    # 2 messages: (2 + 4) + (5 + 4) words and per-message overhead, + 3 priming tokens
    assert full.usage.prompt_tokens == 18
    usage_chunk = chunks[-1]
    assert usage_chunk.choices == []
    assert usage_chunk.usage.model_dump(exclude_none=True) == full.usage.model_dump(exclude_none=True)


def test_the_same_input_always_gets_the_same_answer(client):
    one = client.chat.completions.create(**chat_body(max_tokens=5)).choices[0].message.content
    two = client.chat.completions.create(**chat_body(max_tokens=5)).choices[0].message.content
    other = (
        client.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": "something else"}], max_tokens=5
        )
        .choices[0]
        .message.content
    )
    assert one == two
    assert one != other


def test_without_max_tokens_the_answer_stops_naturally_at_the_default_length(client):
    reply = client.chat.completions.create(**chat_body())

    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage.completion_tokens == 12


def test_max_completion_tokens_wins_over_max_tokens(client):
    reply = client.chat.completions.create(**chat_body(max_tokens=9, max_completion_tokens=3))

    assert reply.usage.completion_tokens == 3


def test_include_usage_chunk_only_when_asked(sim):
    without = sse_events(raw_post(sim, "/v1/chat/completions", chat_body(stream=True, max_tokens=3)).content)
    explicit_false = sse_events(
        raw_post(
            sim, "/v1/chat/completions", chat_body(stream=True, max_tokens=3, stream_options={"include_usage": False})
        ).content
    )
    with_usage = sse_events(
        raw_post(
            sim, "/v1/chat/completions", chat_body(stream=True, max_tokens=3, stream_options={"include_usage": True})
        ).content
    )

    assert all("usage" not in e for e in without + explicit_false)
    usage_chunk = json.loads(with_usage[-2])
    assert usage_chunk["choices"] == []
    assert usage_chunk["usage"] == {"prompt_tokens": 18, "total_tokens": 21, "completion_tokens": 3}
    assert with_usage[-1] == "[DONE]"


def test_completions_stream_and_non_stream(client, sim):
    full = client.completions.create(model=MODEL, prompt="once upon a time", max_tokens=4)
    stream = list(
        client.completions.create(
            model=MODEL, prompt="once upon a time", max_tokens=4, stream=True, stream_options={"include_usage": True}
        )
    )
    raw = sse_events(
        raw_post(
            sim, "/v1/completions", {"model": MODEL, "prompt": "once upon a time", "max_tokens": 2, "stream": True}
        ).content
    )

    assert full.object == "text_completion" and full.id.startswith("cmpl-")
    assert full.usage.prompt_tokens == 5  # four words + BOS
    assert full.usage.completion_tokens == 4 and full.choices[0].finish_reason == "length"
    assert "".join(c.choices[0].text for c in stream if c.choices) == full.choices[0].text
    assert stream[-1].usage.total_tokens == 9
    assert raw[-1] == "[DONE]"
    assert [json.loads(e)["choices"][0]["finish_reason"] for e in raw[:-1]] == [None, "length"]


def test_completion_prompt_as_token_ids_counts_each_id(client):
    reply = client.completions.create(model=MODEL, prompt=[1, 2, 3, 4, 5, 6, 7], max_tokens=1)

    assert reply.usage.prompt_tokens == 7


def test_embeddings_are_deterministic_unit_vectors_with_usage(client):
    first = client.embeddings.create(model=MODEL, input=["alpha beta", "gamma"])
    again = client.embeddings.create(model=MODEL, input="alpha beta")

    assert [d.index for d in first.data] == [0, 1]
    vector = first.data[0].embedding
    assert len(vector) == 16
    assert abs(sum(v * v for v in vector) - 1.0) < 1e-3
    assert again.data[0].embedding == vector
    assert first.data[1].embedding != vector
    assert first.usage.prompt_tokens == 5  # (2 + 1) + (1 + 1)


# --- errors ------------------------------------------------------------------------------


def test_unknown_model_is_404_in_vllms_error_shape(sim, client):
    raw = raw_post(sim, "/v1/chat/completions", {**chat_body(), "model": "nope"})

    assert raw.status_code == 404
    assert raw.json() == {
        "error": {"message": "The model `nope` does not exist.", "type": "NotFoundError", "param": None, "code": 404}
    }
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="nope", prompt="x")


def test_bad_json_and_bad_fields_are_400(sim):
    bad_json = httpx.post(
        sim.url + "/v1/chat/completions",
        content=b'{"model": ',
        headers={"Authorization": f"Bearer {KEY}", "Content-Type": "application/json"},
    )
    no_messages = raw_post(sim, "/v1/chat/completions", {"model": MODEL})
    bad_max = raw_post(sim, "/v1/chat/completions", chat_body(max_tokens="ten"))
    too_long = raw_post(sim, "/v1/completions", {"model": MODEL, "prompt": "hi", "max_tokens": 10_000})
    options_without_stream = raw_post(sim, "/v1/chat/completions", chat_body(stream_options={"include_usage": True}))

    for response in (bad_json, no_messages, bad_max, too_long, options_without_stream):
        assert response.status_code == 400, response.text
        assert response.json()["error"]["type"] == "BadRequestError"
        assert response.json()["error"]["code"] == 400
    assert "maximum context length is 4096" in too_long.json()["error"]["message"]


# --- auth --------------------------------------------------------------------------------


def test_bearer_key_guards_v1_only(sim):
    missing = httpx.post(sim.url + "/v1/chat/completions", json=chat_body())
    wrong = httpx.get(sim.url + "/v1/models", headers={"Authorization": "Bearer not-it"})
    right = httpx.get(sim.url + "/v1/models", headers={"Authorization": f"Bearer {KEY}"})

    assert missing.status_code == 401 and missing.json() == {"error": "Unauthorized"}
    assert wrong.status_code == 401
    assert right.status_code == 200
    assert right.json()["data"][0]["id"] == MODEL and right.json()["data"][0]["owned_by"] == "vllm"
    assert httpx.get(sim.url + "/health").status_code == 200
    assert httpx.get(sim.url + "/metrics").status_code == 200
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=sim.base_url, api_key="wrong", max_retries=0).models.list()


def test_the_key_reaches_the_simulator_by_environment_not_command_line(sim):
    with open(f"/proc/{sim.proc.pid}/cmdline", "rb") as cmdline:
        assert KEY.encode() not in cmdline.read()
    assert httpx.get(sim.url + "/v1/models").status_code == 401


def test_stats_record_the_authorization_headers_the_node_saw(sim):
    sim.reset()
    raw_post(sim, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 1})
    httpx.post(
        sim.url + "/v1/completions",
        json={"model": MODEL, "prompt": "x"},
        headers={"Authorization": "Bearer clk_customer"},
    )
    httpx.get(sim.url + "/v1/models")

    stats = sim.stats()
    assert stats["authorization_headers"] == [f"Bearer {KEY}", "Bearer clk_customer"]
    assert stats["requests_without_authorization"] == 1
    assert "api_key" not in stats["config"]


# --- metrics, load and failures ------------------------------------------------------------


def test_metrics_are_prometheus_text_and_running_rises_during_a_slow_stream(sim):
    assert metric(sim, "vllm:num_requests_running") == 0
    assert metric(sim, "vllm:num_requests_waiting") == 0
    idle_kv = metric(sim, "vllm:kv_cache_usage_perc")

    with httpx.stream(
        "POST",
        sim.url + "/v1/chat/completions",
        json=chat_body(stream=True, max_tokens=400),
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=10,
    ) as response:
        lines = response.iter_lines()
        next(lines)
        running = metric(sim, "vllm:num_requests_running")
        busy_kv = metric(sim, "vllm:kv_cache_usage_perc")
        for _ in lines:
            pass

    assert running == 1
    assert 0 < busy_kv <= 1 and idle_kv == 0
    assert metric(sim, "vllm:num_requests_running") == 0


def test_client_disconnect_is_seen_as_cancelled_within_a_short_time(sim):
    sim.reset()
    with httpx.stream(
        "POST",
        sim.url + "/v1/chat/completions",
        json=chat_body(stream=True, max_tokens=2000),
        headers={"Authorization": f"Bearer {KEY}"},
        timeout=10,
    ) as response:
        for i, _ in enumerate(response.iter_lines()):
            if i == 6:
                break
    closed_at = time.monotonic()

    stats = sim.wait_for(lambda s: s["requests_cancelled"] == 1, timeout_s=2)
    assert time.monotonic() - closed_at < 1.0
    assert stats["requests_completed"] == 0 and stats["running"] == 0
    assert stats["tokens_generated"] < 2000
    time.sleep(0.1)
    assert sim.stats()["tokens_generated"] == stats["tokens_generated"]  # generation really stopped


def test_a_non_streaming_client_that_gives_up_cancels_the_generation(sim):
    sim.reset()
    with pytest.raises(httpx.ReadTimeout):
        raw_post(sim, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 2000}, timeout=0.2)

    stats = sim.wait_for(lambda s: s["requests_cancelled"] == 1, timeout_s=2)
    assert stats["requests_completed"] == 0 and stats["running"] == 0


def test_fail_rate_one_answers_500_before_any_byte():
    with run_simulator_process(model=MODEL, fail_rate=1.0, ttft_ms=1, itl_ms=0) as failing:
        client = openai.OpenAI(base_url=failing.base_url, api_key="unused", max_retries=0)
        with pytest.raises(openai.InternalServerError):
            client.chat.completions.create(**chat_body(stream=True))
        raw = httpx.post(failing.url + "/v1/completions", json={"model": MODEL, "prompt": "x"})
        assert raw.status_code == 500 and raw.json()["error"]["type"] == "InternalServerError"
        assert failing.stats()["requests_failed_injected"] == 2
        assert httpx.get(failing.url + "/health").status_code == 200


@pytest.mark.parametrize("itl_ms", [0, 1], ids=["flat-out", "paced"])
def test_die_after_tokens_cuts_the_stream_without_done(itl_ms):
    with run_simulator_process(model=MODEL, die_after_tokens=3, ttft_ms=1, itl_ms=itl_ms) as dying:
        received = b""
        with (
            pytest.raises(httpx.RemoteProtocolError),
            httpx.stream(
                "POST",
                dying.url + "/v1/chat/completions",
                json=chat_body(stream=True, max_tokens=50),
                timeout=10,
            ) as response,
        ):
            for piece in response.iter_bytes():
                received += piece
        contents = [json.loads(e)["choices"][0]["delta"].get("content") for e in sse_events(received)]
        assert contents[0] == "" and len(contents) == 1 + 3
        assert b"[DONE]" not in received
        with pytest.raises(openai.APIConnectionError):
            openai.OpenAI(base_url=dying.base_url, api_key="x", max_retries=0).completions.create(
                model=MODEL, prompt="x", max_tokens=10
            )
        short = raw_post(dying, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 3})
        assert short.status_code == 200  # shorter than N tokens: nothing to cut
        stats = dying.stats()
        assert stats["requests_killed"] == 2 and stats["requests_cancelled"] == 0
        assert httpx.get(dying.url + "/health").status_code == 200  # only the streams died


def test_faults_can_be_switched_on_and_off_while_running(sim):
    try:
        assert sim.set_faults(health_status=503, fail_rate=1.0)["health_status"] == 503
        sick_health = httpx.get(sim.url + "/health").status_code
        sick_chat = raw_post(sim, "/v1/chat/completions", chat_body(max_tokens=2)).status_code
        sim.set_faults(fail_rate=0, die_after_tokens=1)
        with pytest.raises(httpx.RemoteProtocolError):
            raw_post(sim, "/v1/chat/completions", chat_body(max_tokens=5, stream=True))
        bad = httpx.post(sim.url + "/sim/faults", json={"fail_rate": 2})
    finally:
        sim.set_faults(health_status=200, fail_rate=0, die_after_tokens=None)

    assert sick_health == 503 and sick_chat == 500
    assert bad.status_code == 400 and "fail_rate" in bad.json()["error"]["message"]
    assert httpx.get(sim.url + "/health").status_code == 200
    assert raw_post(sim, "/v1/chat/completions", chat_body(max_tokens=2)).status_code == 200


def test_die_exits_process_ends_the_whole_simulator():
    with run_simulator_process(model=MODEL, die_after_tokens=2, die_exits_process=True, ttft_ms=1, itl_ms=1) as dying:
        with pytest.raises(httpx.TransportError):
            raw_post(dying, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 10})
        assert dying.proc.wait(timeout=5) == 17


def test_nothing_listens_during_the_startup_delay():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    proc = subprocess.Popen(
        command_line(model=MODEL, port=port, startup_delay_s=1.5), stdout=subprocess.PIPE, text=True
    )
    try:
        time.sleep(0.5)
        with pytest.raises(httpx.ConnectError):
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
        assert proc.stdout.readline().startswith(f"simulate_vllm listening on http://127.0.0.1:{port}")
        assert httpx.get(f"http://127.0.0.1:{port}/health", timeout=2).status_code == 200
    finally:
        proc.terminate()
        proc.wait(timeout=5)


async def test_flat_out_streams_send_the_same_events_as_paced_ones(sim):
    body = chat_body(stream=True, max_tokens=40, stream_options={"include_usage": True})
    async with simulator_server(model=MODEL, ttft_ms=0, itl_ms=0) as flat, httpx.AsyncClient(timeout=10) as http:
        fast = await http.post(flat.url + "/v1/chat/completions", json=body)
        paced = await http.post(sim.url + "/v1/chat/completions", json=body, headers={"Authorization": f"Bearer {KEY}"})

    def comparable(raw: bytes) -> list:
        events = sse_events(raw)
        return [{k: v for k, v in json.loads(e).items() if k not in ("id", "created")} for e in events[:-1]] + [
            events[-1]
        ]

    assert comparable(fast.content) == comparable(paced.content)
    assert len(sse_events(fast.content)) == 1 + 40 + 1 + 1


async def test_requests_beyond_max_num_seqs_wait_and_show_in_metrics():
    async with (
        simulator_server(model=MODEL, max_num_seqs=1, ttft_ms=1, itl_ms=5) as server,
        httpx.AsyncClient(base_url=server.url, timeout=10) as http,
    ):
        body = {"model": MODEL, "prompt": "x", "max_tokens": 20}
        tasks = [asyncio.create_task(http.post("/v1/completions", json=body)) for _ in range(3)]
        await asyncio.sleep(0.03)
        families = {f.name: f for f in text_string_to_metric_families((await http.get("/metrics")).text)}
        replies = await asyncio.gather(*tasks)

    assert families["vllm:num_requests_running"].samples[0].value == 1
    assert families["vllm:num_requests_waiting"].samples[0].value == 2
    assert all(r.status_code == 200 for r in replies)
    assert server.state.counters["requests_completed"] == 3


def test_a_resumed_process_is_unhealthy_for_the_warm_start_delay():
    """The local launcher's warm restart pauses the node's process group and resumes it (SIGCONT);
    with --warm-start-delay-s the simulator then answers /health 503 for that long, like a
    restarted machine whose vLLM is still starting."""
    with run_simulator_process(model=MODEL, warm_start_delay_s=1.5, light=True) as paused:
        health = paused.url + "/health"
        assert httpx.get(health, timeout=2).status_code == 200  # a cold start is not a warm one
        os.kill(paused.proc.pid, signal.SIGSTOP)
        os.kill(paused.proc.pid, signal.SIGCONT)
        resumed = time.monotonic()
        assert wait_for(lambda: httpx.get(health, timeout=2).status_code == 503, 1.0)
        assert wait_for(lambda: httpx.get(health, timeout=2).status_code == 200, 10.0)
        assert time.monotonic() - resumed >= 1.4


def wait_for(predicate, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(0.05)
    return False
