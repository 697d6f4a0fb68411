"""Side-by-side benchmark of the gateway against the vLLM simulator it fronts (not a test).

One run, same machine, same moment. A load generator (bench/_loadgen.py: aiohttp on uvloop, in
its own process) drives 16, 64 and 256 concurrent streaming chat requests of 128 tokens directly
at a simulator (--ttft-ms 50 --itl-ms 20) and through the gateway (uvicorn, uvloop + httptools),
alternating direct/gateway round by round; then, against a simulator with --itl-ms 0 --ttft-ms 0,
the gateway's saturation throughput (streamed tokens/s) and non-streaming requests/s, again
alternating. It reports tokens/s through the gateway ÷ direct, the TTFT the gateway adds
(p50/p99), the gateway's CPU per 1,000 tokens (utime + stime from /proc/<pid>/stat of uvicorn's
master and workers, read before and after each gateway round), and checks every answer (each
stream ends with [DONE] and carries exactly max_tokens tokens; one answer compared event by
event, direct against gateway). Prints a table and writes it into docs/benchmarks.md (## Gateway).

It seeds its own PostgreSQL database ``crosslogic_bench`` on DATABASE_URL's server (or a SQLite
file next to a SQLite DATABASE_URL), so no development data is touched, and flushes and uses one
Redis database of REDIS_URL's server (--redis-db, default 14).

    make bench                                           # full run, about 5 minutes
    .venv/bin/python bench/gateway_bench.py --quick --no-write   # smoke run, about 1 minute
    .venv/bin/python bench/gateway_bench.py --profile-only       # cProfile of one worker at 256 streams
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse, urlunparse

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench import _gateway_extra as costs  # noqa: E402
from bench import _gateway_report as report  # noqa: E402
from bench._gateway_procs import (  # noqa: E402
    Procs,
    cpu_seconds,
    machine_busy,
    prepare_database,
    seed,
    start_gateway,
    stop,
    wait_routed,
)

MODEL = "bench-model"
NODE_KEY = "bench-node-key"
LOADGEN = ROOT / "bench" / "_loadgen.py"


def drive(
    *,
    base_url: str,
    key: str,
    concurrency: int,
    seconds: float,
    ramp_s: float,
    stream: bool,
    max_tokens: int,
    procs: int,
    watch: dict[str, int],
    redis_url: str | None = None,
) -> dict:
    """One round: ``procs`` load generator processes share the slots; CPU of the watched pids is read
    before and after, and with ``redis_url`` the commands Redis ran (INFO commandstats); the
    gateway's RSS is sampled. Returns the merged result."""
    procs = max(1, min(procs, concurrency))
    calls0 = costs.command_calls(redis_url) if redis_url else {}
    rss0 = costs.rss_bytes(watch["gateway"]) if "gateway" in watch else 0
    rss = costs.RssPeak(watch["gateway"]) if "gateway" in watch else contextlib.nullcontext()
    start_at = time.monotonic() + 0.5 + 0.1 * procs  # room for the interpreters to start
    cpu0 = {name: cpu_seconds(pid) for name, pid in watch.items()}
    busy0, wall0 = machine_busy(), time.monotonic()
    children = []
    share, extra = divmod(concurrency, procs)
    offset = 0
    for i in range(procs):
        n = share + (1 if i < extra else 0)
        spec = dict(
            base_url=base_url,
            api_key=key,
            model=MODEL,
            concurrency=n,
            slot_offset=offset,
            total_slots=concurrency,
            seconds=seconds,
            ramp_s=ramp_s,
            grace_s=ramp_s + 30,
            stream=stream,
            max_tokens=max_tokens,
            start_at=start_at,
        )
        offset += n
        children.append(
            subprocess.Popen(
                [sys.executable, str(LOADGEN), json.dumps(spec)], cwd=ROOT, stdout=subprocess.PIPE, text=True
            )
        )
    outs = []
    try:
        with rss:
            for child in children:
                stdout, _ = child.communicate(timeout=seconds + 2 * ramp_s + 60)
                if child.returncode != 0:
                    raise RuntimeError(f"load generator failed with {child.returncode}")
                outs.append(json.loads(stdout.strip().splitlines()[-1]))
    finally:
        for child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
    cpu1 = {name: cpu_seconds(pid) for name, pid in watch.items()}
    busy1, wall1 = machine_busy(), time.monotonic()
    merged = {
        k: sum(o[k] for o in outs)
        for k in ("tokens", "requests", "errors", "bad", "window_tokens", "window_requests", "unfinished", "cpu_s")
    }
    merged["ttft_ms"] = [t for o in outs for t in o["ttft_ms"]]
    merged["error_sample"] = next((o["error_sample"] for o in outs if o["error_sample"]), "")
    merged["bad_sample"] = next((o["bad_sample"] for o in outs if o["bad_sample"]), "")
    merged["seconds"] = seconds
    merged["cpu"] = {name: cpu1[name] - cpu0[name] for name in watch}
    merged["cpu"]["loadgen"] = merged.pop("cpu_s")
    merged["machine_busy_s"] = busy1 - busy0
    merged["wall_s"] = wall1 - wall0
    merged["redis_calls"] = costs.calls_delta(calls0, costs.command_calls(redis_url)) if redis_url else None
    merged["rss_before"] = rss0
    merged["rss_peak"] = rss.peak if isinstance(rss, costs.RssPeak) else 0
    return merged


