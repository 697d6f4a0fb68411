"""A gateway input fuzzer (issue #11, the fault suite): hostile JSON bodies, headers and framing
against a real gateway (the production HTTP protocol, crosslogic/server.py) in front of a real
simulator node.

For every input: no 5xx (a healthy node is behind the gateway, so a 5xx could only be the
input's doing), every error is OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``,
every 200 is well-formed; and after each property the worker still answers /health and a plain
request (nothing was cooled down or wedged by what came before).

Requests go over raw sockets with our own bytes: an HTTP client would refuse to send much of this.
Examples are bounded (the whole module runs in well under a minute); hypothesis prints the
failing input and the seed to reproduce it.
"""

from __future__ import annotations

import contextlib
import json
import re
import socket
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from apps.gateway.tests.conftest import NODE_KEY, ready_node, running_gateway
from apps.tenancy.services import tenant_update
from crosslogic.server import GuardedHttpToolsProtocol
from vllm_sim import SimHandle, run_simulator_process

pytestmark = pytest.mark.slow  # a real gateway and a simulator process

MODEL = "llama-3-8b"
BODY_TIMEOUT_S = 0.3
FUZZ = settings(
    deadline=None,
    database=None,  # nothing written into the work tree; a failure prints its reproduction
    suppress_health_check=list(HealthCheck),
    print_blob=True,
)
ERROR_KEYS = {"message", "type", "param", "code"}


# --- a minimal HTTP/1.1 client over a raw socket -------------------------------------------------


@dataclass
class Response:
    status: int
    headers: dict[str, str]
    body: bytes


def exchange(address: tuple[str, int], raw: bytes, timeout_s: float = 15.0, head_only: bool = False) -> list[Response]:
    """Send ``raw`` as is, read until the server closes, parse every response in what came back.

    The last request asks for ``Connection: close``; the socket is not half-closed, as uvicorn
    takes a client's EOF for a disconnect (and drops a request whose body was already read).
    """
    with socket.create_connection(address, timeout=timeout_s) as s:
        # The server may refuse early (431, 400) and close; what it answered is still to be read.
        with contextlib.suppress(BrokenPipeError, ConnectionResetError):
            s.sendall(raw)
        chunks = []
        while True:
            try:
                chunk = s.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            chunks.append(chunk)
    return parse_responses(b"".join(chunks), head_only=head_only)


def parse_responses(data: bytes, head_only: bool = False) -> list[Response]:
    """Every response in ``data``; ``head_only``: answers to HEAD, whose bodies are never sent."""
    responses = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        assert sep, f"a truncated response head: {data[:200]!r}"
        lines = head.decode("latin-1").split("\r\n")
        match = re.fullmatch(r"HTTP/1\.1 (\d{3}) ?.*", lines[0])
        assert match, f"not an HTTP/1.1 status line: {lines[0]!r}"
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        if head_only and not rest.startswith(b"HTTP/1.1 "):
            body, rest = rest, b""  # the edge's own refusal (a JSON 400) carries a body even to HEAD
        elif head_only:
            body = b""
        elif headers.get("transfer-encoding", "").lower() == "chunked":
            body = b""
            while True:
                size_line, _, rest = rest.partition(b"\r\n")
                size = int(size_line.split(b";")[0], 16)
                body, rest = body + rest[:size], rest[size + 2 :]
                if size == 0:
                    break
        elif "content-length" in headers:
            size = int(headers["content-length"])
            body, rest = rest[:size], rest[size:]
        else:
            body, rest = rest, b""
        responses.append(Response(int(match.group(1)), headers, body))
        data = rest
    return responses


def request_bytes(
    method: str, path: str, headers: list[tuple[bytes, bytes]], body: bytes, *, content_length: bool = True
) -> bytes:
    head = [f"{method} {path} HTTP/1.1".encode(), b"Host: gateway"]
    head += [name + b": " + value for name, value in headers]
    if content_length:
        head.append(b"Content-Length: " + str(len(body)).encode())
    head.append(b"Connection: close")
    return b"\r\n".join(head) + b"\r\n\r\n" + body


# --- what every response must be ------------------------------------------------------------------


