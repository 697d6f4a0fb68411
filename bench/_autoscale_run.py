"""Processes and the replay itself for bench/autoscale_bench.py. Imported after the bench has
chosen its environment: this process uses Django (the bench's own database) to seed, to drive
the QPS policy through the fleet's services and to sample the fleet. Not a test."""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlparse, urlunparse

from _autoscale_trace import (
    Outcome,
    QpsPolicy,
    Sample,
    Scale,
    Summary,
    rate,
    summarize,
)

ROOT = Path(__file__).resolve().parents[1]
MODEL = "bench-llama"
SAMPLE_PERIOD_S = 1.0
DONE = b"data: [DONE]"
EMPTY = b'"content":""'


@dataclass
class PolicyResult:
    summary: Summary
    samples: list[Sample]
    # Per request (scheduled start s, TTFT ms or None, failed) and the autoscaler's changes of
    # the desired count (bench s, desired, reason): raw JSON only, for the analysis.
    requests: list[tuple[float, float | None, bool]] = field(default_factory=list)
    decisions: list[tuple[float, int, str]] = field(default_factory=list)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _stop(proc: subprocess.Popen, sig: int = signal.SIGTERM, wait_s: float = 20) -> None:
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(wait_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    except ProcessLookupError:
        pass


# --- databases ----------------------------------------------------------------------------------


def _admin_url(db_url: str) -> str:
    return urlunparse(urlparse(db_url)._replace(path="/postgres"))


def _db_name(db_url: str) -> str:
    return urlparse(db_url).path.lstrip("/")


def _sql(db_url: str, *statements: str) -> None:
    import psycopg

    with psycopg.connect(_admin_url(db_url), autocommit=True) as conn:
        for statement in statements:
            conn.execute(statement)


def prepare_template(env: dict) -> None:
    """Migrate a template database once; each policy starts from a copy of it."""
    db_url = env["DATABASE_URL"]
    template = _db_name(db_url) + "_tpl"
    _sql(db_url, f'DROP DATABASE IF EXISTS "{template}" WITH (FORCE)', f'CREATE DATABASE "{template}"')
    tpl_env = {**env, "DATABASE_URL": urlunparse(urlparse(db_url)._replace(path=f"/{template}"))}
    subprocess.run([sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"], cwd=ROOT, env=tpl_env, check=True)


def fresh_database(env: dict) -> None:
    from django.db import connections

    connections.close_all()
    db_url = env["DATABASE_URL"]
    name = _db_name(db_url)
    _sql(db_url, f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)', f'CREATE DATABASE "{name}" TEMPLATE "{name}_tpl"')
    import redis

    client = redis.Redis.from_url(env["REDIS_URL"])
    client.flushdb()
    client.close()


# --- the control plane's processes ------------------------------------------------------------


class ControlPlane:
    """Gateway (1 uvicorn worker), Celery worker and beat, for one policy's run; stopped on exit
    together with every local node they started."""

    def __init__(self, env: dict) -> None:
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = {**env, "CONTROL_PLANE_URL": self.url}
        os.environ["CONTROL_PLANE_URL"] = self.url
        self.logs = Path(env["CROSSLOGIC_VAR_DIR"])
        self.logs.mkdir(parents=True, exist_ok=True)
        self.procs: dict[str, subprocess.Popen] = {}

    def _start(self, name: str, cmd: list[str]) -> None:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115  # closed with the process's life
        self.procs[name] = subprocess.Popen(
            cmd,
            cwd=ROOT,
            env=self.env,
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )

    def __enter__(self) -> ControlPlane:
        py = sys.executable
        self._start(
            "gateway",
            [
                py,
                "-m",
                "crosslogic.serve",
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--no-access-log",
                "--log-level",
                "warning",
            ],
        )
        celery = str(Path(py).with_name("celery"))
        self._start("worker", [celery, "-A", "crosslogic", "worker", "--loglevel", "WARNING", "--concurrency", "3"])
        self._start(
            "beat",
            [
                celery,
                "-A",
                "crosslogic",
                "beat",
                "--loglevel",
                "WARNING",
                "--scheduler",
                "django_celery_beat.schedulers:DatabaseScheduler",
            ],
        )
        import httpx

        deadline = time.monotonic() + 90
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(self.url + "/health", timeout=1).status_code == 200:
                    return self
            if time.monotonic() > deadline or self.procs["gateway"].poll() is not None:
                self.__exit__()
                raise RuntimeError(f"the gateway did not start (see {self.logs / 'gateway.log'})")
            time.sleep(0.3)

    def stop_beat(self) -> None:
        _stop(self.procs["beat"])

    def __exit__(self, *exc: object) -> None:
        self.stop_beat()
        with contextlib.suppress(Exception):
            stop_nodes()
        for name in ("worker", "gateway"):
            if name in self.procs:
                _stop(self.procs[name])
        kill_leftover_nodes()


def stop_nodes() -> None:
    from django.core.management import call_command

    with open(os.devnull, "w") as sink:
        call_command("stop_local_nodes", stdout=sink)


def kill_leftover_nodes() -> None:
    """Any local node process of this database still alive (the launcher's detached groups)."""
    from apps.fleet.models import Node

    for node_id, state in Node.objects.filter(launcher="local").values_list("id", "launcher_state"):
        pid = (state or {}).get("pid")
        if not isinstance(pid, int):
            continue
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        if "run_local_node" in cmdline and f"--node-id {node_id} " in cmdline + " ":
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGCONT)
                os.killpg(pid, signal.SIGKILL)


# --- seed and policies ---------------------------------------------------------------------------


def seed(*, policy: str, static_nodes: int, max_nodes: int, target_ongoing: int, scale: Scale) -> tuple[str, Any]:
    from apps.catalog.models import ServedModel
    from apps.catalog.services import model_create
    from apps.tenancy.services import api_key_issue, tenant_create

    big = {"requests_per_minute": 10_000_000, "tokens_per_minute": 2_000_000_000, "max_concurrent_requests": 100_000}
    tenant = tenant_create(slug="bench", name="Bench", contact_email="bench@example.test", **big)
    model = model_create(name=MODEL)
    fields: dict[str, Any] = {"min_replicas": static_nodes, "max_replicas": static_nodes}
    if policy.startswith("qps"):
        fields = {"min_replicas": 1, "max_replicas": max_nodes}
    elif policy == "ours":
        fields = {"min_replicas": 0, "max_replicas": max_nodes}
        policy_fields = {
            "target_ongoing_requests": target_ongoing,
            "scale_up_window_s": 0,
            # Down after 2 minutes of lower demand (the default, 300 s, is cautious for a real
            # fleet of large GPU nodes), scaled like every delay here; zero after 2 idle minutes.
            "scale_down_window_s": max(1, round(scale.delay(120))),
            "idle_to_zero_s": max(1, round(scale.delay(120))),
            "warm_pool": True,
            "spot_fallback": False,
        }
        names = {f.name for f in ServedModel._meta.get_fields()}
        fields.update({k: v for k, v in policy_fields.items() if k in names})
    ServedModel.objects.filter(pk=model.pk).update(**fields)
    model.refresh_from_db()
    if policy == "ours":
        # New nodes copy the last node's placement: make it on-demand (local launcher), since only
        # on-demand nodes may be kept stopped in the warm pool (spot ones are always torn down).
        from apps.fleet.services import node_create, node_terminate

        node_terminate(node=node_create(model=model, launcher="local", use_spot=False, actor="bench"), actor="bench")
    _set_autoscaler(enabled=policy == "ours")
    _, raw = api_key_issue(tenant=tenant, name="bench", scopes=["inference"])
    return raw, model


def _set_autoscaler(*, enabled: bool) -> None:
    """Only (c) runs the autoscaler on beat; (a) and (b) keep the reconciler alone."""
    from django_celery_beat.models import PeriodicTask

    PeriodicTask.objects.filter(task__contains="autoscale").update(enabled=enabled)


def wait_ready(model: Any, count: int, timeout_s: float) -> None:
    from apps.fleet.models import Node, NodeStatus

    deadline = time.monotonic() + timeout_s
    while Node.objects.filter(model=model, status=NodeStatus.READY).count() < count:
        if time.monotonic() > deadline:
            raise RuntimeError(f"{count} node(s) not ready within {timeout_s:.0f}s (var/bench/state/fleet/*.log)")
        time.sleep(0.5)


def launch(model: Any, count: int) -> None:
    from apps.fleet.services import node_request_launch

    node_request_launch(model=model, count=count, actor="bench", respect_max_replicas=False)


class QpsDriver(threading.Thread):
    """SkyServe's request-rate autoscaler, acting through the fleet's services."""

    def __init__(self, model: Any, policy: QpsPolicy, scale: Scale, sent: list[float], t0: float) -> None:
        super().__init__(daemon=True, name="qps-policy")
        self.model, self.policy, self.scale, self.sent, self.t0 = model, policy, scale, sent, t0
        self.stop = threading.Event()
        self.errors: list[str] = []

    def run(self) -> None:
        from django.db import connection

        interval, window = self.policy.interval_s, self.policy.window_s
        try:
            while not self.stop.wait(interval):
                now = time.monotonic() - self.t0
                qps = sum(1 for t in self.sent[-5000:] if t > now - window) / window
                try:
                    self._act(self.policy.decide(qps))
                except Exception as exc:  # keep deciding; report it
                    self.errors.append(f"{type(exc).__name__}: {exc}")
        finally:
            connection.close()

    def _act(self, target: int) -> None:
        from apps.fleet.models import Node, NodeStatus
        from apps.fleet.services import node_drain, node_terminate

        S = NodeStatus  # noqa: N806  # short alias, as in apps.fleet.models
        serving = list(
            Node.objects.filter(
                model=self.model, status__in=[S.PENDING, S.PROVISIONING, S.LOADING, S.READY, S.UNHEALTHY]
            )
        )
        if len(serving) < target:
            launch(self.model, target - len(serving))
        elif len(serving) > target:
            # Not-yet-ready nodes first, then the least busy ready ones.
            order = sorted(serving, key=lambda n: (n.status == S.READY, n.requests_running + n.requests_waiting))
            for node in order[: len(serving) - target]:
                if node.status == S.READY:
                    node_drain(node=node, actor="qps-policy", reason="QPS policy: scale down")
                else:
                    node_terminate(node=node, actor="qps-policy", reason="QPS policy: scale down")


class Sampler(threading.Thread):
    def __init__(self, model: Any, scale: Scale, peak_rps: float, t0: float, in_flight: list[int]) -> None:
        super().__init__(daemon=True, name="sampler")
        self.model, self.scale, self.peak_rps, self.t0, self.in_flight = model, scale, peak_rps, t0, in_flight
        self.samples: list[Sample] = []
        self.stop = threading.Event()

    def run(self) -> None:
        from django.db import connection

        from apps.core import redis as redis_lib

        client = redis_lib.client()
        k = 0
        try:
            while not self.stop.is_set():
                due = self.t0 + k * SAMPLE_PERIOD_S
                if due - self.t0 >= self.scale.duration_s:
                    return
                self.stop.wait(max(0.0, due - time.monotonic()))
                self.samples.append(self._sample(k * SAMPLE_PERIOD_S, client))
                k += 1
        finally:
            connection.close()

    def _sample(self, t: float, client: Any) -> Sample:
        from django.db.models import Count, Sum

        from apps.fleet.models import Node, NodeStatus

        S = NodeStatus  # noqa: N806  # short alias, as in apps.fleet.models
        counts = dict(
            Node.objects.filter(model=self.model)
            .values_list("status")
            .annotate(n=Count("id"))
            .values_list("status", "n")
        )
        waiting = Node.objects.filter(model=self.model, status=S.READY).aggregate(w=Sum("requests_waiting"))["w"] or 0
        from apps.fleet import demand
        from apps.fleet.models import LIVE_STATUSES, ModelScale

        # Nodes holding a GPU machine (billed): pending .. draining, and stopping (not yet stopped).
        live = sum(counts.get(s, 0) for s in LIVE_STATUSES)
        held = demand.held_by_model(client).get(self.model.pk, 0)
        desired = ModelScale.objects.filter(model=self.model).values_list("desired", flat=True).first()
        return Sample(
            t=t,
            offered_rps=rate(self.scale.hour(t), self.peak_rps),
            live=live,
            ready=counts.get(S.READY, 0),
            starting=sum(counts.get(s, 0) for s in (S.PENDING, S.PROVISIONING, S.LOADING)),
            stopped=counts.get(S.STOPPED, 0),
            in_flight=self.in_flight[0],
            held=held,
            waiting=int(waiting),
            desired=desired,
        )


# --- the load ------------------------------------------------------------------------------------


async def _one(session: Any, url: str, body: bytes, headers: dict, o: Outcome, t0: float, in_flight: list[int]) -> None:
    import aiohttp

    in_flight[0] += 1
    started = time.monotonic()
    try:
        async with session.post(url, data=body, headers=headers) as resp:
            o.status = resp.status
            held = resp.headers.get("x-cold-start-wait-ms")
            o.held_ms = float(held) if held is not None else None
            if resp.status != 200:
                o.error = f"HTTP {resp.status}: {(await resp.read())[:120].decode(errors='replace')}"
                return
            buf = b""
            async for piece in resp.content.iter_any():
                buf += piece
                if b"\n\n" not in buf:
                    continue
                *events, buf = buf.split(b"\n\n")
                for event in events:
                    if event.startswith(DONE):
                        o.complete = True
                    elif b'"content":"' in event and EMPTY not in event:
                        if o.ttft_ms is None:
                            o.ttft_ms = (time.monotonic() - started) * 1000
                        o.tokens += 1
    except (aiohttp.ClientError, TimeoutError) as exc:
        o.error = f"{type(exc).__name__}"
    finally:
        in_flight[0] -= 1


async def replay(
    url: str,
    key: str,
    trace: list[float],
    max_tokens: int,
    t0: float,
    sent: list[float],
    in_flight: list[int],
    timeout_s: float,
) -> list[Outcome]:
    import json

    import aiohttp

    body = json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Tell me a story"}],
            "max_tokens": max_tokens,
            "stream": True,
        }
    ).encode()
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    outcomes = [Outcome(at=t) for t in trace]
    connector = aiohttp.TCPConnector(limit=0)
    tasks = []
    async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=timeout_s)) as session:
        for o in outcomes:
            delay = t0 + o.at - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            sent.append(time.monotonic() - t0)
            tasks.append(
                asyncio.ensure_future(_one(session, url + "/v1/chat/completions", body, headers, o, t0, in_flight))
            )
        await asyncio.gather(*tasks)
    return outcomes


