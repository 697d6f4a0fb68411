"""A small aiohttp node for what the simulator must not do (answer 5xx to one poison input, fail
everything) or does not model (vLLM's ``continuous_usage_stats``). It checks the node key as
vLLM does (401 ``{"error": "Unauthorized"}``) and answers in vLLM's shapes."""

from __future__ import annotations

import asyncio
import json
import threading
from collections.abc import Awaitable, Callable

from aiohttp import web

from apps.gateway.tests.conftest import NODE_KEY

Handler = Callable[[web.Request, bytes], Awaitable[web.StreamResponse]]


def vllm_error(status: int, message: str) -> web.Response:
    # vLLM's ErrorResponse.
    return web.json_response(
        {"object": "error", "message": message, "type": "InternalServerError", "param": None, "code": status},
        status=status,
    )


def chat_answer(body: dict, *, prompt_tokens: int = 5) -> web.Response:
    n = int(body.get("max_tokens") or 16)
    return web.json_response(
        {
            "id": "chatcmpl-fake",
            "object": "chat.completion",
            "created": 0,
            "model": body["model"],
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "ok " * n},
                    "logprobs": None,
                    "finish_reason": "length",
                    "stop_reason": None,
                }
            ],
            "usage": {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + n, "completion_tokens": n},
        }
    )


async def vllm_stream(request: web.Request, body: dict, *, prompt_tokens: int = 5) -> web.StreamResponse:
    """A chat stream with vLLM 0.11's usage rules: once ``stream_options`` is present,
    ``include_usage`` defaults to true; ``continuous_usage_stats`` (with include_usage) puts usage
    into every chunk; a final ``"choices": []`` chunk carries the total."""
    options = body.get("stream_options")
    include = options is not None and options.get("include_usage", True) is not False
    continuous = include and bool(options.get("continuous_usage_stats"))
    n = int(body.get("max_tokens") or 16)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream; charset=utf-8"})
    await resp.prepare(request)

    def usage(done: int) -> dict:
        return {"prompt_tokens": prompt_tokens, "total_tokens": prompt_tokens + done, "completion_tokens": done}

    def chunk(delta: dict, done: int, finish: str | None = None) -> bytes:
        data = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": body["model"],
            "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}],
        }
        if continuous:
            data["usage"] = usage(done)
        return b"data: " + json.dumps(data, separators=(",", ":")).encode() + b"\n\n"

    await resp.write(chunk({"role": "assistant", "content": ""}, 0))
    for i in range(n):
        await resp.write(chunk({"content": "ok "}, i + 1, "length" if i == n - 1 else None))
    if include:
        final = {
            "id": "chatcmpl-fake",
            "object": "chat.completion.chunk",
            "created": 0,
            "model": body["model"],
            "choices": [],
            "usage": usage(n),
        }
        await resp.write(b"data: " + json.dumps(final, separators=(",", ":")).encode() + b"\n\n")
    await resp.write(b"data: [DONE]\n\n")
    await resp.write_eof()
    return resp


async def answer_like_vllm(request: web.Request, raw: bytes) -> web.StreamResponse:
    body = json.loads(raw)
    return await vllm_stream(request, body) if body.get("stream") else chat_answer(body)


class FakeNode:
    """Serves ``handler`` for every /v1 POST on a free loopback port, in a thread of its own."""

    def __init__(self, handler: Handler = answer_like_vllm, *, key: str = NODE_KEY) -> None:
        self.handler, self.key = handler, key
        self.bodies: list[bytes] = []
        self.loop = asyncio.new_event_loop()
        started = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(started,), daemon=True, name="fake-node")
        self.thread.start()
        assert started.wait(5)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _serve(self, request: web.Request) -> web.StreamResponse:
        if request.headers.get("Authorization") != f"Bearer {self.key}":
            return web.json_response({"error": "Unauthorized"}, status=401)
        raw = await request.read()
        self.bodies.append(raw)
        return await self.handler(request, raw)

    def _run(self, started: threading.Event) -> None:
        asyncio.set_event_loop(self.loop)
        app = web.Application()
        app.router.add_post("/v1/{tail:.*}", self._serve)
        self.runner = web.AppRunner(app, access_log=None)
        self.loop.run_until_complete(self.runner.setup())
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        self.loop.run_until_complete(site.start())
        self.port = site._server.sockets[0].getsockname()[1]
        started.set()
        self.loop.run_forever()

    def close(self) -> None:
        async def shut_down() -> None:
            await self.runner.cleanup()
            self.loop.stop()

        asyncio.run_coroutine_threadsafe(shut_down(), self.loop)
        self.thread.join(5)

    def __enter__(self) -> FakeNode:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
