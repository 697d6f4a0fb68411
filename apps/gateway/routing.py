"""The routing table: served model name → its catalog entry and ready nodes, and node choice.

Loaded from the database in the background (on a ``routing`` invalidation and at least every
ROUTING_REFRESH_S, so the scraped queue lengths stay fresh); requests only read memory.

Least loaded = this worker's in-flight requests on the node + every other worker's (published to
Redis every 200 ms by LoadBoard) + the node's last scraped ``vllm:num_requests_waiting``.
"""

from __future__ import annotations

import logging
import os
import statistics
import time
import uuid
from collections import defaultdict, deque
from dataclasses import dataclass, field
from decimal import Decimal
from typing import TYPE_CHECKING

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections, connection

if TYPE_CHECKING:
    import redis.asyncio as aioredis

log = logging.getLogger(__name__)

LOADBOARD_PERIOD_S = 0.2
_WORKERS_KEY = "crosslogic:inflight:workers"
_COOLDOWN_KEY = "crosslogic:cooldowns"
# The measured cold start: the median over a model's last 20 nodes that became ready, read from
# the newest 500 such nodes of the whole fleet (one indexed query per table load).
COLD_START_PER_MODEL = 20
COLD_START_SAMPLE = 500


@dataclass(frozen=True)
class NodeRoute:
    node_id: int
    base_url: str
    api_key: str
    waiting: int


@dataclass(frozen=True)
class ModelRoute:
    model_id: int
    name: str
    created: int
    price_in: Decimal
    price_out: Decimal
    nodes: tuple[NodeRoute, ...] = ()
    max_model_len: int | None = None
    # Scale from zero (apps/gateway/coldstart.py): nodes on their way up (a warm restart too),
    # whether the policy lets one start (min_replicas 0, max_replicas > 0), when the first of them
    # should be ready (wall clock: its start + the measured cold or warm start), and the measured
    # cold start (median ready_at - requested_at of first launches) of this model, else of its
    # accelerator, else FLEET_DEFAULT_COLD_START_S.
    starting: int = 0
    may_start: bool = False
    ready_eta: float | None = None
    cold_start_s: float = 60.0


@dataclass
class RoutingTable:
    models: dict[str, ModelRoute] = field(default_factory=dict)
    loaded_at: float = 0.0


