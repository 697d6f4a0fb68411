"""Scale from zero without errors: hold a request while its model's first node starts.

A request for a model with no ready node, but with a node on its way up (pending, provisioning,
loading) or a policy that lets one start (min_replicas 0, max_replicas > 0), is held here instead
of answered 503:

- at most GATEWAY_COLD_QUEUE_MAX requests per model per gateway worker are held; beyond that,
  503 ``cold_start_queue_full`` with ``Retry-After`` = the measured cold start left;
- a held request waits at most GATEWAY_COLD_WAIT_S; then 503 ``cold_start_timeout``, same header;
- holding triggers the scale-up at once (``enqueue_autoscale``, deduplicated by the fleet and
  throttled here), and the held counts are published to Redis (``report_held``) for the
  autoscaler;
- held requests wake when the routing table changes (a node turning ready bumps the ``routing``
  invalidation, which reloads the table): no timer per request;
- the caller runs the hold inside ``relay.run_until_disconnect``: a client that leaves cancels
  the wait, and the ``finally`` below frees its place in the queue.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections, connection

from apps.gateway.errors import GatewayError
from apps.gateway.routing import ModelRoute, RoutingTable

log = logging.getLogger(__name__)

# Re-trigger the scale-up for a model at most this often per worker while requests are held
# (the fleet deduplicates too; this keeps a burst of held requests from queueing a task each).
TRIGGER_EVERY_S = 5.0
# Held counts are re-published this often while any request is held (and at once on change).
REPORT_EVERY_S = 1.0


def holdable(route: ModelRoute) -> bool:
    return not route.nodes and (route.starting > 0 or route.may_start)


def retry_after_s(route: ModelRoute, now: float | None = None) -> int:
    """Seconds until a node should be ready: when the first starting node is due (its start + the
    measured cold or warm start), else a whole cold start; a node already late gets a tenth of
    the cold start."""
    left = route.cold_start_s
    if route.ready_eta is not None:
        left = route.ready_eta - (now if now is not None else time.time())
        if left <= 0:
            left = route.cold_start_s / 10
    return max(1, math.ceil(left))


def _unavailable(route: ModelRoute, message: str, code: str) -> GatewayError:
    return GatewayError(
        503, message, type="server_error", code=code, headers={"retry-after": str(retry_after_s(route))}
    )


def _trigger_scale_up(model_id: int) -> None:
    from apps.fleet.triggers import enqueue_autoscale

    close_old_connections()
    try:
        enqueue_autoscale(model_id=model_id)
    finally:
        connection.close()


class ColdStart:
    """The held requests of one gateway worker."""

    def __init__(self, table: Callable[[], RoutingTable], worker_id: str) -> None:
        self._table = table
        self.worker_id = worker_id
        self.redis: Any = None
        self.held: dict[int, int] = defaultdict(int)  # model id -> requests held now
        self._changed = asyncio.Event()
        self._report_wake = asyncio.Event()
        self._dirty: set[int] = set()
        self._triggered_at: dict[int, float] = {}
        self._background: set[asyncio.Task] = set()
        self._trigger = sync_to_async(_trigger_scale_up, thread_sensitive=False)

    def start(self, redis: Any) -> None:
        """Bind to the running event loop (the gateway's startup)."""
        self.redis = redis
        self._changed = asyncio.Event()
        self._report_wake = asyncio.Event()

    def table_changed(self) -> None:
        """The routing table was reloaded: every held request looks at it again."""
        changed, self._changed = self._changed, asyncio.Event()
        changed.set()

    async def wait_ready(self, route: ModelRoute) -> ModelRoute:
        """The model's route once it has a ready node: at once if it has one (or cannot get one:
        the caller's routing answers 503 then), else after holding the request."""
        if not holdable(route):
            return route
        model_id = route.model_id
        if self.held[model_id] >= settings.GATEWAY_COLD_QUEUE_MAX:
            raise _unavailable(
                route,
                f"'{route.name}' is starting and {settings.GATEWAY_COLD_QUEUE_MAX} requests already "
                "wait for it; retry after the time in Retry-After.",
                "cold_start_queue_full",
            )
        self._set_held(model_id, +1)
        self._scale_up(model_id)
        deadline = time.monotonic() + settings.GATEWAY_COLD_WAIT_S
        try:
            while True:
                current = self._table().models.get(route.name)
                if current is None:
                    raise GatewayError(
                        503,
                        f"'{route.name}' stopped being served while the request waited.",
                        type="server_error",
                        code="no_capacity",
                        headers={"retry-after": "5"},
                    )
                if current.nodes:
                    return current
                if not holdable(current):
                    # The node that was starting failed and the policy starts none by itself.
                    raise _unavailable(current, f"No node of '{route.name}' could be started.", "no_capacity")
                if current.starting == 0:
                    self._scale_up(model_id)
                left = deadline - time.monotonic()
                if left <= 0:
                    raise _unavailable(
                        current,
                        f"'{route.name}' is starting; no node was ready within "
                        f"{settings.GATEWAY_COLD_WAIT_S:g}s. Retry after the time in Retry-After.",
                        "cold_start_timeout",
                    )
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._changed.wait(), timeout=left)
        finally:
            self._set_held(model_id, -1)

    def _set_held(self, model_id: int, delta: int) -> None:
        self.held[model_id] += delta
        if self.held[model_id] <= 0:
            del self.held[model_id]
        self._dirty.add(model_id)
        self._report_wake.set()

    def _scale_up(self, model_id: int) -> None:
        now = time.monotonic()
        if now - self._triggered_at.get(model_id, -math.inf) < TRIGGER_EVERY_S:
            return
        self._triggered_at[model_id] = now
        task = asyncio.ensure_future(self._send_trigger(model_id))
        self._background.add(task)
        task.add_done_callback(self._background.discard)

    async def _send_trigger(self, model_id: int) -> None:
        try:
            await self._trigger(model_id)
        except Exception as exc:
            # Forget it, so the next held request (or the next table load) tries again.
            self._triggered_at.pop(model_id, None)
            log.warning("gateway: could not trigger the scale-up of model %s (%s)", model_id, exc)

    async def run(self) -> None:
        """Publish the held counts: at once when they change, every REPORT_EVERY_S while any is
        held (so the shared counts, which expire, stay alive), and a last 0 when a model empties."""
        from apps.fleet import demand

        if self.redis is None:
            return
        failures = 0
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._report_wake.wait(), timeout=REPORT_EVERY_S)
            self._report_wake.clear()
            models, self._dirty = self._dirty | set(self.held), set()
            for model_id in models:
                try:
                    await demand.report_held(
                        self.redis, model_id=model_id, worker_id=self.worker_id, held=self.held.get(model_id, 0)
                    )
                    failures = 0
                except asyncio.CancelledError:
                    raise
                except Exception as exc:
                    self._dirty.add(model_id)
                    failures += 1
                    if failures == 1:
                        log.warning("gateway: cannot publish held requests to Redis (%s)", exc)
            if failures:
                await asyncio.sleep(min(5.0, failures * 0.5))

    async def close(self) -> None:
        for task in list(self._background):
            task.cancel()
        await asyncio.gather(*self._background, return_exceptions=True)
