"""Processes and measurements for bench/gateway_bench.py: the throwaway database, the seed, the
gateway under uvicorn, CPU from /proc. Not a test."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse, urlunparse

ROOT = Path(__file__).resolve().parents[1]
CLK_TCK = os.sysconf("SC_CLK_TCK")


class Procs:
    """Every gateway started inside ``with Procs() as procs`` is stopped on the way out, whatever
    happened (failure, Ctrl-C)."""

    def __init__(self) -> None:
        self.items: list[subprocess.Popen] = []

    def __enter__(self) -> Procs:
        return self

    def __exit__(self, *exc: object) -> None:
        for proc in self.items:
            stop(proc)


def stop(proc: subprocess.Popen, sig: int = signal.SIGTERM) -> None:
    """Stop a process started with start_new_session (uvicorn's master and its workers together)."""
    if proc.poll() is not None:
        return
    try:
        os.killpg(proc.pid, sig)
        proc.wait(30)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(10)
    except ProcessLookupError:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tree_pids(pid: int) -> list[int]:
    pids = [pid]
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return pids
    for child in children:
        pids += _tree_pids(int(child))
    return pids


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process and its live descendants (uvicorn's master and workers)."""
    total = 0
    for p in _tree_pids(pid):
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime: fields 14 and 15 of proc(5)
    return total / CLK_TCK


def machine_busy() -> float:
    """CPU seconds the whole machine spent not idle (all processes, other users' too)."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]  # idle + iowait
    return (sum(fields[:8]) - idle) / CLK_TCK


def prepare_database(url: str, env: dict, redis_url: str) -> None:
    parsed = urlparse(url)
    if not parsed.scheme.startswith("sqlite"):
        import psycopg

        name = parsed.path.lstrip("/")
        admin = urlunparse(parsed._replace(path="/postgres"))
        with psycopg.connect(admin, autocommit=True) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
                conn.execute(f'CREATE DATABASE "{name}"')
    subprocess.run([sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"], cwd=ROOT, env=env, check=True)
    import redis

    # The bench's own Redis database: counters of an earlier run must not throttle this one.
    client = redis.Redis.from_url(redis_url)
    client.flushdb()
    client.close()


SEED = """
import django, json, sys
django.setup()
from apps.catalog.models import ServedModel
from apps.catalog.services import model_create
from apps.fleet.keys import SEALED_STATIC_KEY, seal_static_key
from apps.fleet.models import Node, NodeStatus
from apps.fleet.services import node_create, node_transition
from apps.tenancy.models import Tenant
from apps.tenancy.services import api_key_issue, tenant_create
model_name, sim_url, node_key = sys.argv[1:4]
big = dict(requests_per_minute=100_000_000, tokens_per_minute=2_000_000_000, max_concurrent_requests=100_000)
tenant = Tenant.objects.filter(slug="bench").first() or tenant_create(slug="bench", **big)
model = ServedModel.objects.filter(name=model_name).first() or model_create(name=model_name)
for old in Node.objects.filter(model=model, status=NodeStatus.READY):
    node_transition(node=old, to=NodeStatus.FAILED, reason="previous bench simulator")
node = node_create(model=model, launcher="static", endpoint_url=sim_url)
Node.objects.filter(pk=node.pk).update(launcher_state={SEALED_STATIC_KEY: seal_static_key(node_key)})
node_transition(node=node, to=NodeStatus.READY, reason="bench")
print(json.dumps(api_key_issue(tenant=tenant, name="bench", scopes=["inference"])[1]))
"""


def seed(env: dict, sim_url: str, *, model: str, node_key: str) -> str:
    """Tenant with limits far above the load, the model, one static ready node at the simulator
    (earlier bench nodes failed). Returns a fresh raw key."""
    out = subprocess.run(
        [sys.executable, "-c", SEED, model, sim_url, node_key],
        cwd=ROOT,
        env=env,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def start_gateway(
    env: dict, workers: int, procs: Procs, *, profile_to: Path | None = None
) -> tuple[subprocess.Popen, str]:
    """The server as in production (uvloop, the guarded httptools protocol, no access log); workers 0
    = one process without a supervising master (what --profile-only needs)."""
    port = _free_port()
    head = [sys.executable, "-m", "cProfile", "-o", str(profile_to)] if profile_to else [sys.executable]
    cmd = [
        *head,
        "-m",
        "crosslogic.serve",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--no-access-log",
        "--log-level",
        "warning",
        "--backlog",
        "4096",
    ]
    if workers:
        cmd += ["--workers", str(workers)]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True, stdin=subprocess.DEVNULL)
    procs.items.append(proc)
    url = f"http://127.0.0.1:{port}"
    import httpx

    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"the gateway did not start: {' '.join(cmd)}")
        time.sleep(0.2)


def wait_routed(url: str, key: str, model: str) -> None:
    """Until every worker routes the model (the routing table refreshes in the background)."""
    import httpx

    deadline = time.monotonic() + 30
    ok = 0
    while time.monotonic() < deadline:
        models = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=5).json()
        ok = ok + 1 if any(m["id"] == model and m.get("ready") for m in models.get("data", [])) else 0
        if ok >= 8:  # several answers in a row: with several workers, each one had its say
            return
        time.sleep(0.1)
    raise RuntimeError("the gateway never routed the bench model")
