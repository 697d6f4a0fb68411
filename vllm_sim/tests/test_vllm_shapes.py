"""The simulator answers what our users send the way vLLM 0.11's OpenAI server does: the requests
below are the ones a customer's SDK sends, and the assertions are vLLM's shapes (its protocol.py
models, serving_chat.py / serving_completion.py, and captured vLLM 0.11 output: field order, the
nulls it writes, its error messages). Checked with the official openai SDK where it parses the
answer, and byte for byte where the SDK would hide a difference."""

from __future__ import annotations

import asyncio
import json
import random
import socket

import httpx
import jsonschema
import openai
import pytest

from vllm_sim import simulator_server
from vllm_sim.server import VLLM_VERSION

pytestmark = pytest.mark.slow  # each test starts an (in-process) server

MODEL = "sim-llama"
MSG = [{"role": "user", "content": "what is the weather in Paris"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather",
        "parameters": {
            "type": "object",
            "properties": {
                "city": {"type": "string"},
                "days": {"type": "integer", "minimum": 1},
                "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]},
            },
            "required": ["city"],
        },
    },
}
TOOLS_ON = {"enable_auto_tool_choice": True, "tool_call_parser": "hermes"}


def events(raw: bytes) -> list[str]:
    assert raw.endswith(b"data: [DONE]\n\n")
    parts = raw.decode().split("\n\n")[:-1]
    assert all(p.startswith("data: ") for p in parts)
    return [p[len("data: ") :] for p in parts[:-1]]


async def post(server, path: str, body: dict) -> httpx.Response:
    async with httpx.AsyncClient(base_url=server.url, timeout=30) as http:
        return await http.post(path, json=body)


def sdk(server) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=server.base_url, api_key="unused", max_retries=0)


def assert_vllm_error(response: httpx.Response, status: int, message: str) -> None:
    assert response.status_code == status
    assert response.json() == {"error": {"message": message, "type": "BadRequestError", "param": None, "code": status}}


# --- tools -----------------------------------------------------------------------------------


async def test_tools_are_refused_without_the_tool_flags():
    async with simulator_server(model=MODEL, ttft_ms=0, itl_ms=0) as server:
        auto = await post(server, "/v1/chat/completions", {"model": MODEL, "messages": MSG, "tools": [WEATHER]})
        explicit = await post(
            server, "/v1/chat/completions", {"model": MODEL, "messages": MSG, "tools": [WEATHER], "tool_choice": "auto"}
        )
        none = await post(
            server, "/v1/chat/completions", {"model": MODEL, "messages": MSG, "tools": [WEATHER], "tool_choice": "none"}
        )

    message = '"auto" tool choice requires --enable-auto-tool-choice and --tool-call-parser to be set'
    assert_vllm_error(auto, 400, message)
    assert_vllm_error(explicit, 400, message)
    assert none.status_code == 200 and none.json()["choices"][0]["message"]["tool_calls"] == []


async def test_tool_choice_is_validated_as_protocol_py_does():
    async with simulator_server(model=MODEL, ttft_ms=0, itl_ms=0, **TOOLS_ON) as server:
        no_tools = await post(server, "/v1/chat/completions", {"model": MODEL, "messages": MSG, "tool_choice": "auto"})
        unknown = await post(
            server,
            "/v1/chat/completions",
            {
                "model": MODEL,
                "messages": MSG,
                "tools": [WEATHER],
                "tool_choice": {"type": "function", "function": {"name": "nope"}},
            },
        )

    assert_vllm_error(no_tools, 400, "When using `tool_choice`, `tools` must be set.")
    assert_vllm_error(unknown, 400, "The tool specified in `tool_choice` does not match any of the specified `tools`")


async def test_with_a_tool_parser_the_model_calls_the_tool():
    async with simulator_server(model=MODEL, ttft_ms=0, itl_ms=0, **TOOLS_ON) as server:
        answer = await sdk(server).chat.completions.create(model=MODEL, messages=MSG, tools=[WEATHER])

    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None  # the hermes parser found only a call
    (call,) = choice.message.tool_calls
    assert call.id.startswith("chatcmpl-tool-") and call.type == "function"
    assert call.function.name == "get_weather"
    jsonschema.validate(json.loads(call.function.arguments), WEATHER["function"]["parameters"])
    assert answer.usage.completion_tokens > 0


