"""The gateway's Prometheus metrics: plain in-process counters on the request path, published
per worker through Redis, exposed by any worker at /metrics with a ``worker`` label.

Why not prometheus_client's metric objects or its multiprocess mode: every ``inc()`` there takes a
lock, and in multiprocess mode writes an mmap'd file per metric and process. Here a request does
a few dict increments and one bisect per histogram, with no lock (the event loop is the only
writer) and no I/O. A background task of each worker writes its snapshot to Redis every
METRICS_PUBLISH_INTERVAL_S (a key that expires after three intervals, so a dead worker's series
go away); the worker that answers a scrape first publishes its own fresh snapshot, then reads
every live one, and prometheus_client renders the text format. Publishing before serving keeps
each series monotonic whichever worker answers: a value served live by worker A is already in
Redis when worker B answers the next scrape, so B cannot serve an older, smaller A (Prometheus
would read that drop as a counter reset and spike ``rate()``). Counters are per worker (label ``worker`` =
host:pid): Prometheus sums them with ``sum without (worker) (rate(...))``, and a restarted worker
is a new series starting at zero, which ``rate()`` handles.

Label cardinality is bounded: ``model`` (the catalog's served names), ``status`` (HTTP codes the
gateway answers), ``node`` (node ids), ``reason``/``kind`` (fixed sets). No tenant label unless
METRICS_TENANT_LABEL is on (then requests and tokens carry ``tenant`` = the tenant's id).
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
from bisect import bisect_left
from collections import defaultdict
from collections.abc import Iterator
from typing import Any

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections, connection
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.exposition import generate_latest
from prometheus_client.registry import Collector, CollectorRegistry

from apps.gateway.errors import GatewayError

log = logging.getLogger(__name__)

# Seconds. TTFT of a warm vLLM node is tens of ms; a queued or cold one, seconds.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)
LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
SNAPSHOT_PREFIX = "crosslogic:metrics:worker:"
WORKERS_KEY = "crosslogic:metrics:workers"


class _Histogram:
    __slots__ = ("bounds", "counts", "total")

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * (len(bounds) + 1)  # the last one is +Inf
        self.total = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.total += value

    def dump(self) -> list[Any]:
        return [self.counts, self.total]


def worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}"


class _Counts:
    __slots__ = ("completion", "prompt", "statuses")

    def __init__(self) -> None:
        self.statuses: dict[int, int] = {}
        self.prompt = 0
        self.completion = 0


class _ModelSeries(_Counts):
    """One model's counters: one dict lookup per request finds them all."""

    __slots__ = ("latency", "tenants", "ttft")

    def __init__(self) -> None:
        super().__init__()
        self.ttft = _Histogram(TTFT_BUCKETS)
        self.latency = _Histogram(LATENCY_BUCKETS)
        self.tenants: dict[int, _Counts] = {}  # with METRICS_TENANT_LABEL only


class GatewayMetrics:
    """One worker's counters. Every method is a few dict operations: safe on the request path."""

    def __init__(self, *, tenant_label: bool = False) -> None:
        self.tenant_label = tenant_label
        self.worker = worker_id()
        self.models: dict[str, _ModelSeries] = {}
        self.upstream_errors: defaultdict[tuple[int, str], int] = defaultdict(int)
        self.rate_limited: defaultdict[tuple[str, str], int] = defaultdict(int)
        self.budget_denials: defaultdict[tuple[str, str], int] = defaultdict(int)
        # Snapshot and write under one lock: two publishes in flight could otherwise land out of
        # order and leave the older (smaller) snapshot in Redis.
        self.publish_lock = asyncio.Lock()

    def reset(self) -> None:
        self.__init__(tenant_label=self.tenant_label)  # type: ignore[misc]  # tests start from zero

    def _counts(self, model: str, tenant_id: int) -> tuple[_ModelSeries, _Counts]:
        series = self.models.get(model)
        if series is None:
            series = self.models[model] = _ModelSeries()
        if not self.tenant_label:
            return series, series
        counts = series.tenants.get(tenant_id)
        if counts is None:
            counts = series.tenants[tenant_id] = _Counts()
        return series, counts

    # --- the request path ------------------------------------------------------------------
    def request_done(
        self,
        *,
        model: str,
        status: int,
        tenant_id: int,
        prompt_tokens: int,
        completion_tokens: int,
        ttft_ms: float | None,
        latency_ms: float,
    ) -> None:
        series, counts = self._counts(model, tenant_id)
        statuses = counts.statuses
        statuses[status] = statuses.get(status, 0) + 1
        counts.prompt += prompt_tokens
        counts.completion += completion_tokens
        if ttft_ms is not None:
            series.ttft.observe(ttft_ms / 1000)
        series.latency.observe(latency_ms / 1000)

    def refused(self, *, model: str, status: int, tenant_id: int, reason: str, budget: str | None = None) -> None:
        """A request refused before it reached a node: a rate limit (reason) or a budget."""
        statuses = self._counts(model, tenant_id)[1].statuses
        statuses[status] = statuses.get(status, 0) + 1
        if reason == "budget":
            self.budget_denials[(model, budget or "unknown")] += 1
        else:
            self.rate_limited[(model, reason)] += 1

    def upstream_error(self, *, node_id: int, kind: str) -> None:
        self.upstream_errors[(node_id, kind)] += 1

    # --- publishing ------------------------------------------------------------------------
    def snapshot(self) -> dict[str, Any]:
        """Plain JSON: label values (strings) then the value, per series."""
        requests: list[list[Any]] = []
        tokens: list[list[Any]] = []
        for model, series in self.models.items():
            owners = (
                [((model, str(tenant)), counts) for tenant, counts in series.tenants.items()]
                if self.tenant_label
                else [((model,), series)]
            )
            for labels, counts in owners:
                requests += [[labels[0], str(status), *labels[1:], n] for status, n in counts.statuses.items()]
                if counts.prompt:
                    tokens.append([*labels, "prompt", counts.prompt])
                if counts.completion:
                    tokens.append([*labels, "completion", counts.completion])
        return {
            "tenant_label": self.tenant_label,
            "requests": requests,
            "tokens": tokens,
            "ttft": {m: s.ttft.dump() for m, s in self.models.items() if any(s.ttft.counts)},
            "latency": {m: s.latency.dump() for m, s in self.models.items() if any(s.latency.counts)},
            "upstream_errors": [[str(node), kind, n] for (node, kind), n in self.upstream_errors.items()],
            "rate_limited": [[*k, v] for k, v in self.rate_limited.items()],
            "budget_denials": [[*k, v] for k, v in self.budget_denials.items()],
        }


