"""A vLLM OpenAI-server simulator: a development and test instrument, never a production part.

It answers like ``vllm serve`` (same routes, JSON shapes and SSE events; see text.py)
with deterministic text and token counts, configurable timing (time to first token, inter-token
latency), injected faults (500s, streams cut mid-way, the whole process dying), live Prometheus
gauges, and a simulator-only ``GET /sim/stats`` so tests can see what the "node" saw: requests
started/completed/cancelled, tokens generated, the Authorization headers received.

Run it with ``python -m vllm_sim`` or ``manage.py simulate_vllm`` (docs/simulator.md), in-process
with ``simulator_server()``, or from tests as a subprocess with ``vllm_sim.run_simulator_process()``.
"""

from __future__ import annotations

import asyncio
import hmac
import os
import random
import socket
import time
from collections import deque
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from dataclasses import asdict, dataclass

from aiohttp import web

from vllm_sim import text as txt
from vllm_sim.output import Choice
from vllm_sim.pacer import PacedStream, Pacer, StreamKilled
from vllm_sim.requests import (
    Plan,
    Reject,
    ServerOptions,
    bad_request,
    check_model,
    error,
    header,
    json_response,
    plan_generation,
    read_json,
    request_id_for,
)

__all__ = ["SimConfig", "SimServer", "build_app", "serve_forever", "simulator_server", "start_simulator"]

AUTH_SEEN_MAX = 100
# The vLLM release whose behaviour the simulator follows (and answers on /version); the fleet
# installs the same one (settings.VLLM_VERSION), which a test checks.
VLLM_VERSION = "0.11.0"
# Exit status when --die-exits-process kills the simulator mid-stream (distinct from errors).
DIE_EXIT_CODE = 17


@dataclass(frozen=True)
class SimConfig:
    model: str = "sim-model"
    host: str = "127.0.0.1"
    port: int = 0
    ttft_ms: float = 50.0
    itl_ms: float = 20.0
    api_key: str | None = None
    max_tokens_default: int = 64
    max_model_len: int = 4096
    fail_rate: float = 0.0
    die_after_tokens: int | None = None
    die_exits_process: bool = False
    startup_delay_s: float = 0.0
    # After SIGCONT (a paused node resumed: the local launcher's warm restart), /health answers 503
    # this long, as a restarted machine's vLLM is not ready at once.
    warm_start_delay_s: float = 0.0
    max_num_seqs: int = 256
    kv_cache_tokens: int = 65536
    embedding_dim: int = 16
    seed: int | None = None
    # vLLM's --enable-auto-tool-choice --tool-call-parser NAME: without both, "auto" tools are a 400.
    enable_auto_tool_choice: bool = False
    tool_call_parser: str | None = None
    vllm_version: str = VLLM_VERSION
    # Simulator only: a small kernel send buffer per stream, so a test can make a client "slow".
    socket_send_buffer: int | None = None


