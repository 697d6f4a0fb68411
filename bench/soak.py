"""Soak test of the gateway (not a test, not in CI): ``make soak`` (30 minutes) or
``.venv/bin/python bench/soak.py --minutes 3`` (a short run).

What runs: a throwaway PostgreSQL and Redis of its own (tests/faults/servers.py; the machine's
servers are not used, so Redis's ``used_memory`` is the gateway's alone), one vLLM simulator
(``--ttft-ms 50 --itl-ms 20``), the gateway as in production (``python -m crosslogic.serve
--workers 2``). The load: ``--streams`` (64) streaming chat requests of ``--max-tokens`` (64)
tokens back to back, plus a trickle of bad input (one hostile request every ``--bad-every``
seconds: broken JSON, a wrong key, an unknown model, a lone surrogate, JSON nested 100,000 deep,
a prompt beyond the context, a 1 MiB header).

Sampled once a minute: each gateway worker's RSS and open file descriptors (/proc), Redis
``used_memory`` and key count, p50/p99 TTFT of the streams started in that minute, requests,
errors. Pass/fail, baseline = the first full minute after ``--warmup-minutes`` (1):
- RSS growth of every worker < 5 % (last minute against the baseline);
- open fds flat: summed over the workers, the last minute at most baseline + 16 (64 client
  streams come and go, and move between workers);
- Redis memory flat: the last minute at most max(baseline * 1.05, baseline + 1 MiB);
- p99 TTFT stable: the median p99 of the last 5 minutes at most 2x the first 5 minutes'
  (the machine may be shared: the table says how busy it was);
- no 5xx, every stream ended with [DONE] or an error event, every stream has exactly one usage
  record at the end.
Exit status 0 when all pass, 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._gateway_procs import Procs, machine_busy, prepare_database, seed, start_gateway, wait_routed  # noqa: E402
from bench._gateway_report import pct  # noqa: E402

MODEL = "soak-model"
NODE_KEY = "soak-node-key"
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE = os.sysconf("SC_PAGE_SIZE")


@dataclass
class Minute:
    ttft_ms: list[float] = field(default_factory=list)
    streams: int = 0
    stream_errors: int = 0  # ended with an error event or a non-200 answer (never a 5xx: counted apart)
    bad_requests: int = 0
    server_errors: int = 0  # 5xx from the gateway, streams and bad input together
    unclean: int = 0  # a stream that ended without [DONE] or an error event


@dataclass
class Run:
    minutes: list[Minute] = field(default_factory=list)
    samples: list[dict] = field(default_factory=list)
    request_ids: list[str] = field(default_factory=list)
    samples_5xx: list[str] = field(default_factory=list)
    samples_unclean: list[str] = field(default_factory=list)
    bad_statuses: dict[str, int] = field(default_factory=dict)

    def now(self) -> Minute:
        return self.minutes[-1]


def bad_inputs(key: str) -> list[tuple[str, dict, bytes]]:
    auth = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    ok = {"model": MODEL, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2}
    deep = b'{"model":"' + MODEL.encode() + b'","messages":' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    return [
        ("broken json", auth, b'{"model": "soak-model", "messages": [{'),
        ("wrong key", {**auth, "Authorization": "Bearer sk-cl-nope"}, json.dumps(ok).encode()),
        ("unknown model", auth, json.dumps({**ok, "model": "no-such-model"}).encode()),
        ("lone surrogate", auth, json.dumps({**ok, "messages": [{"role": "user", "content": "\ud800"}]}).encode()),
        ("nested 100k", auth, deep),
        ("beyond context", auth, json.dumps({**ok, "max_tokens": 10_000_000}).encode()),
        ("1 MiB header", {**auth, "X-Junk": "a" * 2**20}, json.dumps(ok).encode()),
        ("messages not a list", auth, json.dumps({**ok, "messages": "hi"}).encode()),
    ]


async def stream_slot(session, url: str, headers: dict, body: bytes, run: Run, stop_at: float) -> None:
    import aiohttp

    while time.monotonic() < stop_at:
        minute = run.now()
        started = time.monotonic()
        try:
            async with session.post(url, data=body, headers=headers) as resp:
                rid = resp.headers.get("x-request-id", "")
                if resp.status >= 500:
                    minute.server_errors += 1
                    run.samples_5xx.append(f"stream HTTP {resp.status}: {(await resp.read())[:200]!r}")
                    continue
                if resp.status != 200:
                    minute.stream_errors += 1
                    await resp.read()
                    if rid:
                        run.request_ids.append(rid)
                    continue
                run.request_ids.append(rid)
                first, buf, end = None, b"", None
                async for piece in resp.content.iter_any():
                    buf += piece
                    if first is None and b'"content":"' in buf.replace(b'"content":""', b""):
                        first = time.monotonic()
                    if buf.endswith(b"data: [DONE]\n\n"):
                        end = "done"
                if end is None and b'"error"' in buf[-2000:]:
                    end = "error"
                minute.streams += 1
                if end == "error":
                    minute.stream_errors += 1
                elif end is None:
                    minute.unclean += 1
                    run.samples_unclean.append(buf[-200:].decode(errors="replace"))
                if first is not None:
                    minute.ttft_ms.append((first - started) * 1000)
        except (aiohttp.ClientError, TimeoutError) as exc:
            minute.unclean += 1
            run.samples_unclean.append(repr(exc)[:200])
            await asyncio.sleep(0.5)


async def bad_trickle(session, url: str, key: str, run: Run, stop_at: float, every_s: float) -> None:
    import aiohttp

    cases = bad_inputs(key)
    i = 0
    while time.monotonic() < stop_at:
        await asyncio.sleep(every_s)
        name, headers, body = cases[i % len(cases)]
        i += 1
        try:
            async with session.post(url, data=body, headers=headers) as resp:
                data = await resp.read()
        except aiohttp.ClientError as exc:  # a closed connection is a fair answer to a 1 MiB header
            run.bad_statuses[f"{name}: {type(exc).__name__}"] = (
                run.bad_statuses.get(f"{name}: {type(exc).__name__}", 0) + 1
            )
            continue
        run.now().bad_requests += 1
        label = f"{name}: {resp.status}"
        run.bad_statuses[label] = run.bad_statuses.get(label, 0) + 1
        if resp.status >= 500:
            run.now().server_errors += 1
            run.samples_5xx.append(f"{name} HTTP {resp.status}: {data[:200]!r}")


def worker_pids(master: int) -> list[int]:
    """uvicorn's worker processes (spawned by multiprocessing), not its resource tracker."""
    try:
        children = [int(p) for p in Path(f"/proc/{master}/task/{master}/children").read_text().split()]
    except OSError:
        return []
    return sorted(p for p in children if b"spawn_main" in Path(f"/proc/{p}/cmdline").read_bytes())


