"""Side-by-side benchmark of the gateway against the vLLM simulator it fronts (not a test).

One run, same machine, same moment: the load generator (aiohttp, in its own process) drives
16, 64 and 256 concurrent streaming chat requests directly at a simulator (--itl-ms 20) and
through the gateway (uvicorn, uvloop + httptools), alternating direct/gateway round by round;
then flat-out streaming through a second simulator with --itl-ms 0 (the gateway's saturation
throughput) and non-streaming requests/s. Reports tokens/s through the gateway ÷ direct, the
TTFT the gateway adds (p50/p99), and the gateway's CPU per 1,000 tokens (from /proc/<pid>/stat
of the uvicorn processes), prints a table and writes it into docs/benchmarks.md.

It seeds its own database (DATABASE_URL's server, database ``crosslogic_bench``; or a SQLite
file next to a SQLite DATABASE_URL) so that no development data is touched, and uses
REDIS_URL's server (database 14 unless --redis-url says otherwise).

    make bench                                   # full run (several minutes, quiet machine)
    .venv/bin/python bench/gateway_bench.py --quick   # small, proves it works (~1 minute)
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import re
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlparse, urlunparse

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
MODEL = "bench-model"
NODE_KEY = "bench-node-key"
DOC = ROOT / "docs" / "benchmarks.md"
SECTION = "## Gateway streaming proxy"
CLK_TCK = os.sysconf("SC_CLK_TCK")


# --- load generator (runs in its own process: `gateway_bench.py --loadgen '<json spec>'`) ---
async def _one_stream(session, url: str, body: bytes, headers: dict, out: dict) -> None:
    started = time.perf_counter()
    first: float | None = None
    tokens = 0
    async with session.post(url, data=body, headers=headers) as resp:
        if resp.status != 200:
            out["errors"] += 1
            await resp.read()
            return
        buf = b""
        async for piece in resp.content.iter_any():
            buf += piece
            if b"\n\n" not in buf:
                continue
            *events, buf = buf.split(b"\n\n")
            for event in events:
                # Content chunks carry a delta with "content"; the role chunk and [DONE] do not.
                if b'"content":"' in event or b'"text":"' in event:
                    if first is None:
                        first = time.perf_counter()
                    tokens += 1
    if first is not None:
        out["ttft"].append((first - started) * 1000)
    out["tokens"] += tokens
    out["requests"] += 1


async def _one_json(session, url: str, body: bytes, headers: dict, out: dict) -> None:
    async with session.post(url, data=body, headers=headers) as resp:
        data = await resp.read()
        if resp.status != 200:
            out["errors"] += 1
            return
    out["tokens"] += json.loads(data)["usage"]["completion_tokens"]
    out["requests"] += 1


async def _drive(spec: dict) -> dict:
    import aiohttp

    stream = spec["stream"]
    url = spec["base_url"] + "/v1/chat/completions"
    body = json.dumps({"model": MODEL, "messages": [{"role": "user", "content": "Tell me a long story."}],
                       "max_tokens": spec["max_tokens"], "stream": stream}).encode()
    headers = {"Authorization": f"Bearer {spec['api_key']}", "Content-Type": "application/json"}
    out = {"tokens": 0, "requests": 0, "errors": 0, "ttft": []}
    one = _one_stream if stream else _one_json
    deadline = time.perf_counter() + spec["seconds"]
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=60)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        async def slot() -> None:
            while time.perf_counter() < deadline:
                try:
                    await one(session, url, body, headers, out)
                except (aiohttp.ClientError, TimeoutError):
                    out["errors"] += 1

        started = time.perf_counter()
        await asyncio.gather(*(slot() for _ in range(spec["concurrency"])))
        out["seconds"] = time.perf_counter() - started
    return out


def loadgen_main(spec_json: str) -> None:
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    print(json.dumps(asyncio.run(_drive(json.loads(spec_json)))))


# --- orchestration ----------------------------------------------------------------------
@dataclass
class Round:
    tokens: int
    requests: int
    errors: int
    seconds: float
    ttft: list[float]
    cpu_s: float = 0.0

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def req_s(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


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


def _cpu_seconds(pid: int) -> float:
    """utime + stime of a process and all its live descendants (uvicorn's master and workers)."""
    total = 0
    for p in _tree_pids(pid):
        try:
            stat = Path(f"/proc/{p}/stat").read_text()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        total += int(fields[11]) + int(fields[12])  # utime, stime (fields 14 and 15 of stat)
    return total / CLK_TCK


def bench_database_url(url: str) -> str:
    parsed = urlparse(url)
    if parsed.scheme.startswith("sqlite"):
        return f"sqlite:///{Path(parsed.path).with_name('bench.sqlite3')}"
    return urlunparse(parsed._replace(path="/crosslogic_bench"))


def prepare_database(url: str, env: dict) -> None:
    parsed = urlparse(url)
    if not parsed.scheme.startswith("sqlite"):
        import psycopg

        admin = urlunparse(parsed._replace(path="/postgres"))
        with psycopg.connect(admin, autocommit=True) as conn:
            if not conn.execute("SELECT 1 FROM pg_database WHERE datname = 'crosslogic_bench'").fetchone():
                conn.execute("CREATE DATABASE crosslogic_bench")
    subprocess.run([sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"], cwd=ROOT, env=env, check=True)


def seed(env: dict, sim_url: str) -> str:
    """Tenant with limits far above the load, the model, one static ready node. Returns a raw key."""
    code = f"""
import django, json
django.setup()
from apps.catalog.models import Model
from apps.catalog.services import model_create
from apps.fleet.models import Node, NodeStatus
from apps.fleet.services import node_create, node_transition
from apps.tenancy.models import Tenant
from apps.tenancy.services import api_key_issue, tenant_create
big = dict(requests_per_minute=100_000_000, tokens_per_minute=2_000_000_000, max_concurrent_requests=100_000)
tenant = Tenant.objects.filter(slug="bench").first() or tenant_create(slug="bench", **big)
model = Model.objects.filter(name={MODEL!r}).first() or model_create(name={MODEL!r})
for old in Node.objects.filter(model=model, status=NodeStatus.READY):
    node_transition(node=old, to=NodeStatus.FAILED, reason="previous bench run")
node = node_create(model=model, launcher="static", endpoint_url={sim_url!r})
Node.objects.filter(pk=node.pk).update(launcher_state={{"static_api_key": {NODE_KEY!r}}})
node_transition(node=node, to=NodeStatus.READY, reason="bench")
print(json.dumps(api_key_issue(tenant=tenant, name="bench", scopes=["inference"])[1]))
"""
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def start_gateway(env: dict, workers: int) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "uvicorn", "crosslogic.asgi:application", "--host", "127.0.0.1", "--port", str(port),
           "--workers", str(workers), "--loop", "uvloop", "--http", "httptools", "--no-access-log",
           "--log-level", "warning", "--backlog", "4096"]
    proc = subprocess.Popen(cmd, cwd=ROOT, env=env, start_new_session=True)
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
            raise RuntimeError("the gateway did not start")
        time.sleep(0.2)


def wait_routed(url: str, key: str) -> None:
    import httpx

    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        models = httpx.get(url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=5).json()
        if any(m["id"] == MODEL and m.get("ready") for m in models.get("data", [])):
            return
        time.sleep(0.2)
    raise RuntimeError("the gateway never routed the bench model")


def drive(*, base_url: str, key: str, concurrency: int, seconds: float, stream: bool, max_tokens: int,
          gateway_pid: int | None) -> Round:
    spec = dict(base_url=base_url, api_key=key, concurrency=concurrency, seconds=seconds, stream=stream,
                max_tokens=max_tokens)
    cpu0 = _cpu_seconds(gateway_pid) if gateway_pid else 0.0
    out = subprocess.run([sys.executable, __file__, "--loadgen", json.dumps(spec)], cwd=ROOT, check=True,
                         capture_output=True, text=True, timeout=seconds + 120)
    cpu1 = _cpu_seconds(gateway_pid) if gateway_pid else 0.0
    data = json.loads(out.stdout.strip().splitlines()[-1])
    return Round(tokens=data["tokens"], requests=data["requests"], errors=data["errors"], seconds=data["seconds"],
                 ttft=data["ttft"], cpu_s=cpu1 - cpu0)


def merge(rounds: list[Round]) -> Round:
    return Round(tokens=sum(r.tokens for r in rounds), requests=sum(r.requests for r in rounds),
                 errors=sum(r.errors for r in rounds), seconds=sum(r.seconds for r in rounds),
                 ttft=[t for r in rounds for t in r.ttft], cpu_s=sum(r.cpu_s for r in rounds))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short rounds (proves it works on a busy machine)")
    parser.add_argument("--concurrency", default=None, help="comma-separated, default 16,64,256")
    parser.add_argument("--seconds", type=float, default=None, help="length of one round (default 20, quick 3)")
    parser.add_argument("--rounds", type=int, default=None, help="direct/gateway pairs per level (default 2, quick 1)")
    parser.add_argument("--workers", type=int, default=int(os.environ.get("GATEWAY_BENCH_WORKERS", "1")))
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--database-url", default=None)
    parser.add_argument("--redis-url", default=None)
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    args = parser.parse_args()
    seconds = args.seconds or (3.0 if args.quick else 20.0)
    rounds = args.rounds or (1 if args.quick else 2)
    levels = [int(c) for c in (args.concurrency or ("16,64" if args.quick else "16,64,256")).split(",")]

    from apps.gateway.simulator_process import run_simulator_process

    source_db = args.database_url or os.environ.get("DATABASE_URL") or f"sqlite:///{ROOT / 'var' / 'db.sqlite3'}"
    db_url = bench_database_url(source_db) if not args.database_url else args.database_url
    redis_url = args.redis_url or urlunparse(urlparse(os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379")
                                              ._replace(path="/14"))
    env = {**os.environ, "DATABASE_URL": db_url, "REDIS_URL": redis_url, "LOG_LEVEL": "WARNING",
           "DJANGO_SETTINGS_MODULE": "crosslogic.settings", "PYTHONPATH": str(ROOT)}
    print(f"bench: database {db_url.split('@')[-1]}, Redis {redis_url}, {args.workers} gateway worker(s), "
          f"levels {levels}, {rounds} round(s) of {seconds:.0f}s", flush=True)
    prepare_database(db_url, env)

    results: dict[str, object] = {}
    with run_simulator_process(model=MODEL, api_key=NODE_KEY, itl_ms=20, ttft_ms=50, light=True,
                               max_num_seqs=1024, kv_cache_tokens=10_000_000) as sim:
        key = seed(env, sim.url)
        gw, gw_url = start_gateway(env, args.workers)
        try:
            wait_routed(gw_url, key)
            drive(base_url=gw_url, key=key, concurrency=8, seconds=1, stream=True, max_tokens=8, gateway_pid=None)
            for level in levels:
                direct, through = [], []
                for _ in range(rounds):
                    direct.append(drive(base_url=sim.url, key=NODE_KEY, concurrency=level, seconds=seconds,
                                        stream=True, max_tokens=args.max_tokens, gateway_pid=None))
                    through.append(drive(base_url=gw_url, key=key, concurrency=level, seconds=seconds,
                                         stream=True, max_tokens=args.max_tokens, gateway_pid=gw.pid))
                d, g = merge(direct), merge(through)
                results[f"stream-{level}"] = (d, g)
                print(f"  {level:>4} streams: direct {d.tok_s:8.0f} tok/s, gateway {g.tok_s:8.0f} tok/s, "
                      f"ratio {g.tok_s / d.tok_s:.3f}, TTFT p50 +{_pct(g.ttft, .5) - _pct(d.ttft, .5):.1f} ms, "
                      f"p99 +{_pct(g.ttft, .99) - _pct(d.ttft, .99):.1f} ms, errors {d.errors}/{g.errors}", flush=True)
        finally:
            os.killpg(gw.pid, signal.SIGTERM)
            gw.wait(30)

    with run_simulator_process(model=MODEL, api_key=NODE_KEY, itl_ms=0, ttft_ms=0, light=True,
                               max_num_seqs=1024, kv_cache_tokens=10_000_000) as fast:
        key = seed(env, fast.url)
        gw, gw_url = start_gateway(env, args.workers)
        try:
            wait_routed(gw_url, key)
            flat = 64
            for name, stream, max_tokens in (("saturation", True, args.max_tokens), ("nonstream", False, 16)):
                d = drive(base_url=fast.url, key=NODE_KEY, concurrency=flat, seconds=seconds, stream=stream,
                          max_tokens=max_tokens, gateway_pid=None)
                g = drive(base_url=gw_url, key=key, concurrency=flat, seconds=seconds, stream=stream,
                          max_tokens=max_tokens, gateway_pid=gw.pid)
                results[name] = (d, g)
                unit = (f"{d.tok_s:.0f} / {g.tok_s:.0f} tok/s" if stream else f"{d.req_s:.0f} / {g.req_s:.0f} req/s")
                print(f"  {name} ({flat} clients, itl 0): direct / gateway {unit}, errors {d.errors}/{g.errors}",
                      flush=True)
        finally:
            os.killpg(gw.pid, signal.SIGTERM)
            gw.wait(30)

    table = render(results, args=args, seconds=seconds, rounds=rounds)
    print(table)
    if not args.no_write:
        write_doc(table)
        print(f"bench: wrote {DOC.relative_to(ROOT)}")


def render(results: dict, *, args: argparse.Namespace, seconds: float, rounds: int) -> str:
    when = datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        SECTION, "",
        f"`bench/gateway_bench.py{' --quick' if args.quick else ''}` on {platform.machine()} / Python "
        f"{platform.python_version()}, {os.cpu_count()} cores, {when}; {args.workers} gateway worker(s) (uvicorn, "
        f"uvloop + httptools); simulator, gateway and load generator share the cores. Streams of "
        f"{args.max_tokens} tokens, simulator TTFT 50 ms and 20 ms between tokens; {rounds} alternating "
        f"direct/gateway round(s) of {seconds:.0f} s per level."
        + (" **Quick run on a busy machine: proves the bench works, not the targets.**" if args.quick else ""),
        "",
        "| concurrent streams | direct tok/s | gateway tok/s | ratio | TTFT added p50 | TTFT added p99 "
        "| gateway CPU ms / 1k tokens | errors (direct/gateway) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for name, (d, g) in results.items():
        if not name.startswith("stream-"):
            continue
        cpu = g.cpu_s * 1000 / (g.tokens / 1000) if g.tokens else float("nan")
        p50, p99 = _pct(g.ttft, .5) - _pct(d.ttft, .5), _pct(g.ttft, .99) - _pct(d.ttft, .99)
        lines.append(f"| {name[7:]} | {d.tok_s:,.0f} | {g.tok_s:,.0f} | **{g.tok_s / d.tok_s:.3f}** "
                     f"| {p50:+.1f} ms | {p99:+.1f} ms | {cpu:.1f} | {d.errors}/{g.errors} |")
    if "saturation" in results:
        d, g = results["saturation"]
        n, ng = results["nonstream"]
        cpu = g.cpu_s * 1000 / (g.tokens / 1000) if g.tokens else float("nan")
        lines += [
            "",
            "Flat out (simulator with `--itl-ms 0 --ttft-ms 0`, 64 clients):",
            "",
            "| | direct | gateway | ratio |",
            "|---|---|---|---|",
            f"| streaming tok/s | {d.tok_s:,.0f} | {g.tok_s:,.0f} | {g.tok_s / d.tok_s:.2f} |",
            f"| non-streaming req/s (16 tokens) | {n.req_s:,.0f} | {ng.req_s:,.0f} | {ng.req_s / n.req_s:.2f} |",
            "",
            f"Gateway CPU flat out: {cpu:.1f} ms per 1,000 streamed tokens.",
        ]
    lines += ["", "Targets: ratio >= 0.97 at 256 streams; TTFT added <= 2 ms p50 and <= 10 ms p99 at 64 streams.", ""]
    return "\n".join(lines)


def write_doc(table: str) -> None:
    text = DOC.read_text() if DOC.exists() else "# Benchmarks\n"
    pattern = re.compile(re.escape(SECTION) + r".*?(?=^## |\Z)", re.S | re.M)
    if pattern.search(text):
        text = pattern.sub(lambda _: table + "\n", text)
    else:
        text = text.rstrip("\n") + "\n\n" + table + "\n"
    DOC.write_text(text)


if __name__ == "__main__":
    if len(sys.argv) == 3 and sys.argv[1] == "--loadgen":
        loadgen_main(sys.argv[2])
    else:
        main()