class SimState:
    def __init__(self, config: SimConfig) -> None:
        self.config = config
        self.created = int(time.time())
        self.rng = random.Random(config.seed)
        self.slots = asyncio.Semaphore(config.max_num_seqs)
        self.pacer = Pacer()
        self.running = 0
        self.waiting = 0
        self.kv_tokens = 0
        self.ttft = config.ttft_ms / 1000.0
        self.itl = config.itl_ms / 1000.0
        # Faults start from the flags and can be changed live through POST /sim/faults.
        self.fail_rate = config.fail_rate
        self.die_after_tokens = config.die_after_tokens
        self.health_status = 200
        self.warming_until = 0.0  # time.monotonic() until which /health answers 503 (warm start)
        self.options = ServerOptions(
            served_model=config.model,
            max_tokens_default=config.max_tokens_default,
            max_model_len=config.max_model_len,
            tool_parser=config.tool_call_parser if config.enable_auto_tool_choice else None,
        )
        self.reset()

    def reset(self) -> None:
        self.counters = {
            "requests_received": 0,
            "requests_started": 0,
            "requests_completed": 0,
            "requests_cancelled": 0,
            "requests_failed_injected": 0,
            "requests_killed": 0,
            "requests_rejected": 0,
            "tokens_generated": 0,
        }
        self.auth_seen: deque[str] = deque(maxlen=AUTH_SEEN_MAX)
        self.requests_without_auth = 0

    def stats(self) -> dict:
        return {
            **self.counters,
            "running": self.running,
            "waiting": self.waiting,
            "authorization_headers": list(self.auth_seen),
            "requests_without_authorization": self.requests_without_auth,
            "config": {k: v for k, v in asdict(self.config).items() if k != "api_key"},
        }

    def kv_usage(self) -> float:
        return min(1.0, self.kv_tokens / self.config.kv_cache_tokens) if self.config.kv_cache_tokens else 0.0

    # --- checks every /v1 request goes through, in vLLM's order -------------------------
    def check_auth(self, request: web.Request) -> None:
        value = header(request, b"authorization")
        if value is None:
            self.requests_without_auth += 1
        else:
            self.auth_seen.append(value)
        key = self.config.api_key
        if key and not hmac.compare_digest((value or "").encode(), f"Bearer {key}".encode()):
            raise Reject(json_response(401, txt.UNAUTHORIZED_BODY))

    def maybe_fail(self) -> None:
        rate = self.fail_rate
        if rate > 0 and (rate >= 1 or self.rng.random() < rate):
            self.counters["requests_failed_injected"] += 1
            raise error(500, "Simulated engine failure (--fail-rate).", "InternalServerError")

    def check_model(self, body: dict) -> None:
        check_model(body, self.config.model)


class _Slot:
    """A place in the engine's batch (--max-num-seqs); the wait shows in num_requests_waiting."""

    def __init__(self, sim: SimState, prompt_tokens: int) -> None:
        self.sim, self.prompt_tokens, self.generated = sim, prompt_tokens, 0

    async def __aenter__(self) -> _Slot:
        sim = self.sim
        sim.waiting += 1
        try:
            await sim.slots.acquire()
        finally:
            sim.waiting -= 1
        sim.running += 1
        sim.kv_tokens += self.prompt_tokens
        sim.counters["requests_started"] += 1
        return self

    def add_tokens(self, n: int) -> None:
        self.generated += n
        self.sim.kv_tokens += n
        self.sim.counters["tokens_generated"] += n

    async def __aexit__(self, *exc: object) -> None:
        sim = self.sim
        sim.running -= 1
        sim.kv_tokens -= self.prompt_tokens + self.generated
        sim.slots.release()


async def _sleep_until(loop: asyncio.AbstractEventLoop, deadline: float) -> None:
    delay = deadline - loop.time()
    if delay > 0:
        await asyncio.sleep(delay)


_KILLED = "sim_killed"


def _cut(sim: SimState, request: web.Request) -> None:
    """Upstream death: close the connection mid-response (or end the whole process)."""
    sim.counters["requests_killed"] += 1
    request[_KILLED] = True  # the cancellation that our own close causes is not a client's
    if sim.config.die_exits_process:
        os._exit(DIE_EXIT_CODE)
    if request.transport is not None:
        request.transport.close()  # flushes what was written, then FIN: no terminating chunk, no [DONE]


def _stream_finish(choice: Choice) -> str:
    # A streamed tool call always ends "tool_calls" (vLLM's tools_streamed); see text._message for
    # the non-streamed reasons.
    return "tool_calls" if choice.tool is not None else choice.finish_reason


class _Steps:
    """A plan's stream as steps: step i carries token i of every choice still generating."""

    def __init__(self, plan: Plan, enc: txt.StreamEncoder) -> None:
        self.plan, self.enc = plan, enc
        self.head = b"".join(enc.role_chunk(c.index) for c in plan.choices) if plan.chat else b""
        self.tail = (enc.usage_chunk(plan.completion_tokens) if plan.include_usage else b"") + txt.DONE
        self.single = len(plan.choices) == 1

    def render(self, start: int, end: int) -> bytes:
        """One event per choice for its tokens [start, end): one token each, or several when the
        client fell behind (vLLM merges the deltas it could not send yet)."""
        enc = self.enc
        if self.single:
            choice = self.plan.choices[0]
            n = len(choice.pieces)
            return enc.chunk(choice, start, end, finish_reason=_stream_finish(choice) if end >= n else None)
        out = []
        for choice in self.plan.choices:
            n = len(choice.pieces)
            stop = min(end, n)
            if start < stop:
                out.append(enc.chunk(choice, start, stop, finish_reason=_stream_finish(choice) if stop == n else None))
        return b"".join(out)

    def tokens_at(self, i: int) -> int:
        return 1 if self.single else sum(1 for c in self.plan.choices if len(c.pieces) > i)