def rss_mib(pid: int) -> float:
    return int(Path(f"/proc/{pid}/statm").read_text().split()[1]) * PAGE / 2**20


def open_fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


def sample(master: int, redis_client, run: Run, busy0: float, wall0: float) -> dict:
    info = redis_client.info("memory")
    workers = worker_pids(master)
    minute = run.now()
    busy = machine_busy()
    row = {
        "minute": len(run.minutes),
        "rss_mib": {pid: round(rss_mib(pid), 1) for pid in workers},
        "fds": {pid: open_fds(pid) for pid in workers},
        "redis_used": int(info["used_memory"]),
        "redis_keys": int(redis_client.dbsize()),
        "streams": minute.streams,
        "p50": pct(minute.ttft_ms, 0.5),
        "p99": pct(minute.ttft_ms, 0.99),
        "stream_errors": minute.stream_errors,
        "bad": minute.bad_requests,
        "5xx": minute.server_errors,
        "unclean": minute.unclean,
        "machine_busy_pct": round((busy - busy0) / (time.monotonic() - wall0) * 100 / os.cpu_count(), 0),
        "loadavg": os.getloadavg()[0],
    }
    run.samples.append(row)
    return row


def line(row: dict) -> str:
    rss = "/".join(f"{v:.0f}" for v in row["rss_mib"].values())
    fds = "/".join(str(v) for v in row["fds"].values())
    return (
        f"| {row['minute']:>3} | {rss:>9} | {fds:>7} | {row['redis_used'] / 2**20:7.2f} | {row['redis_keys']:>5} "
        f"| {row['streams']:>6} | {row['p50']:7.0f} | {row['p99']:7.0f} | {row['stream_errors']:>4} "
        f"| {row['bad']:>3} | {row['5xx']:>3} | {row['unclean']:>3} | {row['machine_busy_pct']:>4.0f} "
        f"| {row['loadavg']:4.1f} |"
    )