def check(response: Response, method: str = "POST") -> None:
    event(f"status {response.status}")  # the spread shows with --hypothesis-show-statistics
    assert response.status < 500, (response.status, response.body[:500])
    if method == "HEAD":  # no body to look at
        return
    if response.status >= 400:
        assert response.headers.get("content-type", "").startswith("application/json"), response.headers
        assert response.body, (response.status, response.headers)
        error = json.loads(response.body)["error"]
        assert set(error) == ERROR_KEYS, error
        assert isinstance(error["message"], str) and error["message"], error
        assert isinstance(error["type"], str) and error["type"], error
        return
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        events = [line[len(b"data: ") :] for line in response.body.split(b"\n") if line.startswith(b"data: ")]
        assert events and events[-1] == b"[DONE]", response.body[-300:]
        for data in events[:-1]:
            chunk = json.loads(data)
            if "error" in chunk:
                assert set(chunk["error"]) >= {"message", "type"}, chunk
    else:
        assert isinstance(json.loads(response.body), dict), response.body[:300]


# --- strategies -------------------------------------------------------------------------------------

HOSTILE_STRINGS = st.sampled_from(
    [
        "",
        "\x00",
        "a\x00b",
        "\ud800",  # a lone surrogate: crashed a node once (issue #11, 6)
        "\udfff\ud800",
        "\u202e\u2066",
        "\U0001f600" * 50,
        "x" * 20_000,
        "<|im_end|>",
        "{{ config }}",
        "'; DROP TABLE tenancy_apikey; --",
        "../../etc/passwd",
        MODEL + "\x00",
        MODEL.upper(),
        " " + MODEL,
        "llama-3-8b/../other",
    ]
)
STRINGS = st.one_of(st.text(max_size=40), HOSTILE_STRINGS)
NUMBERS = st.one_of(
    st.integers(min_value=-(2**70), max_value=2**70),
    st.sampled_from([0, -1, 1, 2**31, 2**63, 10**30, 1e308, -0.0, 0.5]),
    st.floats(allow_nan=True, allow_infinity=True),  # NaN and Infinity leave as bare literals
)
SCALARS = st.one_of(st.none(), st.booleans(), NUMBERS, STRINGS)
JSON_VALUES = st.recursive(
    SCALARS,
    lambda children: st.lists(children, max_size=4) | st.dictionaries(STRINGS, children, max_size=4),
    max_leaves=12,
)
ROLES = st.one_of(st.sampled_from(["system", "user", "assistant", "tool", "developer"]), STRINGS, JSON_VALUES)
CONTENT = st.one_of(
    st.just("Say something short"),
    STRINGS,
    st.lists(
        st.fixed_dictionaries({"type": st.sampled_from(["text", "image_url", "bogus"]), "text": STRINGS}), max_size=2
    ),
    JSON_VALUES,
)
MESSAGES = st.one_of(
    st.lists(st.fixed_dictionaries({"role": ROLES, "content": CONTENT}), min_size=1, max_size=3),
    st.lists(JSON_VALUES, max_size=3),
    JSON_VALUES,
)
SMALL_TOKENS = st.integers(min_value=1, max_value=4)
# A field the gateway looks at, or vLLM does: a sensible value most of the time, anything otherwise.
OPTIONAL_FIELDS = {
    "max_tokens": st.one_of(SMALL_TOKENS, NUMBERS, JSON_VALUES),
    "max_completion_tokens": st.one_of(SMALL_TOKENS, NUMBERS),
    "n": st.one_of(st.integers(min_value=1, max_value=2), NUMBERS),
    "stream": st.one_of(st.booleans(), JSON_VALUES),
    "stream_options": st.one_of(
        st.fixed_dictionaries({}, optional={"include_usage": JSON_VALUES, "continuous_usage_stats": JSON_VALUES}),
        JSON_VALUES,
    ),
    "temperature": NUMBERS,
    "top_p": NUMBERS,
    "stop": st.one_of(STRINGS, st.lists(STRINGS, max_size=3), JSON_VALUES),
    "logprobs": JSON_VALUES,
    "top_logprobs": NUMBERS,
    "seed": NUMBERS,
    "user": STRINGS,
    "response_format": JSON_VALUES,
    "tools": JSON_VALUES,
    "tool_choice": JSON_VALUES,
}
ENDPOINTS = {
    "/v1/chat/completions": ("messages", MESSAGES),
    "/v1/completions": ("prompt", st.one_of(st.just("Once upon a time"), STRINGS, JSON_VALUES)),
    "/v1/embeddings": ("input", st.one_of(st.just("hello"), STRINGS, JSON_VALUES)),
}