def _encoder(sim: SimState, plan: Plan) -> txt.StreamEncoder:
    return txt.StreamEncoder.create(
        chat=plan.chat,
        request_id=plan.request_id,
        created=int(time.time()),
        model=sim.config.model,
        prompt_tokens=plan.prompt_tokens,
        logprobs=plan.logprobs,
        return_token_ids=plan.return_token_ids,
        prompt_ids=plan.prompt_ids,
        continuous_usage=plan.continuous_usage,
    )


async def _stream(sim: SimState, request: web.Request, plan: Plan, slot: _Slot) -> web.StreamResponse:
    steps = _Steps(plan, _encoder(sim, plan))
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
    await resp.prepare(request)  # sends the headers at once, as vLLM does
    if sim.config.socket_send_buffer and request.transport is not None:
        sock = request.transport.get_extra_info("socket")
        if sock is not None:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sim.config.socket_send_buffer)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + sim.ttft
    die_after = sim.die_after_tokens
    if sim.itl >= 0.001 and request.transport is not None:
        await _paced(sim, request, plan, slot, steps, first_at=deadline)
        await resp.write_eof()
        return resp
    pending = steps.head
    for i in range(plan.n_steps):
        await _sleep_until(loop, deadline)
        if sim.itl == 0 and i % 16 == 15:
            await asyncio.sleep(0)  # flat out: let other streams and the disconnect watcher run
        deadline += sim.itl
        if die_after is not None and i >= die_after:
            if pending:
                await resp.write(pending)
            _cut(sim, request)
            raise _Killed
        chunk = steps.render(i, i + 1)
        await resp.write(pending + chunk if pending else chunk)
        pending = b""
        slot.add_tokens(steps.tokens_at(i))
    await resp.write(steps.tail)
    await resp.write_eof()
    return resp


class _Killed(Exception):  # noqa: N818 - the simulated death, not an error
    pass


async def _paced(
    sim: SimState, request: web.Request, plan: Plan, slot: _Slot, steps: _Steps, *, first_at: float
) -> None:
    """Tokens on their schedule, written by the shared pacer rather than by this coroutine."""
    transport = request.transport
    assert transport is not None  # the caller checked it, with no await in between
    stream = PacedStream(
        pacer=sim.pacer,
        transport=transport,
        render=steps.render,
        n_steps=plan.n_steps,
        first_at=first_at,
        itl=sim.itl,
        head=steps.head,
        tail=steps.tail,
        die_after=sim.die_after_tokens,
        on_step=lambda i: slot.add_tokens(steps.tokens_at(i)),
        on_die=lambda: _cut(sim, request),
    )
    try:
        await stream.done
    except StreamKilled:
        raise _Killed from None
    finally:
        stream.cancel()


async def _complete(sim: SimState, request: web.Request, plan: Plan, slot: _Slot) -> web.Response:
    loop = asyncio.get_running_loop()
    start = loop.time()
    die_after = sim.die_after_tokens
    if die_after is not None and die_after < plan.n_steps:
        await _sleep_until(loop, start + sim.ttft + sim.itl * max(die_after - 1, 0))
        slot.add_tokens(sum(min(len(c.pieces), die_after) for c in plan.choices))
        _cut(sim, request)
        raise _Killed
    await _sleep_until(loop, start + sim.ttft + sim.itl * (plan.n_steps - 1))
    slot.add_tokens(plan.completion_tokens)
    build = txt.chat_response if plan.chat else txt.completion_response
    body = build(
        request_id=plan.request_id,
        created=int(time.time()),
        model=sim.config.model,
        choices=plan.choices,
        prompt_tokens=plan.prompt_tokens,
        logprobs=plan.logprobs,
        return_token_ids=plan.return_token_ids,
        prompt_ids=plan.prompt_ids,
    )
    return json_response(200, body)