def compare_one_answer(sim_url: str, gw_url: str, key: str, max_tokens: int) -> str:
    """The same request direct and through the gateway: the events must be the same apart from
    the id and the creation time (vLLM makes both per request)."""
    import httpx

    def events(url: str, auth: str) -> list[dict]:
        body = {
            "model": MODEL,
            "messages": [{"role": "user", "content": "Tell me a long story."}],
            "max_tokens": max_tokens,
            "stream": True,
        }
        with httpx.stream(
            "POST", url + "/v1/chat/completions", json=body, timeout=30, headers={"Authorization": f"Bearer {auth}"}
        ) as resp:
            resp.raise_for_status()
            raw = resp.read().decode()
        chunks = [e.removeprefix("data: ") for e in raw.split("\n\n") if e.strip()]
        if chunks[-1] != "[DONE]":
            raise AssertionError(f"{url}: stream did not end with [DONE]")
        parsed = [json.loads(c) for c in chunks[:-1]]
        for p in parsed:
            p.pop("id"), p.pop("created")
        return parsed

    direct, through = events(sim_url, NODE_KEY), events(gw_url, key)
    if direct != through:
        raise AssertionError(f"gateway answer differs from the direct one: {len(direct)} vs {len(through)} events")
    return f"{len(direct)} events identical (id/created aside)"


