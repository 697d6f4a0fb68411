"""The gateway: a raw ASGI app that serves /v1/*, /health and /ready itself and hands every
other path to Django.

Why raw ASGI and not a Django async view: on the view path every request runs Django's
connection signal handlers and response.close through sync_to_async on a thread, which measured
~55% of the CPU at 256 streams here; a raw callable does none of that (see docs/gateway.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import time
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import InterfaceError, OperationalError

from apps.core import redis as redis_lib
from apps.gateway import background, metrics, payloads, relay, spend, upstream, usage_api
from apps.gateway.asgi_io import (
    ClientGoneError,
    header,
    new_request_id,
    read_body,
    send_error,
    send_json,
)
from apps.gateway.auth import KeyCache, KeyEntry
from apps.gateway.coldstart import ColdStart
from apps.gateway.errors import GatewayError
from apps.gateway.limits import Budget, Limit, RateLimiter
from apps.gateway.metrics import METRICS
from apps.gateway.routing import (
    LoadBoard,
    ModelRoute,
    NodeRoute,
    RoutingTable,
    aload_table,
    anode_mark_unhealthy,
)
from apps.gateway.usage import UsageRecorder

log = logging.getLogger(__name__)

ROUTES = {
    "/v1/chat/completions": payloads.CHAT,
    "/v1/completions": payloads.COMPLETIONS,
    "/v1/embeddings": payloads.EMBEDDINGS,
}


class Gateway:
    def __init__(self, django_app: Any) -> None:
        self.django_app = django_app
        self.keys = KeyCache()
        self.board = LoadBoard()
        self.table = RoutingTable()
        self.usage = UsageRecorder()
        self.cold = ColdStart(lambda: self.table, self.board.worker_id)
        self.session: Any = None
        self.redis: Any = None
        self.hot_redis: redis_lib.Multiplexed | None = None
        self.limiter = RateLimiter(None, fail_open=settings.GATEWAY_RATE_LIMIT_FAIL_OPEN)
        self.metrics = METRICS
        self.metrics.tenant_label = settings.METRICS_TENANT_LABEL
        self._tasks: list[asyncio.Task] = []
        self._started = False
        self._start_lock: asyncio.Lock | None = None
        self._routing_dirty: asyncio.Event | None = None
        self._faulted: dict[int, asyncio.Task] = {}  # node id -> the task marking it unhealthy

    # --- lifecycle -------------------------------------------------------------------------
    async def startup(self) -> None:
        if self._started:
            return
        if self._start_lock is None:
            self._start_lock = asyncio.Lock()
        async with self._start_lock:
            if self._started:
                return
            self.session = upstream.new_session()
            # driver_info=None: no CLIENT SETINFO per new connection; building it reads package
            # metadata (~3 ms of blocked loop per connection, measured), which a burst of new
            # requests paid all at once.
            self.redis = redis_lib.async_client(
                max_connections=settings.GATEWAY_REDIS_MAX_CONNECTIONS, driver_info=None
            )
            # Limits get their own shared, pipelined connection: up to two script calls per request
            # (fewer with leases), and a pool checkout per call cost as much as the call itself
            # (docs/gateway.md).
            self.hot_redis = redis_lib.multiplexed()
            self.limiter = RateLimiter(
                self.hot_redis,
                fail_open=settings.GATEWAY_RATE_LIMIT_FAIL_OPEN,
                seeder=self._seed_budget,
                lease_s=settings.GATEWAY_RATE_LIMIT_LEASE_S,
            )
            self._routing_dirty = asyncio.Event()
            self.cold.start(self.redis)
            try:
                self.table = await aload_table()
            except Exception:
                log.exception("gateway: could not load the routing table at start")
            self._tasks = [
                asyncio.ensure_future(c)
                for c in (
                    background.refresh_routing(self, self._routing_dirty),
                    self.usage.run(),
                    background.listen_invalidations(self, self._routing_dirty),
                    background.sync_load(self),
                    metrics.publish_forever(self.redis, self.metrics),
                    self.cold.run(),
                )
            ]
            self._started = True
            # What exists now (Django, the apps, the routing table: ~155k objects) lives as long as
            # the worker. Frozen, the collector no longer walks it: a full collection while serving
            # took ~80 ms of blocked loop and CPU here before, a few ms after (docs/benchmarks.md).
            gc.collect()
            gc.freeze()

    async def shutdown(self) -> None:
        tasks = [*self._tasks, *self._faulted.values()]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await self.limiter.drain()
        await self.cold.close()
        try:
            await self.usage.flush()
        except Exception:
            log.exception("gateway: %d usage records could not be written at shutdown", len(self.usage.buffer))
        if self.session is not None:
            await self.session.close()
        if self.redis is not None:
            with contextlib.suppress(Exception):
                await metrics.unpublish(self.redis, self.metrics)
            await self.redis.aclose()
        if self.hot_redis is not None:
            await self.hot_redis.aclose()
        self._started = False
        gc.unfreeze()  # a process that goes on (tests) collects what startup froze again

    async def _seed_budget(self, budget: Budget) -> int:
        """A month's usage so far for a budget counter Redis lacks: the database, plus this
        worker's usage records still waiting to be written."""
        used = await sync_to_async(spend.month_usage, thread_sensitive=False)(budget.owner, budget.month, budget.unit)
        return used + self.usage.pending(owner=budget.owner, month=budget.month, unit=budget.unit)

    # --- ASGI ------------------------------------------------------------------------------
    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind == "lifespan":
            await self._lifespan(receive, send)
            return
        path = scope.get("path", "")
        if kind != "http" or not (path.startswith("/v1/") or path in ("/health", "/ready", "/metrics")):
            await self.django_app(scope, receive, send)
            return
        if not self._started:
            await self.startup()
        request_id = new_request_id()
        base_headers = [(b"x-request-id", request_id.encode())]
        try:
            if path == "/health":
                await send_json(send, 200, b'{"status":"ok"}', base_headers)
            elif path == "/ready":
                await self._ready(send, base_headers)
            elif path == "/metrics":
                await self._metrics(scope, send, base_headers)
            elif path == "/v1/models":
                self._require_method(scope, "GET")
                entry = await self.keys.authenticate(header(scope, b"authorization"))
                await send_json(send, 200, self._models_body(entry), base_headers)
            elif path.startswith("/v1/models/"):
                self._require_method(scope, "GET")
                entry = await self.keys.authenticate(header(scope, b"authorization"))
                await send_json(send, 200, self._model_body(entry, path[len("/v1/models/") :]), base_headers)
            elif path == "/v1/usage":
                self._require_method(scope, "GET")
                entry = await self.keys.authenticate(header(scope, b"authorization"))
                await send_json(send, 200, await usage_api.usage_body(scope, entry), base_headers)
            elif path in ROUTES:
                self._require_method(scope, "POST")
                await self._inference(scope, receive, send, ROUTES[path], request_id, base_headers)
            else:
                raise GatewayError(404, f"Unknown path {path}.", code="unknown_url")
        except GatewayError as err:
            extra = [(k.encode(), v.encode()) for k, v in err.headers.items()]
            await send_json(send, err.status, err.body(), base_headers + extra)
        except ClientGoneError:
            # Raising out of the app (CancelledError, as before) made uvicorn log a traceback at ERROR.
            log.info("request %s: the client disconnected before its request body was complete", request_id)
        except (OperationalError, InterfaceError) as exc:
            # PostgreSQL away while a key (or model list) was not cached yet: say so, OpenAI-shaped.
            log.warning("request %s: database unavailable: %s: %s", request_id, type(exc).__name__, exc)
            unavailable = GatewayError(
                503,
                "The service is temporarily unavailable; retry shortly.",
                type="server_error",
                code="service_unavailable",
                headers={"retry-after": "2"},
            )
            await send_error(send, unavailable, base_headers)
        except Exception:
            log.exception("request %s: unexpected error", request_id)
            await send_error(
                send,
                GatewayError(
                    500, "The server had an error processing your request.", type="server_error", code="internal_error"
                ),
                base_headers,
            )

    async def _lifespan(self, receive: Any, send: Any) -> None:
        while True:
            message = await receive()
            if message["type"] == "lifespan.startup":
                try:
                    await self.startup()
                except Exception as exc:
                    await send({"type": "lifespan.startup.failed", "message": str(exc)})
                    return
                await send({"type": "lifespan.startup.complete"})
            elif message["type"] == "lifespan.shutdown":
                await self.shutdown()
                await send({"type": "lifespan.shutdown.complete"})
                return

    @staticmethod
    def _require_method(scope: dict, method: str) -> None:
        if scope["method"] != method:
            raise GatewayError(
                405,
                f"Method {scope['method']} is not allowed here; use {method}.",
                code="method_not_allowed",
                headers={"allow": method},
            )

    async def _ready(self, send: Any, headers: list[tuple[bytes, bytes]]) -> None:
        checks: dict[str, str] = {}
        try:
            await sync_to_async(_ping_database, thread_sensitive=False)()
            checks["database"] = "ok"
        except Exception as exc:
            checks["database"] = f"unreachable: {type(exc).__name__}"
        if self.redis is None:
            checks["redis"] = "not configured"
        else:
            try:
                await asyncio.wait_for(self.redis.ping(), timeout=1.0)
                checks["redis"] = "ok"
            except Exception as exc:
                checks["redis"] = f"unreachable: {type(exc).__name__}"
        ok = checks["database"] == "ok" and checks["redis"] in ("ok", "not configured")
        body = json.dumps({"status": "ready" if ok else "not ready", "checks": checks}).encode()
        await send_json(send, 200 if ok else 503, body, headers)

    async def _metrics(self, scope: dict, send: Any, headers: list[tuple[bytes, bytes]]) -> None:
        """Prometheus text format, for a staff token only (docs/monitoring.md)."""
        self._require_method(scope, "GET")
        body = await metrics.scrape(
            authorization=header(scope, b"authorization"), redis=self.redis, counters=self.metrics
        )
        start = {"type": "http.response.start", "status": 200, "headers": [metrics.CONTENT_TYPE, *headers]}
        await send(start)
        await send({"type": "http.response.body", "body": body})

    def _models_body(self, entry: KeyEntry) -> bytes:
        data = [_model_object(route) for name, route in sorted(self.table.models.items()) if entry.allows_model(name)]
        return json.dumps({"object": "list", "data": data}).encode()

    def _model_body(self, entry: KeyEntry, name: str) -> bytes:
        """GET /v1/models/{id} (the SDK's models.retrieve); ids may contain slashes."""
        route = self.table.models.get(name)
        if route is None or not entry.allows_model(name):
            raise GatewayError(
                404,
                f"The model '{name}' does not exist or you do not have access to it.",
                param="model",
                code="model_not_found",
            )
        return json.dumps(_model_object(route)).encode()

    def _node_fault(self, node: NodeRoute, reason: str) -> None:
        """Take a node that refused our node key out of rotation, once, off the request path."""
        if node.node_id in self._faulted:
            return
        task = asyncio.ensure_future(self._mark_unhealthy(node.node_id, reason))
        self._faulted[node.node_id] = task

    async def _mark_unhealthy(self, node_id: int, reason: str) -> None:
        try:
            if await anode_mark_unhealthy(node_id=node_id, reason=reason):
                log.error("gateway: node %s marked unhealthy: %s", node_id, reason)
        except Exception as exc:
            # The node stays cooled down here; the next refusal after the cooldown tries again.
            log.warning("gateway: could not mark node %s unhealthy (%s)", node_id, exc)
        finally:
            self._faulted.pop(node_id, None)

    # --- inference -------------------------------------------------------------------------
    async def _inference(
        self,
        scope: dict,
        receive: Any,
        send: Any,
        endpoint: str,
        request_id: str,
        base_headers: list[tuple[bytes, bytes]],
    ) -> None:
        entry = await self.keys.authenticate(header(scope, b"authorization"))
        if "inference" not in entry.scopes:
            raise GatewayError(
                403, "This API key lacks the 'inference' scope.", type="permission_error", code="insufficient_scope"
            )
        body = await read_body(scope, receive)
        payload = payloads.parse(body, endpoint)
        name = payload["model"]
        route = self.table.models.get(name)
        if route is None:
            raise GatewayError(
                404,
                f"The model '{name}' does not exist or you do not have access to it.",
                param="model",
                code="model_not_found",
            )
        if not entry.allows_model(name):
            raise GatewayError(
                403,
                f"This API key may not use the model '{name}'.",
                type="permission_error",
                param="model",
                code="model_not_allowed",
            )
        reserve = payloads.reserve_tokens(payload, len(body))
        budgets, reserve_micros = (
            spend.request_budgets(entry, route, payload, reserve, len(body)) if entry.has_budgets else ((), 0)
        )
        limits = [entry.key_limit, entry.tenant_limit]
        per_node = settings.GATEWAY_TENANT_INFLIGHT_PER_NODE
        if per_node:
            # Fairness: one tenant's flood may not take all of a model's capacity from the others.
            limits.append(
                Limit(
                    subject=f"tenant:{entry.tenant_id}:model:{route.model_id}",
                    requests_per_minute=None,
                    tokens_per_minute=None,
                    max_concurrent=per_node * max(1, len(route.nodes)),
                )
            )
        admission = await self.limiter.admit(
            limits=limits,
            reserve_tokens=reserve,
            request_id=request_id,
            budgets=budgets,
            reserve_micros=reserve_micros,
        )
        limit_headers = [(k.encode(), v.encode()) for k, v in admission.headers.items()]
        if not admission.allowed:
            retry = str(max(1, int(-(-(admission.retry_after_s or 1) // 1))))
            if admission.reason == "budget":
                kind, message = spend.refusal(admission.budget)
                self.metrics.refused(model=name, status=429, tenant_id=entry.tenant_id, reason="budget", budget=kind)
                raise GatewayError(429, message, type="insufficient_quota", code="insufficient_quota")
            self.metrics.refused(
                model=name,
                status=503 if admission.reason == "unavailable" else 429,
                tenant_id=entry.tenant_id,
                reason=admission.reason or "unknown",
            )
            if admission.reason == "unavailable":
                raise GatewayError(
                    503,
                    "Rate limiting is unavailable; retry shortly.",
                    type="server_error",
                    code="rate_limiter_unavailable",
                    headers={"retry-after": retry},
                )
            if admission.reason == "concurrency":
                raise GatewayError(
                    429,
                    "Too many requests in flight: your key's or your account's concurrency limit, "
                    f"or your account's share of '{name}' ({limits[-1].max_concurrent} at once), "
                    f"is reached; retry after {retry}s.",
                    type="rate_limit_error",
                    code="rate_limit_concurrency",
                    headers={"retry-after": retry, **admission.headers},
                )
            raise GatewayError(
                429,
                f"Rate limit reached for {admission.reason}; retry after {retry}s.",
                type="rate_limit_error",
                code=f"rate_limit_{admission.reason}",
                headers={"retry-after": retry, **admission.headers},
            )
        ex = relay.Exchange(
            request_id=request_id,
            endpoint=endpoint,
            stream=bool(payload.get("stream")),
            estimated_prompt=len(body) // 4,
            choices=int(payload.get("n") or 1),
        )
        client_wants_usage = False
        if ex.stream:
            client_wants_usage = payloads.wants_usage_chunk(payload)
            if not client_wants_usage:
                # Metering needs the stream's usage: we ask vLLM for it, and strip it on the way back.
                body = payloads.with_usage_option(body, payload)
        failed = False
        try:
            cut = await relay.run_until_disconnect(
                self._forward(
                    route=route,
                    path=scope["path"],
                    body=body,
                    ex=ex,
                    send=send,
                    client_wants_usage=client_wants_usage,
                    headers=base_headers + limit_headers,
                ),
                receive,
            )
            if cut and not ex.delivered:
                ex.status = 499  # client closed the request (nginx's convention)
        except GatewayError as err:
            ex.status = err.status
            failed = True
            raise
        finally:
            billed = spend.billed(ex, route)
            if failed:  # metered before the settle, as the error leaves this function with it
                self._meter(ex, entry, route, billed)
            await self.limiter.settle(admission, used_tokens=billed[0] + billed[1], used_micros=billed[3])
        self._meter(ex, entry, route, billed)

    async def _forward(
        self,
        *,
        route: Any,
        path: str,
        body: bytes,
        ex: relay.Exchange,
        send: Any,
        client_wants_usage: bool,
        headers: list[tuple[bytes, bytes]],
    ) -> None:
        if not route.nodes:
            # A model scaled to zero: wait here for its first node (cancelled if the client leaves).
            waited = time.monotonic()
            route = await self.cold.wait_ready(route)
            held_ms = int((time.monotonic() - waited) * 1000)
            headers = [*headers, (b"x-cold-start-wait-ms", str(held_ms).encode())]
        node, resp = await relay.open_upstream(
            session=self.session,
            board=self.board,
            route=route,
            path=path,
            body=body,
            ex=ex,
            on_node_fault=self._node_fault,
        )
        try:
            is_sse = resp.status == 200 and resp.headers.get("content-type", "").startswith("text/event-stream")
            if is_sse:
                await relay.relay_stream(
                    resp=resp, send=send, ex=ex, client_wants_usage=client_wants_usage, headers=headers
                )
            else:
                await relay.relay_json(resp=resp, send=send, ex=ex, headers=headers)
            resp.release()
        finally:
            # Closing an unfinished response drops the connection, which makes vLLM abort the generation.
            if not resp.closed:
                resp.close()
            self.board.release(node.node_id)

    def _meter(self, ex: relay.Exchange, entry: KeyEntry, route: Any, billed: tuple[int, int, bool, int]) -> None:
        prompt, completion, estimated, cost = billed
        latency_ms = (time.monotonic() - ex.started) * 1000
        self.metrics.request_done(
            model=route.name,
            status=ex.status,
            tenant_id=entry.tenant_id,
            prompt_tokens=prompt,
            completion_tokens=completion,
            ttft_ms=ex.ttft_ms,
            latency_ms=latency_ms,
        )
        self.usage.record(
            {
                "request_id": ex.request_id,
                "tenant_id": entry.tenant_id,
                "api_key_id": entry.key_id,
                "model_id": route.model_id,
                "model_name": route.name,
                "node_id": ex.node_id,
                "endpoint": ex.endpoint,
                "prompt_tokens": prompt,
                "completion_tokens": completion,
                "estimated": estimated,
                "streamed": ex.stream,
                "status_code": ex.status,
                "ttft_ms": ex.ttft_ms,
                "latency_ms": latency_ms,
                "cost_micros": cost,
            }
        )


def _model_object(route: ModelRoute) -> dict[str, Any]:
    return {
        "id": route.name,
        "object": "model",
        "created": route.created,
        "owned_by": "crosslogic",
        "max_model_len": route.max_model_len,
        "ready": bool(route.nodes),
    }


def _ping_database() -> None:
    from django.db import connection

    try:
        with connection.cursor() as cursor:
            cursor.execute("SELECT 1")
    finally:
        connection.close()