# --- one policy, all policies --------------------------------------------------------------------


def node_capacity_rps(args: Any) -> float:
    """Requests per second one node serves at the policies' target load (target ongoing requests,
    each taking TTFT + (max_tokens - 1) x ITL)."""
    seconds = 0.05 + (args.max_tokens - 1) * args.itl_ms / 1000
    return args.target_ongoing / seconds


def run_policy(policy: str, *, scale: Scale, trace: list[float], env: dict, args: Any) -> PolicyResult:
    per_node = node_capacity_rps(args)
    static_nodes = max(1, math.ceil(args.peak_rps / per_node))
    max_nodes = static_nodes + 1
    fresh_database(env)
    cold = scale.delay(45.0)
    with ControlPlane(env) as cp:
        key, model = seed(
            policy=policy,
            static_nodes=static_nodes,
            max_nodes=max_nodes,
            target_ongoing=args.target_ongoing,
            scale=scale,
        )
        # The reconciler starts min_replicas: all of static's, the QPS policy's one; ours starts at 0.
        if policy == "static":
            wait_ready(model, static_nodes, timeout_s=60 + 10 * cold)
        elif policy.startswith("qps"):
            wait_ready(model, 1, timeout_s=60 + 10 * cold)
        print(f"  {policy}: fleet up, replaying the day ({static_nodes} node(s) at peak)", flush=True)
        t0 = time.monotonic() + 1.0
        wall_t0 = time.time() + 1.0
        sent: list[float] = []
        in_flight = [0]
        sampler = Sampler(model, scale, args.peak_rps, t0, in_flight)
        sampler.start()
        driver = None
        if policy.startswith("qps"):
            # "qps": SkyServe's delays divided like the cold start; "qps-day": like the day.
            divisor = scale.infra if policy == "qps" else scale.day_factor
            qps = QpsPolicy.skyserve_defaults(
                divisor, min_replicas=1, max_replicas=max_nodes, target_qps_per_replica=per_node
            )
            driver = QpsDriver(model, qps, scale, sent, t0)
            driver.start()
        timeout_s = float(env["GATEWAY_COLD_WAIT_S"]) + 60
        outcomes = asyncio.run(replay(cp.url, key, trace, args.max_tokens, t0, sent, in_flight, timeout_s))
        sampler.stop.set()
        sampler.join(10)
        if driver is not None:
            driver.stop.set()
            driver.join(10)
            for error in driver.errors[:5]:
                print(f"  qps policy error: {error}", flush=True)
        summary = summarize(policy, scale, outcomes, sampler.samples, SAMPLE_PERIOD_S)
        summary.cold_starts_s, summary.warm_starts_s = _start_times(model)
    print(
        f"  {policy}: {summary.requests} requests, {summary.failed} failed, "
        f"{summary.node_seconds:.0f} node-s, TTFT p50/p95 {summary.ttft_p50_ms or 0:.0f}/"
        f"{summary.ttft_p95_ms or 0:.0f} ms, {summary.held} held",
        flush=True,
    )
    from apps.fleet.models import ScaleDecision

    decisions = [
        (round(d.created_at.timestamp() - wall_t0, 2), d.desired, d.reason)
        for d in ScaleDecision.objects.filter(model=model).order_by("created_at")
    ]
    requests = [(round(o.at, 3), None if o.ttft_ms is None else round(o.ttft_ms, 1), o.failed) for o in outcomes]
    return PolicyResult(summary=summary, samples=sampler.samples, requests=requests, decisions=decisions)


def _start_times(model: Any) -> tuple[list[float], list[float]]:
    from apps.fleet.models import Node

    cold: list[float] = []
    warm: list[float] = []
    for node in Node.objects.filter(model=model, ready_at__isnull=False):
        w = getattr(node, "warm_start_seconds", None)
        if w is not None:
            warm.append(round(w, 2))
        elif node.cold_start_seconds is not None:
            cold.append(round(node.cold_start_seconds, 2))
    return cold, warm


def run_all(*, policies: list[str], scale: Scale, trace: list[float], env: dict, args: Any) -> dict[str, PolicyResult]:
    os.environ.update(env)
    prepare_template(env)
    import django

    django.setup()
    results: dict[str, PolicyResult] = {}
    for policy in policies:
        print(f"bench-autoscale: policy {policy}", flush=True)
        results[policy] = run_policy(policy, scale=scale, trace=trace, env=env, args=args)
    from django.db import connections

    connections.close_all()
    return results