def run(args: argparse.Namespace, env: dict) -> dict:
    from vllm_sim import run_simulator_process

    results: dict = {"levels": {}, "flat": {}, "burst": {}, "scale": {}}
    redis_url = env["REDIS_URL"] if args.private_redis else None
    seconds, rounds = args.seconds, args.rounds
    stream_ramp = 0.05 + 0.02 * args.max_tokens  # one request's duration: arrivals spread over it
    sim_opts = dict(model=MODEL, api_key=NODE_KEY, light=True, max_num_seqs=4096, kv_cache_tokens=100_000_000)
    with Procs() as procs, run_simulator_process(itl_ms=20, ttft_ms=50, **sim_opts) as sim:
        key = seed(env, sim.url, model=MODEL, node_key=NODE_KEY)
        gw, gw_url = start_gateway(env, args.workers, procs)
        wait_routed(gw_url, key, MODEL)
        results["answer_check"] = compare_one_answer(sim.url, gw_url, key, args.max_tokens)
        idle0 = cpu_seconds(gw.pid)
        time.sleep(3)  # background work (routing refresh, load sync, invalidation listener) with no traffic
        results["idle_core_pct"] = (cpu_seconds(gw.pid) - idle0) / 3 * 100
        print(f"  correctness: {results['answer_check']}", flush=True)
        common = dict(
            seconds=seconds, ramp_s=stream_ramp, stream=True, max_tokens=args.max_tokens, procs=args.loadgen_procs
        )
        drive(base_url=gw_url, key=key, concurrency=16, **{**common, "seconds": 1, "ramp_s": 0.2}, watch={})
        for level in args.levels:
            pairs = []
            for _ in range(rounds):
                d = drive(base_url=sim.url, key=NODE_KEY, concurrency=level, **common, watch={"sim": sim.proc.pid})
                g = drive(
                    base_url=gw_url,
                    key=key,
                    concurrency=level,
                    **common,
                    watch={"sim": sim.proc.pid, "gateway": gw.pid},
                    redis_url=redis_url,
                )
                pairs.append((d, g))
                print("  " + report.round_line(f"{level} streams", d, g), flush=True)
            results["levels"][level] = pairs
        # Lockstep: every client starts at the same instant and, its streams being as long as the
        # others', starts its next request with them: a burst of `level` admissions at once.
        for level in args.burst_levels:
            pairs = []
            for _ in range(rounds):
                lockstep = {**common, "ramp_s": 0.0}
                d = drive(base_url=sim.url, key=NODE_KEY, concurrency=level, **lockstep, watch={"sim": sim.proc.pid})
                g = drive(
                    base_url=gw_url,
                    key=key,
                    concurrency=level,
                    **lockstep,
                    watch={"sim": sim.proc.pid, "gateway": gw.pid},
                    redis_url=redis_url,
                )
                pairs.append((d, g))
                print("  " + report.round_line(f"{level} lockstep", d, g), flush=True)
            results["burst"][level] = pairs
        stop(gw)

    with Procs() as procs, run_simulator_process(itl_ms=0, ttft_ms=0, **sim_opts) as fast:
        key = seed(env, fast.url, model=MODEL, node_key=NODE_KEY)
        gw, gw_url = start_gateway(env, args.workers, procs)
        wait_routed(gw_url, key, MODEL)
        for name, stream, max_tokens in (("saturation", True, args.max_tokens), ("nonstream", False, 16)):
            pairs = []
            for _ in range(args.flat_rounds):
                common = dict(
                    concurrency=args.flat_concurrency,
                    seconds=args.flat_seconds,
                    ramp_s=0.3,
                    stream=stream,
                    max_tokens=max_tokens,
                    procs=args.loadgen_procs,
                )
                d = drive(base_url=fast.url, key=NODE_KEY, **common, watch={"sim": fast.proc.pid})
                g = drive(
                    base_url=gw_url,
                    key=key,
                    **common,
                    watch={"sim": fast.proc.pid, "gateway": gw.pid},
                    redis_url=redis_url,
                )
                pairs.append((d, g))
                print("  " + report.round_line(f"{name} ({args.flat_concurrency} clients)", d, g), flush=True)
            results["flat"][name] = pairs
        stop(gw)

    if args.scale_level:
        # Many open streams through one worker: a fresh gateway, so its RSS before the round is
        # the warmed-up process and the peak during it is what the open streams hold.
        itl = args.scale_itl_ms
        with Procs() as procs, run_simulator_process(itl_ms=itl, ttft_ms=50, **sim_opts) as slow:
            key = seed(env, slow.url, model=MODEL, node_key=NODE_KEY)
            gw, gw_url = start_gateway(env, args.workers, procs)
            wait_routed(gw_url, key, MODEL)
            warm = dict(seconds=1, ramp_s=0.2, stream=True, max_tokens=8, procs=args.loadgen_procs, watch={})
            drive(base_url=gw_url, key=key, concurrency=16, **warm)
            common = dict(
                seconds=seconds,
                ramp_s=(50 + itl * args.max_tokens) / 1000,
                stream=True,
                max_tokens=args.max_tokens,
                procs=args.loadgen_procs,
            )
            level = args.scale_level
            d = drive(base_url=slow.url, key=NODE_KEY, concurrency=level, **common, watch={"sim": slow.proc.pid})
            g = drive(
                base_url=gw_url,
                key=key,
                concurrency=level,
                **common,
                watch={"sim": slow.proc.pid, "gateway": gw.pid},
                redis_url=redis_url,
            )
            print("  " + report.round_line(f"{level} streams at {itl:g} ms/token", d, g), flush=True)
            results["scale"][level] = [(d, g)]
            stop(gw)
    return results