# The process's counters (one per gateway worker process).
METRICS = GatewayMetrics()
# A worker forked after import (gunicorn --preload) starts from zero under its own id, not as a
# copy of its parent's series.
os.register_at_fork(after_in_child=METRICS.reset)
CONTENT_TYPE = (b"content-type", b"text/plain; version=0.0.4; charset=utf-8")


async def scrape(*, authorization: str | None, redis: Any, counters: GatewayMetrics) -> bytes:
    """The /metrics body for a valid staff token (GatewayError 401/404 otherwise)."""
    if not settings.METRICS_ENABLED:
        raise GatewayError(404, "Unknown path /metrics.", code="unknown_url")
    scheme, _, raw = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not raw.strip():
        raise GatewayError(
            401,
            "Send a staff token: 'Authorization: Bearer cls_…'.",
            type="authentication_error",
            code="invalid_api_key",
            headers={"www-authenticate": "Bearer"},
        )
    if not await sync_to_async(staff_token_ok, thread_sensitive=False)(raw.strip()):
        raise GatewayError(
            401, "Invalid, expired or revoked staff token.", type="authentication_error", code="invalid_api_key"
        )
    snapshots = await gather(redis, counters)
    try:
        fleet = await sync_to_async(fleet_gauges, thread_sensitive=False)()
    except Exception as exc:  # the gateway's own counters are still worth a scrape
        log.warning("metrics: fleet gauges unavailable (%s)", exc)
        fleet = None
    return render(snapshots, fleet)


async def publish_forever(redis: Any, counters: GatewayMetrics) -> None:
    """A worker's background task: its counters to Redis, where any worker's /metrics finds them."""
    if redis is None or not settings.METRICS_ENABLED:
        return
    interval = settings.METRICS_PUBLISH_INTERVAL_S
    failures = 0
    while True:
        try:
            await asyncio.wait_for(publish(redis, counters, ttl_s=interval * 3), timeout=2.0)
            failures = 0
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            failures += 1
            if failures == 1:
                log.warning("metrics: cannot publish this worker's counters through Redis (%s)", exc)
        await asyncio.sleep(interval)


async def publish(redis: Any, metrics: GatewayMetrics, *, ttl_s: float) -> dict[str, Any]:
    """Write this worker's snapshot where the other workers' scrapes find it; return what was written."""
    key = SNAPSHOT_PREFIX + metrics.worker
    ttl_ms = max(1000, int(ttl_s * 1000))
    async with metrics.publish_lock:
        snapshot = metrics.snapshot()
        pipe = redis.pipeline(transaction=False)
        pipe.set(key, json.dumps(snapshot), px=ttl_ms)
        pipe.sadd(WORKERS_KEY, metrics.worker)
        pipe.pexpire(WORKERS_KEY, ttl_ms * 10)
        await pipe.execute()
    return snapshot


async def unpublish(redis: Any, metrics: GatewayMetrics) -> None:
    pipe = redis.pipeline(transaction=False)
    pipe.delete(SNAPSHOT_PREFIX + metrics.worker)
    pipe.srem(WORKERS_KEY, metrics.worker)
    await pipe.execute()