async def test_a_streamed_tool_call_arrives_as_vllm_streams_it():
    async with simulator_server(model=MODEL, ttft_ms=0, itl_ms=1, **TOOLS_ON) as server:
        raw = (
            await post(
                server,
                "/v1/chat/completions",
                {
                    "model": MODEL,
                    "messages": MSG,
                    "tools": [WEATHER],
                    "stream": True,
                    "stream_options": {"include_usage": True},
                },
            )
        ).content
        whole = (
            await post(server, "/v1/chat/completions", {"model": MODEL, "messages": MSG, "tools": [WEATHER]})
        ).json()

    chunks = [json.loads(e) for e in events(raw)]
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[0] == {"role": "assistant", "content": ""}
    header = deltas[1]["tool_calls"][0]
    assert set(header) == {"id", "type", "index", "function"} and header["function"] == {"name": "get_weather"}
    assert all(set(d) == {"tool_calls"} and set(d["tool_calls"][0]) == {"index", "function"} for d in deltas[2:])
    arguments = "".join(d["tool_calls"][0]["function"].get("arguments", "") for d in deltas[1:])
    assert arguments == whole["choices"][0]["message"]["tool_calls"][0]["function"]["arguments"]
    finishes = [c["choices"][0]["finish_reason"] for c in chunks if c["choices"]]
    assert finishes[-1] == "tool_calls" and set(finishes[:-1]) == {None}
    assert chunks[-1]["usage"] == {k: whole["usage"][k] for k in ("prompt_tokens", "total_tokens", "completion_tokens")}


async def test_after_a_tool_result_the_model_answers_in_words():
    history = [
        *MSG,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call-1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call-1", "content": "sunny, 21C"},
    ]
    async with simulator_server(model=MODEL, ttft_ms=0, itl_ms=0, **TOOLS_ON) as server:
        answer = await sdk(server).chat.completions.create(model=MODEL, messages=history, tools=[WEATHER], max_tokens=5)

    assert answer.choices[0].finish_reason == "length" and not answer.choices[0].message.tool_calls
    assert len(answer.choices[0].message.content.split()) == 5


async def test_a_named_tool_choice_works_without_the_flags_as_guided_decoding():
    body = {
        "model": MODEL,
        "messages": MSG,
        "tools": [WEATHER],
        "tool_choice": {"type": "function", "function": {"name": "get_weather"}},
    }
    async with simulator_server(model=MODEL, ttft_ms=0, itl_ms=0) as server:
        whole = (await post(server, "/v1/chat/completions", body)).json()
        raw = (await post(server, "/v1/chat/completions", {**body, "stream": True})).content

    choice = whole["choices"][0]
    # vLLM: a guided call leaves content "" and keeps the engine's finish reason when not streamed...
    assert choice["message"]["content"] == "" and choice["finish_reason"] == "stop"
    jsonschema.validate(
        json.loads(choice["message"]["tool_calls"][0]["function"]["arguments"]), WEATHER["function"]["parameters"]
    )
    # ...and reports "tool_calls" when streamed, the first delta naming the function with arguments.
    chunks = [json.loads(e) for e in events(raw)]
    first = chunks[1]["choices"][0]["delta"]["tool_calls"][0]
    assert first["function"]["name"] == "get_weather" and "arguments" in first["function"]
    assert chunks[-1]["choices"][0]["finish_reason"] == "tool_calls"


# --- n > 1 -------------------------------------------------------------------------------------


async def test_n_answers_are_separate_choices_and_usage_counts_them_all():
    async with simulator_server(model=MODEL, ttft_ms=0, itl_ms=0) as server:
        whole = await sdk(server).chat.completions.create(model=MODEL, messages=MSG, n=3, max_tokens=4)
        raw = (
            await post(
                server,
                "/v1/chat/completions",
                {"model": MODEL, "messages": MSG, "n": 3, "max_tokens": 4, "stream": True, "stream_options": {}},
            )
        ).content
        completions = await sdk(server).completions.create(model=MODEL, prompt="once", n=2, max_tokens=3)

    assert [c.index for c in whole.choices] == [0, 1, 2]
    texts = [c.message.content for c in whole.choices]
    assert len(set(texts)) == 3 and whole.usage.completion_tokens == 12
    chunks = [json.loads(e) for e in events(raw)]
    assert [c["choices"][0]["delta"] for c in chunks[:3]] == [{"role": "assistant", "content": ""}] * 3
    streamed = {
        i: "".join(
            c["choices"][0]["delta"].get("content", "")
            for c in chunks[3:]
            if c["choices"] and c["choices"][0]["index"] == i
        )
        for i in range(3)
    }
    assert [streamed[i] for i in range(3)] == texts
    finals = [c["choices"][0]["index"] for c in chunks if c["choices"] and c["choices"][0]["finish_reason"]]
    assert sorted(finals) == [0, 1, 2]
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["completion_tokens"] == 12
    assert len(completions.choices) == 2 and completions.usage.completion_tokens == 6