def load_table() -> RoutingTable:
    from apps.catalog.models import ServedModel
    from apps.fleet.keys import presented_key
    from apps.fleet.models import Node, NodeStatus

    starting_statuses = (NodeStatus.PENDING, NodeStatus.PROVISIONING, NodeStatus.LOADING)
    close_old_connections()
    try:
        models = list(
            ServedModel.objects.filter(is_active=True).values(
                "id",
                "name",
                "created_at",
                "price_input_per_mtok",
                "price_output_per_mtok",
                "max_model_len",
                "context_length",
                "accelerator",
                "min_replicas",
                "max_replicas",
            )
        )
        starting = list(
            Node.objects.filter(status__in=starting_statuses, model__is_active=True).values(
                "model_id", "requested_at", "restart_requested_at"
            )
        )
        timing = ("model_id", "accelerator", "model__accelerator", "requested_at", "restart_requested_at", "ready_at")
        measured = list(
            Node.objects.filter(ready_at__isnull=False).order_by("-ready_at").values(*timing)[:COLD_START_SAMPLE]
        )
        nodes = list(
            Node.objects.filter(status=NodeStatus.READY, model__is_active=True)
            .exclude(endpoint_url="")
            .values("id", "model_id", "endpoint_url", "launcher", "launcher_state", "requests_waiting")
        )
    finally:
        connection.close()
    by_model: dict[int, list[NodeRoute]] = defaultdict(list)
    for n in nodes:
        base = n["endpoint_url"].rstrip("/")
        if base.endswith("/v1"):
            base = base[:-3]
        by_model[n["model_id"]].append(
            NodeRoute(
                node_id=n["id"],
                base_url=base,
                api_key=presented_key(n["id"], n["launcher"], n["launcher_state"] or {}),
                waiting=n["requests_waiting"] or 0,
            )
        )
    cold, warm = _start_times(measured)
    default = settings.FLEET_DEFAULT_COLD_START_S
    etas: dict[int, float] = {}
    starting_count: dict[int, int] = defaultdict(int)
    accelerators = {m["id"]: m["accelerator"] for m in models}
    for start in starting:
        model_id = start["model_id"]
        model_cold = cold.get(model_id, cold.get(accelerators.get(model_id, ""), default))
        if start["restart_requested_at"] is not None:  # a warm restart from the warm pool
            eta = start["restart_requested_at"].timestamp() + warm.get(model_id, warm.get("", model_cold))
        else:
            eta = start["requested_at"].timestamp() + model_cold
        starting_count[model_id] += 1
        etas[model_id] = min(eta, etas.get(model_id, eta))
    table = RoutingTable(loaded_at=time.monotonic())
    for m in models:
        table.models[m["name"]] = ModelRoute(
            model_id=m["id"],
            name=m["name"],
            created=int(m["created_at"].timestamp()),
            price_in=m["price_input_per_mtok"],
            price_out=m["price_output_per_mtok"],
            nodes=tuple(by_model.get(m["id"], ())),
            # What vLLM serves: --max-model-len when the catalog sets it, else the model's own context.
            max_model_len=m["max_model_len"] or m["context_length"],
            starting=starting_count[m["id"]],
            may_start=m["min_replicas"] == 0 and m["max_replicas"] > 0,
            ready_eta=etas.get(m["id"]),
            cold_start_s=cold.get(m["id"], cold.get(m["accelerator"], default)),
        )
    return table


def _start_times(rows: list[dict]) -> tuple[dict[int | str, float], dict[int | str, float]]:
    """Median cold and warm starts, keyed by model id (its last COLD_START_PER_MODEL nodes) and by
    accelerator name; warm starts also under "" (the whole fleet's: a stopped machine restarts in
    about the same time whatever it serves)."""
    samples: tuple[dict[int | str, list[float]], dict[int | str, list[float]]] = (defaultdict(list), defaultdict(list))
    for row in rows:  # newest first
        restarted = row["restart_requested_at"]
        began = restarted if restarted is not None else row["requested_at"]
        seconds = (row["ready_at"] - began).total_seconds()
        if seconds < 0:
            continue  # ready before this restart: its ready_at belongs to an earlier start
        per = samples[restarted is not None]
        if len(per[row["model_id"]]) < COLD_START_PER_MODEL:
            per[row["model_id"]].append(seconds)
        per[row["accelerator"] or row["model__accelerator"]].append(seconds)
        if restarted is not None:
            per[""].append(seconds)
    cold, warm = ({k: statistics.median(v) for k, v in per.items() if v} for per in samples)
    return cold, warm


def node_mark_unhealthy(*, node_id: int, reason: str) -> bool:
    """Take a ready node out of rotation through the fleet's state machine (which records the
    reason and bumps the routing version). False if it was not ready (any more)."""
    from apps.fleet.models import Node, NodeStatus
    from apps.fleet.transitions import IllegalTransition, node_transition

    close_old_connections()
    try:
        node = Node.objects.filter(pk=node_id, status=NodeStatus.READY).first()
        if node is None:
            return False
        try:
            node_transition(
                node=node, to=NodeStatus.UNHEALTHY, reason=reason, actor="gateway", expected_from=NodeStatus.READY
            )
        except IllegalTransition:
            return False  # another worker (or the health check) moved it first
        return True
    finally:
        connection.close()


anode_mark_unhealthy = sync_to_async(node_mark_unhealthy, thread_sensitive=False)


aload_table = sync_to_async(load_table, thread_sensitive=False)