@st.composite
def payloads(draw: st.DrawFn) -> tuple[str, Any]:
    path = draw(st.sampled_from(sorted(ENDPOINTS)))
    field, values = ENDPOINTS[path]
    required: dict[str, st.SearchStrategy[Any]] = {}
    if draw(st.integers(0, 9)):  # mostly the right model, so most requests reach the node
        required["model"] = st.just(MODEL)
    elif draw(st.booleans()):
        required["model"] = JSON_VALUES
    if draw(st.integers(0, 9)):
        required[field] = values
    payload = draw(st.fixed_dictionaries(required, optional=OPTIONAL_FIELDS))
    payload.update(draw(st.dictionaries(STRINGS, JSON_VALUES, max_size=2)))
    if not draw(st.integers(0, 19)):
        payload = draw(JSON_VALUES)  # not an object at all, now and then
    return path, payload


def encode(payload: Any, ascii_only: bool) -> bytes:
    # surrogatepass: a lone surrogate leaves as the bytes a careless client would send (invalid UTF-8).
    return json.dumps(payload, ensure_ascii=ascii_only).encode("utf-8", "surrogatepass")


# --- the target -------------------------------------------------------------------------------------


@dataclass
class Target:
    address: tuple[str, int]
    key: str
    node: SimHandle

    def send(self, raw: bytes, method: str = "POST") -> None:
        """One exchange, every response checked; the node must survive it (so hypothesis shrinks
        to the input that killed it)."""
        for response in exchange(self.address, raw, head_only=method == "HEAD"):
            check(response, method)
        assert self.node.proc.poll() is None, "the node died: " + "".join(self.node.output)[-3000:]

    def auth(self) -> tuple[bytes, bytes]:
        return (b"Authorization", b"Bearer " + self.key.encode())

    def assert_healthy(self) -> None:
        (health,) = exchange(self.address, request_bytes("GET", "/health", [], b"", content_length=False))
        assert health.status == 200, health
        body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2})
        (answer,) = exchange(
            self.address,
            request_bytes(
                "POST", "/v1/chat/completions", [self.auth(), (b"Content-Type", b"application/json")], body.encode()
            ),
        )
        assert answer.status == 200, (answer.status, answer.body[:300])


@pytest.fixture
def target(transactional_db, redis_db, api_key, tenant, catalog_model, settings) -> Iterator[Target]:
    settings.GATEWAY_BODY_TIMEOUT_S = BODY_TIMEOUT_S
    tenant_update(
        tenant=tenant, requests_per_minute=1_000_000, tokens_per_minute=1_000_000_000, max_concurrent_requests=10_000
    )
    with (
        running_gateway(http=GuardedHttpToolsProtocol) as gateway,  # the production protocol
        run_simulator_process(model=MODEL, api_key=NODE_KEY, ttft_ms=0, itl_ms=0, light=True) as sim,
    ):
        ready_node(catalog_model, sim.url, gateway=gateway)
        host, port = gateway.url.removeprefix("http://").rsplit(":", 1)
        target = Target(address=(host, int(port)), key=api_key[1], node=sim)
        target.assert_healthy()
        yield target
        assert sim.proc.poll() is None, "the node died: " + "".join(sim.output)[-3000:]
        target.assert_healthy()


# --- the properties ---------------------------------------------------------------------------------


def test_hostile_json_bodies(target: Target) -> None:
    @settings(FUZZ, max_examples=500)
    @given(case=payloads(), ascii_only=st.booleans())
    def hostile_json(case: tuple[str, Any], ascii_only: bool) -> None:
        path, payload = case
        headers = [target.auth(), (b"Content-Type", b"application/json")]
        target.send(request_bytes("POST", path, headers, encode(payload, ascii_only)))

    hostile_json()


HEADER_NAMES = st.one_of(
    st.sampled_from(
        [b"Authorization", b"Content-Type", b"X-Request-Id", b"Accept", b"OpenAI-Organization", b"Expect", b"Range"]
    ),
    st.binary(min_size=1, max_size=20).filter(lambda b: b.isalnum()),
)
HEADER_VALUES = st.one_of(
    st.binary(max_size=60).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
    st.sampled_from(
        [b"", b"Bearer", b"Bearer ", b"bearer x", b"Basic YTpi", b"\xff\xfe", b"application/json; x", b"*/*"]
    ),
)