async def test_n_below_one_is_refused():
    async with simulator_server(model=MODEL, ttft_ms=0, itl_ms=0) as server:
        zero = await post(server, "/v1/chat/completions", {"model": MODEL, "messages": MSG, "n": 0})
        huge = await post(server, "/v1/chat/completions", {"model": MODEL, "messages": MSG, "n": 10**12})

    assert_vllm_error(zero, 400, "n must be at least 1, got 0.")
    # vLLM sets no upper bound; the simulator does, so one request cannot take it down.
    assert_vllm_error(huge, 400, "The simulator serves at most n = 128 choices, got 1000000000000.")


# --- logprobs ----------------------------------------------------------------------------------


async def test_chat_logprobs_list_each_token_with_its_top_alternatives():
    async with simulator_server(model=MODEL, ttft_ms=0, itl_ms=0) as server:
        answer = await sdk(server).chat.completions.create(
            model=MODEL, messages=MSG, max_tokens=6, logprobs=True, top_logprobs=3
        )
        plain = await sdk(server).chat.completions.create(model=MODEL, messages=MSG, max_tokens=2, logprobs=True)
        raw = (
            await post(
                server,
                "/v1/chat/completions",
                {"model": MODEL, "messages": MSG, "max_tokens": 3, "logprobs": True, "top_logprobs": 2, "stream": True},
            )
        ).content

    content = answer.choices[0].logprobs.content
    assert "".join(t.token for t in content) == answer.choices[0].message.content
    for entry in content:
        assert entry.bytes == list(entry.token.encode()) and entry.logprob <= 0
        assert len(entry.top_logprobs) == 3 and entry.top_logprobs[0].token == entry.token
        assert entry.top_logprobs[0].logprob >= max(t.logprob for t in entry.top_logprobs[1:])
    assert all(entry.top_logprobs == [] for entry in plain.choices[0].logprobs.content)
    chunks = [json.loads(e) for e in events(raw)]
    assert chunks[0]["choices"][0]["logprobs"] is None  # the role chunk
    assert all(len(c["choices"][0]["logprobs"]["content"]) == 1 for c in chunks[1:])


@pytest.mark.parametrize(
    ("body", "message"),
    [
        ({"top_logprobs": 2}, "when using `top_logprobs`, `logprobs` must be set to true."),
        ({"logprobs": True, "top_logprobs": -1}, "`top_logprobs` must be a positive value."),
        (
            {"logprobs": True, "top_logprobs": 21},
            "Requested sample logprobs of 21, which is greater than max allowed: 20",
        ),
    ],
)
async def test_bad_logprobs_requests_get_vllms_400(body, message):
    async with simulator_server(model=MODEL, ttft_ms=0, itl_ms=0) as server:
        response = await post(server, "/v1/chat/completions", {"model": MODEL, "messages": MSG, **body})

    assert_vllm_error(response, 400, message)


async def test_completion_logprobs_have_offsets_tokens_and_top_dicts():
    async with simulator_server(model=MODEL, ttft_ms=0, itl_ms=0) as server:
        answer = await sdk(server).completions.create(model=MODEL, prompt="once upon", max_tokens=5, logprobs=2)

    choice = answer.choices[0]
    lp = choice.logprobs
    assert "".join(lp.tokens) == choice.text and len(lp.token_logprobs) == 5
    assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    assert all(
        len(top) == 3 and next(iter(top)) == token for top, token in zip(lp.top_logprobs, lp.tokens, strict=True)
    )