HEADER = (
    "| min | RSS MiB (per worker) | fds | Redis MiB | keys | streams | TTFT p50 ms | p99 ms | err | bad | 5xx "
    "| unclean | machine busy % | load |\n"
    "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"
)


async def drive(args: argparse.Namespace, gw_url: str, key: str, master: int, redis_client, run: Run) -> None:
    import aiohttp

    url = gw_url + "/v1/chat/completions"
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    body = json.dumps(
        {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": args.max_tokens,
            "stream": True,
        }
    ).encode()
    total_minutes = args.warmup_minutes + args.minutes
    start = time.monotonic()
    stop_at = start + total_minutes * 60
    run.minutes.append(Minute())
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=60)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        tasks = [
            asyncio.create_task(stream_slot(session, url, headers, body, run, stop_at)) for _ in range(args.streams)
        ]
        tasks.append(asyncio.create_task(bad_trickle(session, url, key, run, stop_at, args.bad_every)))
        print(HEADER, flush=True)
        busy0, wall0 = machine_busy(), time.monotonic()
        for m in range(1, total_minutes + 1):
            await asyncio.sleep(max(0.0, start + m * 60 - time.monotonic()))
            row = await asyncio.to_thread(sample, master, redis_client, run, busy0, wall0)
            busy0, wall0 = machine_busy(), time.monotonic()
            row["warmup"] = m <= args.warmup_minutes
            print(line(row) + (" warm-up" if row["warmup"] else ""), flush=True)
            run.minutes.append(Minute())
        await asyncio.gather(*tasks)