async def gather(redis: Any, metrics: GatewayMetrics) -> dict[str, dict[str, Any]]:
    """worker id -> snapshot: this worker's taken (and published) now, the others' as they last published."""
    snapshots: dict[str, dict[str, Any]] = {}
    own: dict[str, Any] | None = None
    if redis is not None:
        try:
            own = await publish(redis, metrics, ttl_s=settings.METRICS_PUBLISH_INTERVAL_S * 3)
            workers = sorted(w.decode() if isinstance(w, bytes) else w for w in await redis.smembers(WORKERS_KEY))
            others = [w for w in workers if w != metrics.worker]
            values = await redis.mget([SNAPSHOT_PREFIX + w for w in others]) if others else []
            gone = []
            for worker, raw in zip(others, values, strict=True):
                if raw is None:
                    gone.append(worker)  # expired: the worker stopped publishing
                else:
                    snapshots[worker] = json.loads(raw)
            if gone:
                await redis.srem(WORKERS_KEY, *gone)
        except Exception as exc:
            log.warning("metrics: could not read the other workers' snapshots (%s); serving this worker's", exc)
    snapshots[metrics.worker] = metrics.snapshot() if own is None else own
    return snapshots


class _Snapshots(Collector):
    def __init__(self, snapshots: dict[str, dict[str, Any]], fleet: dict[str, Any] | None) -> None:
        self.snapshots = snapshots
        self.fleet = fleet

    def collect(self) -> Iterator[Metric]:
        tenant = any(s.get("tenant_label") for s in self.snapshots.values())
        per_tenant = ["tenant"] if tenant else []
        yield self._counter(
            "crosslogic_gateway_requests",
            "Inference requests answered, by model and HTTP status.",
            ["model", "status", *per_tenant],
            "requests",
        )
        yield self._counter(
            "crosslogic_gateway_tokens",
            "Tokens metered (prompt and completion), by model.",
            ["model", *per_tenant, "kind"],
            "tokens",
        )
        yield self._counter(
            "crosslogic_gateway_upstream_errors",
            "Failures talking to a node (unreachable, refused our node key, answered 5xx), by node.",
            ["node", "kind"],
            "upstream_errors",
        )
        yield self._counter(
            "crosslogic_gateway_rate_limited",
            "Requests refused by a rate limit (429), by model and limit.",
            ["model", "reason"],
            "rate_limited",
        )
        yield self._counter(
            "crosslogic_gateway_budget_denials",
            "Requests refused for a spent monthly budget (429 insufficient_quota), by model and budget.",
            ["model", "budget"],
            "budget_denials",
        )
        yield self._histogram(
            "crosslogic_gateway_ttft_seconds", "Time to the first byte of the answer, by model.", "ttft", TTFT_BUCKETS
        )
        yield self._histogram(
            "crosslogic_gateway_request_duration_seconds",
            "Whole request duration, by model.",
            "latency",
            LATENCY_BUCKETS,
        )
        if self.fleet is not None:
            nodes = GaugeMetricFamily("crosslogic_fleet_nodes", "Nodes per status.", labels=["status"])
            for status, count in sorted(self.fleet["nodes"].items()):
                nodes.add_metric([status], count)
            yield nodes
            yield GaugeMetricFamily(
                "crosslogic_fleet_gpu_cost_dollars_per_hour",
                "Sum of the hourly cost of the nodes being paid for (not terminated or failed).",
                value=float(self.fleet["cost_per_hour"]),
            )

    def _counter(self, name: str, doc: str, labels: list[str], field: str) -> CounterMetricFamily:
        family = CounterMetricFamily(name, doc, labels=[*labels, "worker"])
        for worker, snap in sorted(self.snapshots.items()):
            for *values, count in snap.get(field, []):
                if len(values) == len(labels):  # a worker with another label setting is skipped
                    family.add_metric([*values, worker], count)
        return family

    def _histogram(self, name: str, doc: str, field: str, bounds: tuple[float, ...]) -> HistogramMetricFamily:
        family = HistogramMetricFamily(name, doc, labels=["model", "worker"])
        for worker, snap in sorted(self.snapshots.items()):
            for model, (counts, total) in sorted(snap.get(field, {}).items()):
                if len(counts) != len(bounds) + 1:
                    continue  # published by a worker with other buckets (mid-deploy)
                cumulative, running = [], 0
                for bound, count in zip((*(str(b) for b in bounds), "+Inf"), counts, strict=True):
                    running += count
                    cumulative.append((bound, running))
                family.add_metric([model, worker], cumulative, total)
        return family


def render(snapshots: dict[str, dict[str, Any]], fleet: dict[str, Any] | None) -> bytes:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Snapshots(snapshots, fleet))
    return generate_latest(registry)


def staff_token_ok(raw: str) -> bool:
    from apps.tenancy.services import staff_token_touch, staff_token_verify

    close_old_connections()
    try:
        token = staff_token_verify(raw=raw)
        if token is None:
            return False
        staff_token_touch(token=token)
        return True
    finally:
        connection.close()


def fleet_gauges() -> dict[str, Any]:
    from apps.fleet.selectors import billable_cost_per_hour, fleet_summary

    close_old_connections()
    try:
        return {"nodes": fleet_summary(), "cost_per_hour": billable_cost_per_hour()}
    finally:
        connection.close()