class LoadBoard:
    """In-flight requests per node: this worker's exact counts, other workers' from Redis."""

    def __init__(self) -> None:
        self.worker_id = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self.local: dict[int, int] = defaultdict(int)
        self.others: dict[int, int] = {}
        self.cooldown_until: dict[int, float] = {}
        self._strikes: dict[int, deque[float]] = {}
        self._turn = 0  # rotates the start of the scan, so equal loads spread over the nodes

    def acquire(self, node_id: int) -> None:
        self.local[node_id] += 1

    def release(self, node_id: int) -> None:
        self.local[node_id] -= 1
        if self.local[node_id] <= 0:
            del self.local[node_id]

    def cool_down(self, node_id: int, seconds: float) -> None:
        self.cooldown_until[node_id] = time.monotonic() + seconds

    def strike(self, node_id: int, *, threshold: int, window_s: float, cooldown_s: float) -> bool:
        """Count a request that failed on the node but worked elsewhere; at ``threshold`` of them
        within ``window_s`` the node is cooled down (True)."""
        now = time.monotonic()
        strikes = self._strikes.setdefault(node_id, deque())
        strikes.append(now)
        while strikes and strikes[0] <= now - window_s:
            strikes.popleft()
        if len(strikes) < threshold:
            return False
        del self._strikes[node_id]
        self.cool_down(node_id, cooldown_s)
        return True

    def pick(self, nodes: tuple[NodeRoute, ...], exclude: set[int]) -> NodeRoute | None:
        now = time.monotonic()
        best: NodeRoute | None = None
        best_load = 0
        self._turn += 1
        start = self._turn % len(nodes) if nodes else 0
        for node in nodes[start:] + nodes[:start]:
            if node.node_id in exclude or self.cooldown_until.get(node.node_id, 0.0) > now:
                continue
            load = self.local.get(node.node_id, 0) + self.others.get(node.node_id, 0) + node.waiting
            if best is None or load < best_load:
                best, best_load = node, load
        return best

    async def sync(self, redis: aioredis.Redis) -> None:
        """Publish our counts and cooldowns; read everyone else's. Two pipelined round trips."""
        own = f"crosslogic:inflight:{self.worker_id}"
        now = time.time()
        mono = time.monotonic()
        pipe = redis.pipeline(transaction=False)
        pipe.delete(own)
        if self.local:
            pipe.hset(own, mapping={str(k): v for k, v in self.local.items()})
            pipe.expire(own, 3)
        pipe.zadd(_WORKERS_KEY, {self.worker_id: now})
        pipe.zremrangebyscore(_WORKERS_KEY, "-inf", now - 3)
        # Cooldowns are shared as node id -> wall-clock end in one sorted set.
        for node_id, until in list(self.cooldown_until.items()):
            if until > mono:
                pipe.zadd(_COOLDOWN_KEY, {str(node_id): now + (until - mono)}, gt=True)
            else:
                del self.cooldown_until[node_id]
        pipe.zremrangebyscore(_COOLDOWN_KEY, "-inf", now)
        pipe.zrange(_WORKERS_KEY, 0, -1)
        pipe.zrange(_COOLDOWN_KEY, 0, -1, withscores=True)
        results = await pipe.execute()
        workers, cooldowns = results[-2], results[-1]
        for member, end in cooldowns:
            node_id = int(member)
            until = mono + (float(end) - now)
            if self.cooldown_until.get(node_id, 0.0) < until:
                self.cooldown_until[node_id] = until
        others = [w.decode() if isinstance(w, bytes) else w for w in workers]
        others = [w for w in others if w != self.worker_id]
        counts: dict[int, int] = defaultdict(int)
        if others:
            pipe = redis.pipeline(transaction=False)
            for w in others:
                pipe.hgetall(f"crosslogic:inflight:{w}")
            for mapping in await pipe.execute():
                for k, v in mapping.items():
                    counts[int(k)] += int(v)
        self.others = dict(counts)