def test_hostile_headers_methods_and_paths(target: Target) -> None:
    @settings(FUZZ, max_examples=250)
    @given(
        method=st.sampled_from(["POST", "POST", "GET", "PUT", "DELETE", "OPTIONS", "HEAD", "PATCH"]),
        path=st.one_of(
            st.sampled_from(
                [*ENDPOINTS, "/v1/models", f"/v1/models/{MODEL}", "/v1/models/%00", "/v1/", "/v1/chat/completions/"]
            ),
            st.text(alphabet="abcdefghijklmnopqrstuvwxyz/%.-_0123456789?=&", max_size=30).map(lambda p: "/v1/" + p),
        ),
        auth=st.one_of(
            st.just("valid"),
            st.just("none"),
            st.binary(max_size=80).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")),
            st.builds(
                lambda k: b"Bearer " + k, st.binary(max_size=60).filter(lambda b: b"\r" not in b and b"\n" not in b)
            ),
        ),
        extra=st.lists(st.tuples(HEADER_NAMES, HEADER_VALUES), max_size=4),
        body=st.sampled_from(
            [
                b"",
                json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode(),
                json.dumps({"model": MODEL, "prompt": "hi", "max_tokens": 2, "stream": True}).encode(),
                b"{",
                b"\xff\xfe{}",
            ]
        ),
    )
    def hostile_headers(method: str, path: str, auth: Any, extra: list[tuple[bytes, bytes]], body: bytes) -> None:
        headers = list(extra)
        if auth == "valid":
            headers.append(target.auth())
        elif auth != "none":
            headers.append((b"Authorization", auth))
        target.send(request_bytes(method, path, headers, body), method)

    hostile_headers()


def test_hostile_framing(target: Target) -> None:
    valid = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}).encode()

    @settings(FUZZ, max_examples=100)
    @given(
        body=st.one_of(st.just(valid), st.binary(max_size=200), st.just(b"[" * 5000 + b"]" * 5000)),
        framing=st.sampled_from(["short", "long", "chunked", "bad-chunked", "both", "bad-length", "pipelined"]),
        delta=st.integers(min_value=1, max_value=50),
        chunk_sizes=st.lists(st.integers(min_value=1, max_value=64), min_size=1, max_size=6),
    )
    def hostile_framing(body: bytes, framing: str, delta: int, chunk_sizes: list[int]) -> None:
        headers = [target.auth(), (b"Content-Type", b"application/json")]
        if framing == "short":  # fewer bytes declared than sent: the rest reads as a next request
            raw = request_bytes(
                "POST",
                "/v1/chat/completions",
                [*headers, (b"Content-Length", str(max(0, len(body) - delta)).encode())],
                body,
                content_length=False,
            )
        elif framing == "long":  # more declared than sent: the body never completes (408)
            raw = request_bytes(
                "POST",
                "/v1/chat/completions",
                [*headers, (b"Content-Length", str(len(body) + delta).encode())],
                body,
                content_length=False,
            )
        elif framing in ("chunked", "bad-chunked", "both"):
            pieces, rest = [], body
            for size in chunk_sizes:
                if not rest:
                    break
                piece, rest = rest[:size], rest[size:]
                declared = len(piece) + (delta if framing == "bad-chunked" else 0)
                pieces.append(f"{declared:x}\r\n".encode() + piece + b"\r\n")
            if rest:
                pieces.append(f"{len(rest):x}\r\n".encode() + rest + b"\r\n")
            encoded = b"".join(pieces) + b"0\r\n\r\n"
            framing_headers = [(b"Transfer-Encoding", b"chunked")]
            if framing == "both":  # request smuggling's classic: both framings at once
                framing_headers.append((b"Content-Length", str(delta).encode()))
            raw = request_bytes(
                "POST", "/v1/chat/completions", [*headers, *framing_headers], encoded, content_length=False
            )
        elif framing == "bad-length":
            value = [b"-1", b"1e3", b"0x10", b" 5", b"99999999999999999999999", b"5, 6"][delta % 6]
            raw = request_bytes(
                "POST", "/v1/chat/completions", [*headers, (b"Content-Length", value)], body, content_length=False
            )
        else:  # two requests on one connection
            first = request_bytes("POST", "/v1/chat/completions", headers, body).replace(b"Connection: close\r\n", b"")
            raw = first + request_bytes("POST", "/v1/completions", headers, body)
        target.send(raw)

    hostile_framing()