def _v1(handler: Callable) -> Callable:
    """vLLM's order for /v1: auth, then (here) injected failure, then the body; errors as JSON."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        sim: SimState = request.app[SIM_KEY]
        sim.counters["requests_received"] += 1
        try:
            sim.check_auth(request)
            if request.method == "POST":
                sim.maybe_fail()
            return await handler(sim, request)
        except Reject as reject:
            if reject.response.status < 500:
                sim.counters["requests_rejected"] += 1
            return reject.response

    return wrapped


def _generation(*, chat: bool) -> Callable:
    async def handler(sim: SimState, request: web.Request) -> web.StreamResponse:
        plan = plan_generation(request, await read_json(request), chat=chat, server=sim.options)
        slot = _Slot(sim, plan.prompt_tokens)
        finished = False
        try:
            async with slot:
                run = _stream if plan.stream else _complete
                response = await run(sim, request, plan, slot)
                finished = True
                sim.counters["requests_completed"] += 1
                return response
        except _Killed:
            finished = True
            raise asyncio.CancelledError from None  # nothing more to send on a closed connection
        except ConnectionResetError:
            return web.Response(status=499)  # never delivered: the client is gone
        finally:
            if not finished and not request.get(_KILLED):
                sim.counters["requests_cancelled"] += 1

    return handler


async def _embeddings(sim: SimState, request: web.Request) -> web.Response:
    body = await read_json(request)
    sim.check_model(body)
    raw = body.get("input")
    if isinstance(raw, str):
        inputs = [raw]
    elif isinstance(raw, list) and raw and all(isinstance(x, str) for x in raw):
        inputs = list(raw)
    elif isinstance(raw, list) and raw and all(isinstance(x, int) and not isinstance(x, bool) for x in raw):
        inputs = [" ".join(map(str, raw))]
    else:
        raise bad_request("`input` must be a string, a list of strings or a list of token ids.")
    encoding = body.get("encoding_format") or "float"
    if encoding not in ("float", "base64"):
        raise bad_request("`encoding_format` must be 'float' or 'base64'.")
    prompt_tokens = sum(txt.completion_prompt_tokens(t) for t in inputs)
    async with _Slot(sim, prompt_tokens):
        await asyncio.sleep(sim.ttft)
    sim.counters["requests_completed"] += 1
    return json_response(
        200,
        txt.embeddings_response(
            request_id=request_id_for(request, "embd-"),
            created=int(time.time()),
            model=sim.config.model,
            inputs=inputs,
            dim=sim.config.embedding_dim,
            base64_encoding=encoding == "base64",
            prompt_tokens=prompt_tokens,
        ),
    )


async def _models(sim: SimState, request: web.Request) -> web.Response:
    return json_response(
        200, txt.models_response(model=sim.config.model, created=sim.created, max_model_len=sim.config.max_model_len)
    )


async def _health(request: web.Request) -> web.Response:
    sim: SimState = request.app[SIM_KEY]
    if sim.warming_until and time.monotonic() < sim.warming_until:
        return web.Response(status=503)
    return web.Response(status=sim.health_status)


async def _metrics(request: web.Request) -> web.Response:
    sim: SimState = request.app[SIM_KEY]
    body = txt.metrics_text(model=sim.config.model, running=sim.running, waiting=sim.waiting, kv_usage=sim.kv_usage())
    return web.Response(body=body, headers={"Content-Type": "text/plain; version=0.0.4; charset=utf-8"})


async def _version(request: web.Request) -> web.Response:
    return json_response(200, txt.dumps_bytes({"version": request.app[SIM_KEY].config.vllm_version}))


async def _stats(request: web.Request) -> web.Response:
    return json_response(200, txt.dumps_bytes(request.app[SIM_KEY].stats()))


async def _faults(request: web.Request) -> web.Response:
    """Change faults live: {"fail_rate": 0..1, "die_after_tokens": N|null, "health_status": 200|503...}."""
    sim: SimState = request.app[SIM_KEY]
    try:
        body = await read_json(request)
        rate = body.get("fail_rate", sim.fail_rate)
        die = body.get("die_after_tokens", sim.die_after_tokens)
        health = body.get("health_status", sim.health_status)
        if isinstance(rate, bool) or not isinstance(rate, int | float) or not 0 <= rate <= 1:
            raise bad_request("`fail_rate` must be a number from 0 to 1.")
        if die is not None and (isinstance(die, bool) or not isinstance(die, int) or die < 0):
            raise bad_request("`die_after_tokens` must be null or an integer >= 0.")
        if isinstance(health, bool) or not isinstance(health, int) or not 200 <= health <= 599:
            raise bad_request("`health_status` must be an HTTP status (200-599).")
    except Reject as reject:
        return reject.response
    sim.fail_rate, sim.die_after_tokens, sim.health_status = float(rate), die, health
    return json_response(
        200, txt.dumps_bytes({"fail_rate": sim.fail_rate, "die_after_tokens": die, "health_status": health})
    )


async def _reset(request: web.Request) -> web.Response:
    request.app[SIM_KEY].reset()
    return json_response(200, b'{"reset":true}')


SIM_KEY = web.AppKey("sim", SimState)


def build_app(config: SimConfig) -> web.Application:
    app = web.Application(client_max_size=64 * 1024 * 1024)
    app[SIM_KEY] = SimState(config)
    app.router.add_get("/health", _health)
    app.router.add_get("/metrics", _metrics)
    app.router.add_get("/version", _version)
    app.router.add_get("/v1/models", _v1(_models))
    app.router.add_post("/v1/chat/completions", _v1(_generation(chat=True)))
    app.router.add_post("/v1/completions", _v1(_generation(chat=False)))
    app.router.add_post("/v1/embeddings", _v1(_embeddings))
    app.router.add_get("/sim/stats", _stats)
    app.router.add_post("/sim/reset", _reset)
    app.router.add_post("/sim/faults", _faults)
    return app


async def start_simulator(config: SimConfig) -> tuple[web.AppRunner, int]:
    """Serve ``config`` on the running loop; returns the runner (``await runner.cleanup()``) and port."""
    # handler_cancellation: a client that disconnects cancels its handler at once, so the
    # simulator stops generating like vLLM aborts the request.
    runner = web.AppRunner(build_app(config), handler_cancellation=True, access_log=None, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, config.host, config.port, backlog=4096)
    await site.start()
    return runner, runner.addresses[0][1]


def url_for(host: str, port: int) -> str:
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


@dataclass
class SimServer:
    url: str
    port: int
    state: SimState

    @property
    def base_url(self) -> str:
        return self.url + "/v1"


@asynccontextmanager
async def simulator_server(**options: object) -> AsyncIterator[SimServer]:
    """The simulator on the current event loop, for in-process tests: ``async with simulator_server(...)``."""
    config = SimConfig(**options)  # type: ignore[arg-type]  # SimConfig's fields; a wrong one is a TypeError
    runner, port = await start_simulator(config)
    try:
        yield SimServer(url=url_for(config.host, port), port=port, state=runner.app[SIM_KEY])
    finally:
        await runner.cleanup()


async def serve_forever(config: SimConfig, announce: Callable[[str], None]) -> None:
    """The management command's main: load (like vLLM, no socket until then), serve until SIGTERM/SIGINT."""
    import signal

    if config.startup_delay_s > 0:
        await asyncio.sleep(config.startup_delay_s)
    runner, port = await start_simulator(config)
    announce(f"simulate_vllm listening on {url_for(config.host, port)}")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    if config.warm_start_delay_s > 0:
        state: SimState = runner.app[SIM_KEY]

        def resumed() -> None:
            state.warming_until = time.monotonic() + config.warm_start_delay_s

        loop.add_signal_handler(signal.SIGCONT, resumed)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()