# --- response_format ----------------------------------------------------------------------------

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer"},
        "score": {"type": "number"},
        "tags": {"type": "array", "items": {"type": "string"}, "minItems": 2},
        "ok": {"type": "boolean"},
        "kind": {"enum": ["a", "b"]},
        "address": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
    },
    "required": ["name", "age", "tags", "address"],
}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
async def test_response_format_yields_valid_json(stream):
    formats = [
        {"type": "json_object"},
        {"type": "json_schema", "json_schema": {"name": "person", "schema": SCHEMA, "strict": True}},
    ]
    async with simulator_server(model=MODEL, ttft_ms=0, itl_ms=0) as server:
        texts = []
        for fmt in formats:
            body = {"model": MODEL, "messages": MSG, "response_format": fmt, "stream": stream}
            response = await post(server, "/v1/chat/completions", body)
            if stream:
                texts.append(
                    "".join(json.loads(e)["choices"][0]["delta"].get("content", "") for e in events(response.content))
                )
            else:
                texts.append(response.json()["choices"][0]["message"]["content"])
        completion = await post(
            server,
            "/v1/completions",
            {"model": MODEL, "prompt": "{", "max_tokens": 200, "response_format": {"type": "json_object"}},
        )

    assert isinstance(json.loads(texts[0]), dict)
    jsonschema.validate(json.loads(texts[1]), SCHEMA)
    assert completion.json()["choices"][0]["finish_reason"] == "stop"  # the document ended before max_tokens
    assert isinstance(json.loads(completion.json()["choices"][0]["text"]), dict)


async def test_json_cut_short_by_max_tokens_ends_with_length():
    async with simulator_server(model=MODEL, ttft_ms=0, itl_ms=0) as server:
        answer = (
            await post(
                server,
                "/v1/chat/completions",
                {"model": MODEL, "messages": MSG, "max_tokens": 3, "response_format": {"type": "json_object"}},
            )
        ).json()

    assert answer["choices"][0]["finish_reason"] == "length" and answer["usage"]["completion_tokens"] == 3
    with pytest.raises(json.JSONDecodeError):
        json.loads(answer["choices"][0]["message"]["content"])


# --- max_tokens defaults, context ---------------------------------------------------------------


async def test_max_tokens_defaults_are_vllms():
    async with simulator_server(model=MODEL, ttft_ms=0, itl_ms=0, max_tokens_default=40) as server:
        completion = (await post(server, "/v1/completions", {"model": MODEL, "prompt": "once"})).json()
        unlimited = await post(server, "/v1/completions", {"model": MODEL, "prompt": "once", "max_tokens": None})
        chat = (await post(server, "/v1/chat/completions", {"model": MODEL, "messages": MSG})).json()

    # CompletionRequest.max_tokens defaults to 16; chat has no default (the rest of the context).
    assert completion["usage"]["completion_tokens"] == 16 and completion["choices"][0]["finish_reason"] == "length"
    assert unlimited.json()["usage"]["completion_tokens"] == 40
    assert chat["usage"]["completion_tokens"] == 40 and chat["choices"][0]["finish_reason"] == "stop"


async def test_context_overflow_messages_are_vllms():
    async with simulator_server(model=MODEL, ttft_ms=0, itl_ms=0, max_model_len=32) as server:
        too_long = await post(server, "/v1/completions", {"model": MODEL, "prompt": "word " * 40})
        too_many = await post(
            server, "/v1/completions", {"model": MODEL, "prompt": "four words long here", "max_tokens": 30}
        )
        zero = await post(server, "/v1/completions", {"model": MODEL, "prompt": "x", "max_tokens": 0})

    assert_vllm_error(
        too_long,
        400,
        "This model's maximum context length is 32 tokens. However, your request has 41 "
        "input tokens. Please reduce the length of the input messages.",
    )
    assert_vllm_error(
        too_many,
        400,
        "'max_tokens' or 'max_completion_tokens' is too large: 30. This model's maximum "
        "context length is 32 tokens and your request has 5 input tokens (30 > 32 - 5).",
    )
    assert_vllm_error(zero, 400, "max_tokens must be at least 1, got 0.")


# --- stream_options -----------------------------------------------------------------------------