def profile(args: argparse.Namespace, env: dict) -> None:
    """One gateway process under cProfile per workload: the top level of streams at --itl-ms 20, and
    non-streaming requests flat out; the top costs are printed, the .prof files kept under var/bench/."""
    import pstats

    from vllm_sim import run_simulator_process

    sim_opts = dict(model=MODEL, api_key=NODE_KEY, light=True, max_num_seqs=4096, kv_cache_tokens=100_000_000)
    level = max(args.levels)
    workloads = (
        (
            f"stream{level}",
            dict(itl_ms=20, ttft_ms=50),
            dict(concurrency=level, ramp_s=0.05 + 0.02 * args.max_tokens, stream=True, max_tokens=args.max_tokens),
        ),
        (
            "nonstream",
            dict(itl_ms=0, ttft_ms=0),
            dict(concurrency=args.flat_concurrency, ramp_s=0.3, stream=False, max_tokens=16),
        ),
    )
    for name, sim_flags, load in workloads:
        out = ROOT / "var" / "bench" / f"gateway-{name}.prof"
        out.parent.mkdir(parents=True, exist_ok=True)
        with Procs() as procs, run_simulator_process(**sim_flags, **sim_opts) as sim:
            key = seed(env, sim.url, model=MODEL, node_key=NODE_KEY)
            gw, gw_url = start_gateway(env, 0, procs, profile_to=out)
            wait_routed(gw_url, key, MODEL)
            g = drive(
                base_url=gw_url,
                key=key,
                seconds=args.seconds,
                procs=args.loadgen_procs,
                watch={"gateway": gw.pid},
                **load,
            )
            print(f"  profiled {name}: " + report.side_line(g), flush=True)
            stop(gw, sig=signal.SIGINT)  # uvicorn exits cleanly, so cProfile writes its file
        stats = pstats.Stats(str(out))
        stats.sort_stats("tottime").print_stats(25)
        stats.sort_stats("cumulative").print_stats(45)
        print(f"bench: profile in {out.relative_to(ROOT)} (.venv/bin/python -m pstats {out.relative_to(ROOT)})")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="short rounds, 16 and 64 streams: a smoke run")
    parser.add_argument("--concurrency", default=None, help="comma-separated levels (default 16,64,256)")
    parser.add_argument("--seconds", type=float, default=None, help="measured window per round (default 8, quick 3)")
    parser.add_argument("--rounds", type=int, default=None, help="direct/gateway pairs per level (default 3, quick 1)")
    parser.add_argument("--flat-concurrency", type=int, default=64, help="clients for the --itl-ms 0 runs")
    parser.add_argument(
        "--workers",
        type=int,
        default=int(os.environ.get("GATEWAY_BENCH_WORKERS", "1")),
        help="uvicorn --workers (default 1: see docs/benchmarks.md)",
    )
    parser.add_argument("--loadgen-procs", type=int, default=1, help="load generator processes (default 1)")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument(
        "--database-url", default=None, help="default: DATABASE_URL's server, database crosslogic_bench"
    )
    parser.add_argument("--redis-db", type=int, default=14, help="Redis database of REDIS_URL's server (flushed)")
    parser.add_argument(
        "--burst", default=None, help="comma-separated lockstep levels, all clients at once (default 256, quick 64)"
    )
    parser.add_argument(
        "--scale-level", type=int, default=None, help="streams at --scale-itl-ms (default 1024, quick 0: skipped)"
    )
    parser.add_argument("--scale-itl-ms", type=float, default=50.0)
    parser.add_argument(
        "--shared-redis",
        action="store_true",
        help="use REDIS_URL's server instead of a redis-server of the bench's own (no command counts then)",
    )
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/benchmarks.md alone")
    parser.add_argument("--profile-only", action="store_true", help="cProfile one worker at the top level instead")
    args = parser.parse_args()
    args.seconds = args.seconds or (3.0 if args.quick else 8.0)
    args.rounds = args.rounds or (1 if args.quick else 3)
    args.flat_seconds = 3.0 if args.quick else 6.0
    args.flat_rounds = 1 if args.quick else 2
    args.levels = [int(c) for c in (args.concurrency or ("16,64" if args.quick else "16,64,256")).split(",")]
    args.burst_levels = [int(c) for c in (args.burst or ("64" if args.quick else "256")).split(",") if c]
    if args.scale_level is None:
        args.scale_level = 0 if args.quick else 1024

    source = os.environ.get("DATABASE_URL") or f"sqlite:///{ROOT / 'var' / 'db.sqlite3'}"
    db_url = args.database_url or bench_database_url(source)
    redis_base = urlparse(os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379")
    redis_url = urlunparse(redis_base._replace(path=f"/{args.redis_db}"))
    env = {
        **os.environ,
        "DATABASE_URL": db_url,
        "REDIS_URL": redis_url,
        "LOG_LEVEL": "WARNING",
        "DJANGO_SETTINGS_MODULE": "crosslogic.settings",
        "PYTHONPATH": str(ROOT),
    }
    # One tenant drives every stream here: lift its fair share of the one node (still enforced, in Redis).
    env.setdefault("GATEWAY_TENANT_INFLIGHT_PER_NODE", "100000")
    env.pop("VLLM_API_KEY", None)
    print(
        f"bench: database {db_url.split('@')[-1]}, Redis {redis_url.split('@')[-1]}, {args.workers} gateway "
        f"worker(s), {args.loadgen_procs} load generator process(es), levels {args.levels}, {args.rounds} "
        f"round(s) of {args.seconds:.0f} s",
        flush=True,
    )
    # A TERM (make's, a CI runner's) unwinds like Ctrl-C, so every child is stopped on the way out.
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    started = time.monotonic()
    load_before = os.getloadavg()
    with contextlib.ExitStack() as stack:
        own = None if args.shared_redis else stack.enter_context(costs.private_redis())
        args.private_redis = own is not None
        if own is not None:
            redis_url = env["REDIS_URL"] = own
            print(f"bench: Redis of its own at {own} (counts the gateway's commands)", flush=True)
        prepare_database(db_url, env, redis_url)
        if args.profile_only:
            profile(args, env)
            return
        results = run(args, env)
    results["elapsed_s"] = time.monotonic() - started
    results["loadavg"] = (load_before, os.getloadavg())
    table = report.render(results, args=args, argv=sys.argv[1:]) + "\n" + costs.render(results)
    print()
    print(table)
    if not args.no_write:
        report.write_doc(ROOT / "docs" / "benchmarks.md", table)
        print("bench: wrote docs/benchmarks.md (## Gateway)")


def bench_database_url(url: str) -> str:
    parsed = urlparse(url)
    if parsed.scheme.startswith("sqlite"):
        return f"sqlite:///{Path(parsed.path).with_name('bench.sqlite3')}"
    return urlunparse(parsed._replace(path="/crosslogic_bench"))


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("bench: interrupted; every process it started is stopped", file=sys.stderr)
        sys.exit(130)
