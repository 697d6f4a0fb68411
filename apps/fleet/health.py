"""Health checks: every node with an endpoint, concurrently (asyncio + aiohttp), then one bulk write.

For each node: GET /health (200 = healthy; vLLM answers 503 when its engine died and nothing at
all while loading), then GET /v1/models with the node key the gateway presents (vLLM's
--api-key guards only /v1/*: a node that refuses our key answers /health 200 yet every request
401, so without this check a node the gateway marked unhealthy for it flapped back to ready), then
GET /metrics for its load. Status changes go through node_transition
(which bumps the gateway's routing version); metrics-only updates are one bulk_update, which the
gateway picks up on its next periodic refresh.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from django.conf import settings
from django.db import connection
from django.utils import timezone

from apps.fleet.keys import presented_key
from apps.fleet.load_history import LoadSample, node_load_record
from apps.fleet.metrics import NodeLoad, parse_vllm_load
from apps.fleet.models import HEALTH_CHECKED_STATUSES, Node, NodeStatus
from apps.fleet.transitions import IllegalTransition, node_transition

log = logging.getLogger(__name__)

# Draining nodes are checked for their in-flight count (the drain waits for it to reach 0).
CHECKED_STATUSES = HEALTH_CHECKED_STATUSES | {NodeStatus.DRAINING}
HEALTH_FIELDS = [
    "last_health_at",
    "consecutive_failures",
    "health_latency_ms",
    "requests_running",
    "requests_waiting",
    "kv_cache_usage",
]


@dataclass(frozen=True)
class Target:
    node_id: int
    url: str
    api_key: str | None = None  # what the gateway presents; None: the key is not checked


@dataclass(frozen=True)
class Result:
    node_id: int
    ok: bool
    latency_ms: float | None = None
    load: NodeLoad | None = None
    error: str = ""


@dataclass
class Summary:
    checked: int = 0
    healthy: int = 0
    transitions: list[str] = field(default_factory=list)
    seconds: float = 0.0


async def _check_one(session: aiohttp.ClientSession, sem: asyncio.Semaphore, target: Target, limit_s: float) -> Result:
    base = target.url.rstrip("/")
    async with sem:
        started = time.perf_counter()
        try:
            async with asyncio.timeout(limit_s):
                async with session.get(base + "/health") as response:
                    await response.read()
                    status = response.status
                latency = (time.perf_counter() - started) * 1000
                if status != 200:
                    return Result(target.node_id, False, latency, error=f"/health answered {status}")
                if target.api_key is not None:
                    refused = await _key_refused(session, base, target.api_key)
                    if refused:
                        return Result(target.node_id, False, latency, error=refused)
                try:
                    async with session.get(base + "/metrics") as metrics:
                        text = await metrics.text(errors="replace")
                        load = parse_vllm_load(text) if metrics.status == 200 else None
                except aiohttp.ClientError:
                    load = None  # healthy but no load figures this time
                return Result(target.node_id, True, latency, load)
        except TimeoutError:
            return Result(target.node_id, False, error=f"no answer within {limit_s:g}s")
        except (aiohttp.ClientError, ValueError) as exc:
            return Result(target.node_id, False, error=f"{type(exc).__name__}: {exc}"[:300])


async def _key_refused(session: aiohttp.ClientSession, base: str, api_key: str) -> str:
    """Why the node's authenticated API does not take our key ('' when it does): /v1/models is the
    cheapest route vLLM guards with --api-key (no generation, no tokenizer)."""
    async with session.get(base + "/v1/models", headers={"Authorization": f"Bearer {api_key}"}) as response:
        await response.read()
        if response.status in (401, 403):
            return f"the node refused the gateway's node key (HTTP {response.status} on /v1/models)"
        if response.status != 200:
            return f"/v1/models answered {response.status}"
    return ""


async def check_targets(
    targets: Sequence[Target], *, limit_s: float | None = None, concurrency: int | None = None
) -> list[Result]:
    """Check all targets concurrently; ``limit_s`` bounds each node's /health + /metrics.

    aiohttp rather than httpx: on this machine httpx's connection pool needed ~20 s for 300
    nodes (and timed some out) where aiohttp needed 0.4 s; bench/health_bench.py shows both.
    """
    timeout = limit_s or settings.FLEET_HEALTH_TIMEOUT_S
    concurrency = concurrency or settings.FLEET_HEALTH_CONCURRENCY
    sem = asyncio.Semaphore(concurrency)
    connector = aiohttp.TCPConnector(limit=concurrency, limit_per_host=0, ttl_dns_cache=300)
    async with aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=timeout), auto_decompress=True, trust_env=False
    ) as session:
        return list(await asyncio.gather(*(_check_one(session, sem, t, timeout) for t in targets)))


def _next_status(node: Node, result: Result) -> tuple[str, str] | None:
    if result.ok:
        if node.status in {NodeStatus.PROVISIONING, NodeStatus.LOADING}:
            return NodeStatus.READY, "health check passed"
        if node.status == NodeStatus.UNHEALTHY:
            return NodeStatus.READY, "recovered: health check passed"
        return None
    if node.status == NodeStatus.READY and node.consecutive_failures >= settings.FLEET_UNHEALTHY_AFTER:
        return NodeStatus.UNHEALTHY, f"{node.consecutive_failures} consecutive health check failures: {result.error}"
    return None


def write_health(nodes: list[Node], batch: int = 1000) -> None:
    """One UPDATE … FROM (VALUES …) per 1,000 nodes on PostgreSQL: Django's bulk_update builds a
    CASE per field and took 4 s for 1,000 rows here; this takes milliseconds."""
    if connection.vendor != "postgresql":
        Node.objects.bulk_update(nodes, HEALTH_FIELDS, batch_size=500)
        return
    table = Node._meta.db_table
    with connection.cursor() as cursor:
        for i in range(0, len(nodes), batch):
            chunk = nodes[i : i + batch]
            rows = ", ".join(
                ["(%s::bigint, %s::timestamptz, %s::integer, %s::float8, %s::integer, %s::integer, %s::float8)"]
                * len(chunk)
            )
            params: list[Any] = []
            for n in chunk:
                params += [
                    n.pk,
                    n.last_health_at,
                    n.consecutive_failures,
                    n.health_latency_ms,
                    n.requests_running,
                    n.requests_waiting,
                    n.kv_cache_usage,
                ]
            cursor.execute(
                f"UPDATE {table} AS n SET last_health_at = v.at, consecutive_failures = v.failures, "  # noqa: S608
                "health_latency_ms = v.latency, requests_running = v.running, requests_waiting = v.waiting, "
                f"kv_cache_usage = v.kv FROM (VALUES {rows}) AS v(id, at, failures, latency, running, waiting, kv) "
                "WHERE n.id = v.id",
                params,
            )


def apply_results(nodes: Iterable[Node], results: Iterable[Result], summary: Summary) -> None:
    by_id = {n.pk: n for n in nodes}
    now = timezone.now()
    changed: list[Node] = []
    moves: list[tuple[Node, str, str]] = []
    samples: list[LoadSample] = []
    for result in results:
        node = by_id.get(result.node_id)
        if node is None:
            continue
        node.last_health_at = now
        node.health_latency_ms = round(result.latency_ms, 1) if result.latency_ms is not None else None
        if result.ok:
            summary.healthy += 1
            node.consecutive_failures = 0
            if result.load is not None:
                node.requests_running = result.load.running if result.load.running is not None else 0
                node.requests_waiting = result.load.waiting if result.load.waiting is not None else 0
                node.kv_cache_usage = result.load.kv_cache_usage
        else:
            node.consecutive_failures += 1
        # From this check only: the row's snapshot may be stale when /metrics did not answer.
        load = result.load if result.ok else None
        samples.append(LoadSample(node.pk, result.ok, (load and load.running) or 0, (load and load.waiting) or 0))
        changed.append(node)
        move = _next_status(node, result)
        if move:
            moves.append((node, *move))
    write_health(changed)
    node_load_record(samples=samples, at=now)  # utilisation's history (apps.fleet.load_history)
    for node, to, reason in moves:
        try:
            node_transition(node=node, to=to, reason=reason, actor="health-check", expected_from=node.status)
            summary.transitions.append(f"{node}: {to}")
        except IllegalTransition:
            log.info("node %s changed status during its health check; skipped %s", node, to)


def run_health_checks(node_ids: Sequence[int] | None = None) -> Summary:
    """Check every node that should answer (or just ``node_ids``) and record the results."""
    started = time.perf_counter()
    qs = Node.objects.filter(status__in=CHECKED_STATUSES).exclude(endpoint_url="")
    if node_ids is not None:
        qs = qs.filter(pk__in=list(node_ids))
    nodes = list(
        qs.only(
            "id",
            "status",
            "endpoint_url",
            "consecutive_failures",
            "cluster_name",
            "provisioned_at",
            "weights_loaded_at",
            "ready_at",
            "launcher",
            "launcher_state",
            *HEALTH_FIELDS,
        )
    )
    summary = Summary(checked=len(nodes))
    if nodes:
        targets = [Target(n.pk, n.endpoint_url, presented_key(n.pk, n.launcher, n.launcher_state or {})) for n in nodes]
        results = asyncio.run(check_targets(targets))
        apply_results(nodes, results, summary)
    summary.seconds = time.perf_counter() - started
    return summary