async def test_stream_options_defaults_are_vllms():
    base = {"model": MODEL, "messages": MSG, "max_tokens": 3}
    async with simulator_server(model=MODEL, ttft_ms=0, itl_ms=0) as server:
        empty = (await post(server, "/v1/chat/completions", {**base, "stream": True, "stream_options": {}})).content
        off = (
            await post(
                server, "/v1/chat/completions", {**base, "stream": True, "stream_options": {"include_usage": False}}
            )
        ).content
        absent = (await post(server, "/v1/chat/completions", {**base, "stream": True})).content
        empty_unstreamed = await post(server, "/v1/chat/completions", {**base, "stream_options": {}})
        unstreamed = await post(server, "/v1/chat/completions", {**base, "stream_options": {"include_usage": True}})

    # vLLM's StreamOptions.include_usage defaults to true once stream_options is present (OpenAI: false).
    assert json.loads(events(empty)[-1]) == {
        **json.loads(events(empty)[-1]),
        "choices": [],
        "usage": {"prompt_tokens": 13, "total_tokens": 16, "completion_tokens": 3},
    }
    assert all(json.loads(e)["choices"] for e in events(off)) and all(json.loads(e)["choices"] for e in events(absent))
    assert empty_unstreamed.status_code == 200  # {} is falsy for vLLM's validator
    assert_vllm_error(unstreamed, 400, "Stream options can only be defined when `stream=True`.")


async def test_continuous_usage_stats_put_running_usage_on_every_chunk():
    async with simulator_server(model=MODEL, ttft_ms=0, itl_ms=0) as server:
        raw = (
            await post(
                server,
                "/v1/chat/completions",
                {
                    "model": MODEL,
                    "messages": MSG,
                    "max_tokens": 3,
                    "stream": True,
                    "stream_options": {"include_usage": True, "continuous_usage_stats": True},
                },
            )
        ).content
        completion = (
            await post(
                server,
                "/v1/completions",
                {
                    "model": MODEL,
                    "prompt": "once",
                    "max_tokens": 2,
                    "stream": True,
                    "stream_options": {"continuous_usage_stats": True},
                },
            )
        ).content

    chunks = [json.loads(e) for e in events(raw)]
    assert [c["usage"]["completion_tokens"] for c in chunks] == [0, 1, 2, 3, 3]
    assert all(c["usage"]["prompt_tokens"] == 13 for c in chunks)
    usage = [json.loads(e)["usage"] for e in events(completion)]
    assert usage[:2] == [
        {"prompt_tokens": 2, "total_tokens": 3, "completion_tokens": 1, "prompt_tokens_details": None},
        {"prompt_tokens": 2, "total_tokens": 4, "completion_tokens": 2, "prompt_tokens_details": None},
    ]


# --- token ids and the nulls vLLM writes -------------------------------------------------------


async def test_chat_chunks_and_answers_carry_vllms_token_id_nulls_in_vllms_order():
    async with simulator_server(model=MODEL, ttft_ms=0, itl_ms=0) as server:
        raw = (
            await post(
                server, "/v1/chat/completions", {"model": MODEL, "messages": MSG, "max_tokens": 2, "stream": True}
            )
        ).content
        whole = await post(server, "/v1/chat/completions", {"model": MODEL, "messages": MSG, "max_tokens": 2})

    role, token, last = events(raw)
    assert role.endswith(
        '"choices":[{"index":0,"delta":{"role":"assistant","content":""},"logprobs":null,'
        '"finish_reason":null}],"prompt_token_ids":null}'
    )
    assert token.endswith('"logprobs":null,"finish_reason":null,"token_ids":null}]}')
    assert last.endswith('"logprobs":null,"finish_reason":"length","stop_reason":null,"token_ids":null}]}')
    body = whole.text
    assert '"finish_reason":"length","stop_reason":null,"token_ids":null}]' in body
    assert body.endswith('"prompt_logprobs":null,"prompt_token_ids":null,"kv_transfer_params":null}')


async def test_completion_chunks_and_answers_carry_vllms_token_id_nulls():
    async with simulator_server(model=MODEL, ttft_ms=0, itl_ms=0) as server:
        raw = (
            await post(server, "/v1/completions", {"model": MODEL, "prompt": "once", "max_tokens": 2, "stream": True})
        ).content
        whole = await post(server, "/v1/completions", {"model": MODEL, "prompt": "once", "max_tokens": 2})

    first, last = events(raw)
    assert first.endswith(
        '"logprobs":null,"finish_reason":null,"stop_reason":null,"prompt_token_ids":null,'
        '"token_ids":null}],"usage":null}'
    )
    assert last.endswith(
        '"finish_reason":"length","stop_reason":null,"prompt_token_ids":null,"token_ids":null}],"usage":null}'
    )
    assert (
        '"stop_reason":null,"token_ids":null,"prompt_logprobs":null,"prompt_token_ids":null}],"service_tier":null'
    ) in whole.text


