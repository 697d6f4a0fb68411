"""Forwarding one admitted request to a node, with failover before the first byte, and relaying
the answer: byte-for-byte SSE events as they arrive, or the JSON body.

Per chunk the work is byte operations: events are split on the blank line, forwarded in one
``send`` per upstream read; only vLLM's final usage chunk is parsed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import orjson
from django.conf import settings

from apps.gateway import upstream
from apps.gateway.errors import GatewayError, error_body
from apps.gateway.metrics import METRICS
from apps.gateway.payloads import CHAT
from apps.gateway.routing import LoadBoard, ModelRoute, NodeRoute

log = logging.getLogger(__name__)

Send = Any  # the ASGI send callable
_DONE = b"data: [DONE]"
_FORWARDED_UPSTREAM_HEADERS = ("content-type",)


@dataclass
class Exchange:
    """What one request did, filled in as it goes so that a cancelled request can be metered too."""

    request_id: str
    endpoint: str
    stream: bool
    started: float = field(default_factory=time.monotonic)
    node_id: int | None = None
    status: int = 0
    ttft_ms: float | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    chunks: int = 0
    response_started: bool = False
    # The whole answer reached the client (its [DONE] or its JSON body): a disconnect after this
    # is the client hanging up on a finished answer, not a request cut short (status stays).
    delivered: bool = False
    estimated_prompt: int = 0
    choices: int = 1  # the request's n: a chat stream opens each choice with a role-only chunk

    @property
    def has_usage(self) -> bool:
        return self.prompt_tokens is not None

    def tokens(self) -> tuple[int, int, bool]:
        """(prompt, completion, estimated)."""
        if self.prompt_tokens is not None:
            return self.prompt_tokens, self.completion_tokens or 0, False
        # No usage from vLLM (disconnect, upstream death): count what was delivered.
        content_chunks = max(0, self.chunks - self.choices) if self.endpoint == CHAT else self.chunks
        return self.estimated_prompt, content_chunks, True


def _upstream_headers(node: NodeRoute, request_id: str) -> dict[str, str]:
    # Only what vLLM needs: never the customer's Authorization or any of their other headers.
    return {"Authorization": f"Bearer {node.api_key}", "Content-Type": "application/json", "X-Request-Id": request_id}


NodeFault = Callable[[NodeRoute, str], None]


async def open_upstream(
    *,
    session: Any,
    board: LoadBoard,
    route: ModelRoute,
    path: str,
    body: bytes,
    ex: Exchange,
    on_node_fault: NodeFault | None = None,
) -> tuple[NodeRoute, upstream.ClientResponse]:
    """Connect to the least-loaded node; on a failure before the first byte, try another
    (GATEWAY_MAX_RETRIES times). The caller must release the node on the board.

    What a failure says decides what happens to the node:
    - refused connection or timeout: the node is down; it is cooled down (GATEWAY_NODE_COOLDOWN_S).
    - a connection that merely broke (reset, closed by the peer) says little: under bursts a
      kept-alive connection can be reset while the node is fine. The node gets one more try, on a
      fresh connection, once the other nodes are used up, and is cooled down only if that fails.
    - 401/403: the node refused *our* node key (rotated or wrong): a node fault, never the
      customer's. The node is cooled down, ``on_node_fault`` marks it unhealthy, and the request
      goes elsewhere; the customer never sees the node's auth error.
    - 5xx: may be the node or the request (one poison input makes any node 500). The request is
      tried on one other node. If that one fails too, the request is at fault: it is answered
      with the error and nothing is cooled down, and it is not tried on further nodes. If it
      succeeds, the first node earns a strike; GATEWAY_NODE_FAILURES_TO_COOL_DOWN strikes (each
      from a different request that worked elsewhere) within GATEWAY_NODE_FAILURE_WINDOW_S cool it
      down. A model's only node is never cooled down for a 5xx: that would turn one bad request
      into 503s for everyone, and a dead engine fails its health check anyway.
    """
    tried: set[int] = set()
    second_chances: list[NodeRoute] = []
    failovers = 0
    failed_answer: tuple[NodeRoute, int] | None = None  # the first node that answered 5xx, and how
    last = "no ready node serves this model"
    while True:
        node = board.pick(route.nodes, tried) if failovers <= settings.GATEWAY_MAX_RETRIES else None
        if node is None:
            if not second_chances:
                break
            node = second_chances.pop(0)
        first_try = node.node_id not in tried
        tried.add(node.node_id)
        board.acquire(node.node_id)
        try:
            resp = await upstream.post(
                session, node.base_url + path, body=body, headers=_upstream_headers(node, ex.request_id)
            )
        except (upstream.ClientError, TimeoutError) as exc:
            board.release(node.node_id)
            METRICS.upstream_error(node_id=node.node_id, kind="unreachable")
            last = f"node {node.node_id} unreachable: {type(exc).__name__}: {exc}"
            if first_try and upstream.is_broken_connection(exc):
                second_chances.append(node)
                log.warning("request %s: %s; will retry it on a fresh connection", ex.request_id, last)
            else:
                board.cool_down(node.node_id, settings.GATEWAY_NODE_COOLDOWN_S)
                log.warning("request %s: %s; cooling it down, failing over", ex.request_id, last)
            failovers += 1
            continue
        status = resp.status
        if status in (401, 403):
            resp.close()
            board.release(node.node_id)
            board.cool_down(node.node_id, settings.GATEWAY_NODE_COOLDOWN_S)
            METRICS.upstream_error(node_id=node.node_id, kind="auth")
            last = f"node {node.node_id} refused the gateway's node key (HTTP {status})"
            log.error("request %s: %s; failing over", ex.request_id, last)
            if on_node_fault is not None:
                on_node_fault(node, f"the node refused the gateway's node key (HTTP {status} on {path})")
            failovers += 1
            continue
        if status >= 500:
            resp.close()
            board.release(node.node_id)
            METRICS.upstream_error(node_id=node.node_id, kind="5xx")
            if failed_answer is not None:
                log.warning(
                    "request %s: node %s answered %s as node %s did: the request fails, no node is cooled down",
                    ex.request_id,
                    node.node_id,
                    status,
                    failed_answer[0].node_id,
                )
                raise _request_failed(status, nodes=2)
            failed_answer = (node, status)
            last = f"node {node.node_id} answered {status}"
            log.warning("request %s: %s; trying one other node", ex.request_id, last)
            failovers += 1
            continue
        if failed_answer is not None and board.strike(
            failed_answer[0].node_id,
            threshold=settings.GATEWAY_NODE_FAILURES_TO_COOL_DOWN,
            window_s=settings.GATEWAY_NODE_FAILURE_WINDOW_S,
            cooldown_s=settings.GATEWAY_NODE_COOLDOWN_S,
        ):
            log.warning(
                "node %s: %d requests that worked elsewhere failed on it within %gs; cooling it down",
                failed_answer[0].node_id,
                settings.GATEWAY_NODE_FAILURES_TO_COOL_DOWN,
                settings.GATEWAY_NODE_FAILURE_WINDOW_S,
            )
        ex.node_id = node.node_id
        return node, resp
    if failed_answer is not None:
        # No second node to tell the request's fault from the node's: answer the error, cool nothing.
        raise _request_failed(failed_answer[1], nodes=1)
    if not tried:
        raise GatewayError(
            503,
            f"No ready node serves '{route.name}' right now; retry shortly.",
            type="server_error",
            code="no_capacity",
            headers={"retry-after": "5"},
        )
    log.warning("request %s: giving up on '%s', last error: %s", ex.request_id, route.name, last)
    raise GatewayError(
        503,
        "The model's nodes are unavailable right now; retry shortly.",
        type="server_error",
        code="upstream_unavailable",
        headers={"retry-after": "2"},
    )


def _request_failed(status: int, *, nodes: int) -> GatewayError:
    # 502, whatever the engine said: the gateway never answers a 500 of its own making, and a 500
    # passed through would read as a CrossLogic fault to the client and to anyone counting 5xx.
    where = "two model servers" if nodes > 1 else "the model server"
    return GatewayError(
        502,
        f"The request failed on {where} (HTTP {status}); it was not retried further.",
        type="server_error",
        code="upstream_error",
    )


def _response_headers(resp: upstream.ClientResponse, extra: list[tuple[bytes, bytes]]) -> list[tuple[bytes, bytes]]:
    headers = list(extra)
    for name in _FORWARDED_UPSTREAM_HEADERS:
        value = resp.headers.get(name)
        if value:
            headers.append((name.encode(), value.encode("latin-1")))
    return headers


async def relay_json(
    *, resp: upstream.ClientResponse, send: Send, ex: Exchange, headers: list[tuple[bytes, bytes]]
) -> None:
    body = await resp.read()
    ex.status = resp.status
    if 400 <= resp.status < 500:
        # The node rejected the request (bad parameters, too long a prompt): nothing was used.
        ex.prompt_tokens = ex.completion_tokens = 0
    elif resp.status == 200:
        try:
            usage = orjson.loads(body).get("usage") or {}
            ex.prompt_tokens = int(usage.get("prompt_tokens") or 0)
            ex.completion_tokens = int(usage.get("completion_tokens") or 0)
        except (ValueError, AttributeError, TypeError):
            log.warning("request %s: upstream JSON without readable usage", ex.request_id)
    ex.ttft_ms = (time.monotonic() - ex.started) * 1000
    ex.response_started = True
    await send({"type": "http.response.start", "status": resp.status, "headers": _response_headers(resp, headers)})
    await send({"type": "http.response.body", "body": body})
    ex.delivered = True


def _read_usage(event: bytes, ex: Exchange) -> None:
    try:
        usage = orjson.loads(event[5:])["usage"]
        ex.prompt_tokens = int(usage.get("prompt_tokens") or 0)
        ex.completion_tokens = int(usage.get("completion_tokens") or 0)
    except (ValueError, KeyError, TypeError, AttributeError):
        log.warning("request %s: unreadable usage chunk", ex.request_id)


def _is_usage_chunk(event: bytes) -> bool:
    return b'"usage"' in event and (b'"choices":[]' in event or b'"choices": []' in event)


async def relay_stream(
    *,
    resp: upstream.ClientResponse,
    send: Send,
    ex: Exchange,
    client_wants_usage: bool,
    headers: list[tuple[bytes, bytes]],
) -> None:
    ex.status = 200
    ex.response_started = True
    start_headers = [*_response_headers(resp, headers), (b"cache-control", b"no-cache"), (b"x-accel-buffering", b"no")]
    await send({"type": "http.response.start", "status": 200, "headers": start_headers})
    pending = b""
    saw_done = False
    failure: str | None = None
    try:
        async for piece in resp.content.iter_any():
            pending += piece
            if b"\n\n" not in pending:
                continue
            *events, pending = pending.split(b"\n\n")
            out: list[bytes] = []
            for event in events:
                if not event:
                    continue
                if event.startswith(_DONE):
                    saw_done = True
                elif _is_usage_chunk(event):
                    _read_usage(event, ex)
                    if not client_wants_usage:
                        continue
                else:
                    ex.chunks += 1
                out.append(event)
                out.append(b"\n\n")
            if out:
                if ex.ttft_ms is None:
                    ex.ttft_ms = (time.monotonic() - ex.started) * 1000
                await send({"type": "http.response.body", "body": b"".join(out), "more_body": True})
                ex.delivered = saw_done
        if not saw_done:
            failure = "The model server closed the stream before it finished."
    except (upstream.ClientError, TimeoutError) as exc:
        failure = f"The model server failed mid-stream ({type(exc).__name__})."
    if failure is not None:
        ex.status = 502
        log.warning("request %s: %s", ex.request_id, failure)
        event = b"data: " + error_body(failure, type="server_error", code="upstream_error") + b"\n\n"
        await send({"type": "http.response.body", "body": event, "more_body": True})
    await send({"type": "http.response.body", "body": b""})


async def watch_disconnect(receive: Any) -> None:
    """Return when the client goes away (uvicorn's send() stays silent about it)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


async def run_until_disconnect(work: Any, receive: Any) -> bool:
    """Run ``work`` (a coroutine) and cancel it if the client disconnects. True if it was cut.

    The work runs in the caller's task and only the watcher gets a task of its own: a second task
    per request and ``asyncio.wait``'s callbacks were a measurable share of a non-streamed
    request's CPU (docs/benchmarks.md).
    """
    current = asyncio.current_task()
    assert current is not None
    state = {"finished": False, "cut": False}

    async def watch() -> None:
        await watch_disconnect(receive)
        if not state["finished"]:
            state["cut"] = True
            current.cancel()

    watcher = asyncio.ensure_future(watch())
    try:
        await work
    except asyncio.CancelledError:
        if not state["cut"] or current.uncancel() > 0:
            raise  # cancelled from outside (shutdown), not by the client leaving
        return True
    except Exception:
        if not state["cut"]:
            raise
        log.debug("work raised after disconnect", exc_info=True)
        return True
    finally:
        state["finished"] = True
        watcher.cancel()
    if state["cut"]:  # the work swallowed our cancellation: it was cut all the same
        current.uncancel()
    return state["cut"]