def verdict(run: Run, db_url: str, args: argparse.Namespace) -> list[tuple[str, bool, str]]:
    import psycopg

    rows = [r for r in run.samples if not r["warmup"]]
    base, last = rows[0], rows[-1]
    checks = []
    growth = {pid: (last["rss_mib"].get(pid, 0) - v) / v * 100 for pid, v in base["rss_mib"].items()}
    checks.append(
        (
            "worker RSS growth < 5 %",
            all(g < 5 for g in growth.values()) and set(base["rss_mib"]) == set(last["rss_mib"]),
            ", ".join(
                f"{base['rss_mib'][p]:.0f} → {last['rss_mib'].get(p, 0):.0f} MiB ({g:+.1f} %)"
                for p, g in growth.items()
            ),
        )
    )
    # Summed over the workers: the kernel hands new connections to either worker, so one worker's
    # count moves while the total holds.
    fds0, fds1 = sum(base["fds"].values()), sum(last["fds"].values())
    checks.append(("open fds flat (all workers, <= baseline + 16)", fds1 <= fds0 + 16, f"{fds0} -> {fds1}"))
    limit = max(base["redis_used"] * 1.05, base["redis_used"] + 2**20)
    checks.append(
        (
            "Redis memory flat",
            last["redis_used"] <= limit,
            f"{base['redis_used'] / 2**20:.2f} → {last['redis_used'] / 2**20:.2f} MiB "
            f"(keys {base['redis_keys']} → {last['redis_keys']})",
        )
    )
    head = sorted(r["p99"] for r in rows[:5])
    tail = sorted(r["p99"] for r in rows[-5:])
    first_p99, last_p99 = head[len(head) // 2], tail[len(tail) // 2]
    checks.append(
        (
            "p99 TTFT stable (last 5 min ≤ 2 × first 5 min)",
            last_p99 <= 2 * first_p99,
            f"{first_p99:.0f} → {last_p99:.0f} ms",
        )
    )
    n5xx = sum(r["5xx"] for r in run.samples)
    checks.append(("no 5xx", n5xx == 0, f"{n5xx}" + (f": {run.samples_5xx[0]}" if run.samples_5xx else "")))
    unclean = sum(r["unclean"] for r in run.samples)
    checks.append(
        (
            "every stream ended with [DONE] or an error event",
            unclean == 0,
            f"{unclean} unclean" + (f": {run.samples_unclean[0]}" if run.samples_unclean else ""),
        )
    )
    ids = [i for i in run.request_ids if i]
    deadline = time.monotonic() + 30
    with psycopg.connect(db_url, autocommit=True) as conn:
        while True:  # the recorder flushes in batches: give it a moment
            found = conn.execute(
                "SELECT count(*) FROM metering_usagerecord WHERE request_id = ANY(%s)", [ids]
            ).fetchone()[0]
            if found == len(ids) or time.monotonic() > deadline:
                break
            time.sleep(1)
    checks.append(("every stream has one usage record", found == len(ids), f"{found} of {len(ids)}"))
    return checks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--minutes", type=int, default=30, help="measured minutes (default 30), after the warm-up")
    parser.add_argument("--warmup-minutes", type=int, default=1)
    parser.add_argument("--streams", type=int, default=64)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--bad-every", type=float, default=2.0, help="seconds between two bad requests")
    parser.add_argument("--workers", type=int, default=2, help="gateway worker processes (default 2)")
    parser.add_argument("--json", type=Path, default=None, help="also write the samples and verdict here")
    args = parser.parse_args()
    if args.minutes < 5:
        print("soak: note: with fewer than 5 minutes the TTFT comparison uses overlapping windows", flush=True)

    from tests.faults.deployment import production_env
    from tests.faults.servers import ThrowawayPostgres, ThrowawayRedis
    from vllm_sim import run_simulator_process

    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    import redis

    started = time.time()
    with ThrowawayPostgres() as pg, ThrowawayRedis() as rds, Procs() as procs:
        db_url = pg.url_for("crosslogic_soak")
        # Production-like: DEBUG off (Django keeps no query log), secrets made up for the run.
        env = production_env(
            DATABASE_URL=db_url,
            REDIS_URL=rds.url(0),
            CELERY_BROKER_URL=rds.url(0),
            GATEWAY_TENANT_INFLIGHT_PER_NODE="100000",  # one tenant drives every stream
        )
        prepare_database(db_url, env, rds.url(0))
        with run_simulator_process(
            model=MODEL, api_key=NODE_KEY, light=True, itl_ms=20, ttft_ms=50, max_num_seqs=4096,
            kv_cache_tokens=100_000_000, max_model_len=4096,
        ) as sim:  # fmt: skip
            key = seed(env, sim.url, model=MODEL, node_key=NODE_KEY)
            gw, gw_url = start_gateway(env, args.workers, procs)
            wait_routed(gw_url, key, MODEL)
            client = redis.Redis.from_url(rds.url(0))
            print(
                f"soak: {args.streams} streams of {args.max_tokens} tokens + a bad request every {args.bad_every:g} s, "
                f"{args.workers} gateway workers, {args.warmup_minutes} + {args.minutes} minutes; "
                f"{os.cpu_count()} CPUs, load {os.getloadavg()[0]:.1f}",
                flush=True,
            )
            run = Run()
            try:
                import uvloop

                uvloop.run(drive(args, gw_url, key, gw.pid, client, run))
            except ImportError:
                asyncio.run(drive(args, gw_url, key, gw.pid, client, run))
            checks = verdict(run, db_url, args)
    print()
    for name, ok, detail in checks:
        print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}")
    print("bad input answers: " + ", ".join(f"{k} ×{v}" for k, v in sorted(run.bad_statuses.items())))
    print(f"soak: {(time.time() - started) / 60:.1f} minutes in all")
    if args.json:
        args.json.write_text(
            json.dumps({"args": vars(args) | {"json": str(args.json)}, "samples": run.samples, "checks": checks,
                        "bad_statuses": run.bad_statuses}, indent=1, default=str)
        )  # fmt: skip
    return 0 if all(ok for _, ok, _ in checks) else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except KeyboardInterrupt:
        print("soak: interrupted; every process it started is stopped", file=sys.stderr)
        sys.exit(130)