async def test_return_token_ids_gives_the_ids_behind_the_counts():
    async with simulator_server(model=MODEL, ttft_ms=0, itl_ms=0) as server:
        whole = (
            await post(
                server,
                "/v1/chat/completions",
                {"model": MODEL, "messages": MSG, "max_tokens": 4, "return_token_ids": True},
            )
        ).json()
        raw = (
            await post(
                server,
                "/v1/completions",
                {"model": MODEL, "prompt": "once upon", "max_tokens": 3, "stream": True, "return_token_ids": True},
            )
        ).content

    assert len(whole["choices"][0]["token_ids"]) == whole["usage"]["completion_tokens"] == 4
    assert len(whole["prompt_token_ids"]) == whole["usage"]["prompt_tokens"]
    chunks = [json.loads(e)["choices"][0] for e in events(raw)]
    assert len(chunks[0]["prompt_token_ids"]) == 3 and chunks[1]["prompt_token_ids"] is None  # first chunk only
    assert all(len(c["token_ids"]) == 1 for c in chunks)


# --- a slow reader, /version, bad bytes --------------------------------------------------------


async def _slow_stream(port: int, body: dict, *, stall_s: float) -> bytes:
    """POST a streaming request from a socket with a tiny receive window, read nothing for
    ``stall_s``, then everything; return the de-chunked body."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    sock.setblocking(False)
    await asyncio.get_running_loop().sock_connect(sock, ("127.0.0.1", port))
    reader, writer = await asyncio.open_connection(sock=sock)
    payload = json.dumps(body).encode()
    writer.write(
        b"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\nContent-Length: %d\r\n\r\n%b" % (len(payload), payload)
    )
    await writer.drain()
    await asyncio.sleep(stall_s)
    raw = await reader.read(-1)
    writer.close()
    head, _, chunked = raw.partition(b"\r\n\r\n")
    assert b" 200 " in head.split(b"\r\n")[0] and b"chunked" in head.lower()
    body_bytes = b""
    while chunked:
        size_line, _, rest = chunked.partition(b"\r\n")
        size = int(size_line, 16)
        if size == 0:
            break
        body_bytes += rest[:size]
        chunked = rest[size + 2 :]
    return body_bytes


async def test_a_client_that_reads_slowly_gets_several_tokens_per_chunk():
    body = {"model": MODEL, "messages": MSG, "max_tokens": 1500, "stream": True, "stream_options": {}}
    async with simulator_server(model=MODEL, ttft_ms=0, itl_ms=1, socket_send_buffer=4096) as server:
        raw = await _slow_stream(server.port, body, stall_s=0.8)
        whole = (await post(server, "/v1/chat/completions", {**body, "stream": False, "stream_options": None})).json()

    chunks = [json.loads(e) for e in events(raw)]
    contents = [c["choices"][0]["delta"].get("content", "") for c in chunks if c["choices"]]
    assert "".join(contents) == whole["choices"][0]["message"]["content"]  # nothing lost, nothing repeated
    assert len(contents) < 1 + 1500  # fewer events than tokens...
    assert max(len(c.split()) for c in contents) > 1  # ...because some carry several
    assert chunks[-1]["usage"]["completion_tokens"] == 1500  # usage still counts tokens, not events


async def test_version_answers_the_release_it_simulates():
    async with simulator_server(model=MODEL) as server, httpx.AsyncClient() as http:
        answer = await http.get(server.url + "/version")

    assert answer.json() == {"version": VLLM_VERSION} == {"version": "0.11.0"}


@pytest.mark.parametrize(
    ("path", "raw"),
    [
        ("/v1/chat/completions", b'{"model":"sim-llama","messages":[{"role":"user","content":"\\ud800"}]}'),
        ("/v1/completions", b'{"model":"sim-llama","prompt":"a\\udfffb"}'),
        ("/v1/embeddings", b'{"model":"sim-llama","input":"\\ud800"}'),
    ],
)
async def test_a_lone_surrogate_is_a_400_and_the_server_keeps_serving(path, raw):
    async with (
        simulator_server(model=MODEL, ttft_ms=0, itl_ms=0) as server,
        httpx.AsyncClient(base_url=server.url, timeout=10) as http,
    ):
        bad = await http.post(path, content=raw, headers={"Content-Type": "application/json"})
        good = await http.post("/v1/completions", json={"model": MODEL, "prompt": "x", "max_tokens": 1})

    assert bad.status_code == 400 and bad.json()["error"]["type"] == "BadRequestError"
    assert "surrogate" in bad.json()["error"]["message"]
    assert good.status_code == 200


async def _raw_post(port: int, head: bytes, body: bytes) -> bytes:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(
        b"POST /v1/completions HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
        b"Connection: close\r\n%bContent-Length: %d\r\n\r\n%b" % (head, len(body), body)
    )
    await writer.drain()
    raw = await reader.read(-1)
    writer.close()
    return raw


async def test_header_bytes_that_are_not_utf8_are_read_as_latin1_not_a_500():
    body = b'{"model":"sim-llama","prompt":"x","max_tokens":1}'
    async with simulator_server(model=MODEL, ttft_ms=0, itl_ms=0, api_key="k") as server:
        wrong_key = await _raw_post(server.port, b"Authorization: Bearer \xff\xfe\r\n", body)
        odd_id = await _raw_post(server.port, b"Authorization: Bearer k\r\nX-Request-Id: a\xff\x80b\r\n", body)
        async with httpx.AsyncClient() as http:
            stats = (await http.get(server.url + "/sim/stats")).json()

    assert wrong_key.startswith(b"HTTP/1.1 401 ")
    assert odd_id.startswith(b"HTTP/1.1 200 ")
    assert json.loads(odd_id.partition(b"\r\n\r\n")[2])["id"] == "cmpl-a\xff\x80b"  # Latin-1, as Starlette reads it
    assert stats["authorization_headers"] == ["Bearer \xff\xfe", "Bearer k"]


HOSTILE = [
    None,
    True,
    False,
    0,
    1,
    -1,
    3,
    21,
    10**30,
    1.5,
    "",
    "x",
    "auto",
    "none",
    "required",
    [],
    [1],
    ["a"],
    [[1, 2]],
    {},
    {"a": 1},
    {"type": "function", "function": {"name": "f"}},
    [
        {
            "type": "function",
            "function": {
                "name": "f",
                "parameters": {
                    "type": "object",
                    "properties": {"a": {"type": "array", "items": {"$ref": "#"}, "minItems": 10**9}},
                },
            },
        }
    ],
    {"type": "json_schema", "json_schema": {"name": "n", "schema": {"type": "integer", "minimum": "x"}}},
    {"type": "json_schema", "json_schema": {"name": "n", "schema": {"anyOf": []}}},
    {"type": "json_object"},
    {"include_usage": "x"},
    {"include_usage": True, "continuous_usage_stats": True},
    [{"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "image_url"}]}],
    [{"role": "tool", "content": None}],
    [{"role": 1}],
    "\u0000",
]
FIELDS = [
    "model",
    "messages",
    "prompt",
    "max_tokens",
    "max_completion_tokens",
    "n",
    "stream",
    "stream_options",
    "logprobs",
    "top_logprobs",
    "tools",
    "tool_choice",
    "response_format",
    "return_token_ids",
    "input",
    "encoding_format",
]


async def test_hostile_bodies_get_vllms_error_shape_never_a_500():
    rng = random.Random(7)  # the same 300 bodies every run
    async with (
        simulator_server(model=MODEL, ttft_ms=0, itl_ms=0, max_model_len=200, **TOOLS_ON) as server,
        httpx.AsyncClient(base_url=server.url, timeout=10) as http,
    ):
        statuses = set()
        for _ in range(300):
            body = {"model": MODEL, "messages": MSG, "prompt": "hi", "input": "hi"}
            for name in rng.sample(FIELDS, rng.randint(1, 5)):
                body[name] = rng.choice(HOSTILE)
            path = rng.choice(["/v1/chat/completions", "/v1/completions", "/v1/embeddings"])
            response = await http.post(path, json=body)
            statuses.add(response.status_code)
            if response.status_code != 200:
                error = response.json()["error"]
                assert set(error) == {"message", "type", "param", "code"} and error["code"] == response.status_code

    assert statuses <= {200, 400, 404} and {200, 400} <= statuses
