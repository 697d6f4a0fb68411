"""Gateway CPU per request, a measurement that holds on a busy machine (not a test).

Wall-clock throughput moves with whatever else the machine runs; the CPU time the gateway process
spends per request (utime + stime from /proc/<pid>/stat, read before and after a round) moves far
less, because the work per request is the same whoever else competes for the cores. This script
runs one gateway process (one uvicorn worker, as `make bench`) in front of the simulator with
``--itl-ms 0 --ttft-ms 0`` and drives it with the bench's own load generator, then prints the
gateway's CPU per 1,000 requests (non-streamed) and per 1,000 streamed tokens.

``--tree`` chooses the checkout whose gateway runs (its own bench/_gateway_procs.py seeds and
starts it), so an older commit is measured in the same harness, with the same client and
simulator (this checkout's), and a database of its own:

    git worktree add /tmp/perf-old 73bc9d4
    .venv/bin/python bench/cpu_per_request.py --tree /tmp/perf-old --database crosslogic_perf_old
    .venv/bin/python bench/cpu_per_request.py --database crosslogic_perf_new

Rounds alternate nothing by themselves: run the two commands one after the other, more than once.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from urllib.parse import urlparse, urlunparse

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from bench._gateway_extra import calls_delta, command_calls, private_redis  # noqa: E402

MODEL = "bench-model"
NODE_KEY = "bench-node-key"
LOADGEN = ROOT / "bench" / "_loadgen.py"


def _procs_module(tree: Path):
    spec = importlib.util.spec_from_file_location(f"_procs_{abs(hash(tree))}", tree / "bench" / "_gateway_procs.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _round(url: str, key: str, *, stream: bool, max_tokens: int, concurrency: int, seconds: float) -> dict:
    spec = dict(
        base_url=url,
        api_key=key,
        model=MODEL,
        concurrency=concurrency,
        seconds=seconds,
        ramp_s=0.3,
        grace_s=30,
        stream=stream,
        max_tokens=max_tokens,
        start_at=time.monotonic() + 0.6,
    )
    out = subprocess.run(
        [sys.executable, str(LOADGEN), json.dumps(spec)], cwd=ROOT, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


SERVERS = {
    # The same application under other ASGI servers, for the comparison in docs/benchmarks.md.
    "granian": "-m granian --interface asgi --http 1 --no-ws --workers 1 --loop uvloop --backlog 4096 "
    "--log-level warning --host 127.0.0.1 --port {port} crosslogic.asgi:application",
    "hypercorn": "-m hypercorn --worker-class uvloop --workers 1 --backlog 4096 --log-level warning "
    "--bind 127.0.0.1:{port} crosslogic.asgi:application",
}


def _start_server(kind: str, env: dict, procs, tree: Path):
    import httpx

    port = _free_port()
    cmd = [sys.executable, *SERVERS[kind].format(port=port).split()]
    proc = subprocess.Popen(cmd, cwd=tree, env=env, start_new_session=True, stdin=subprocess.DEVNULL)
    procs.items.append(proc)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while True:
        try:
            if httpx.get(url + "/health", timeout=1).status_code == 200:
                return proc, url
        except httpx.HTTPError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(f"{kind} did not start: {' '.join(cmd)}")
        time.sleep(0.2)


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _user_system(pid: int) -> tuple[float, float]:
    """utime, stime (seconds) of one process: the kernel's share is mostly loopback TCP here."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat[stat.rindex(")") + 2 :].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def _start_with(procs_mod, env: dict, procs, head: str):
    """The tree's own start_gateway, one process (workers 0), its interpreter replaced by ``head``."""
    import types

    real_sys = procs_mod.sys
    procs_mod.sys = types.SimpleNamespace(executable=head)
    try:
        return procs_mod.start_gateway(env, 0, procs)
    finally:
        procs_mod.sys = real_sys


def _start_profiled(procs_mod, env: dict, procs, out: Path):
    out.parent.mkdir(parents=True, exist_ok=True)
    wrapper = out.with_suffix(".sh")
    wrapper.write_text(f'#!/bin/sh\nexec {sys.executable} {ROOT / "bench" / "_cpuprof.py"} {out} "$@"\n')
    wrapper.chmod(0o755)
    return _start_with(procs_mod, env, procs, str(wrapper))


def _callgrind_total(path: Path) -> int:
    for line in path.read_text().splitlines():
        # "totals", not "summary": with instrumentation switched on and off, summary can wrap around.
        if line.startswith("totals:"):
            return int(line.split()[1])
    raise RuntimeError(f"no totals in {path}")


def callgrind(procs_mod, env: dict, procs, key: str, args: argparse.Namespace) -> None:
    """Instructions the gateway executes per request (all threads), with instrumentation switched on
    only for the measured windows; background work is measured alone (no traffic) and subtracted."""
    out_dir = ROOT / "var" / "bench" / f"callgrind-{args.database}"
    out_dir.mkdir(parents=True, exist_ok=True)
    for old in out_dir.glob("cg.out*"):
        old.unlink()
    wrapper = out_dir / "python"
    wrapper.write_text(
        "#!/bin/sh\nexec valgrind --tool=callgrind --instr-atstart=no "
        f'--callgrind-out-file={out_dir}/cg.out {sys.executable} "$@"\n'
    )
    wrapper.chmod(0o755)
    gw, gw_url = _start_with(procs_mod, env, procs, str(wrapper))
    procs_mod.wait_routed(gw_url, key, MODEL)
    _round(gw_url, key, stream=False, max_tokens=16, concurrency=args.concurrency, seconds=3)
    counter = 0

    def window(action) -> tuple[int, float, dict | None]:
        nonlocal counter
        counter += 1
        subprocess.run(["callgrind_control", "--instr=on", str(gw.pid)], check=True, capture_output=True)
        t0 = time.monotonic()
        result = action()
        wall = time.monotonic() - t0
        subprocess.run(["callgrind_control", "--dump", str(gw.pid)], check=True, capture_output=True)
        subprocess.run(["callgrind_control", "--instr=off", str(gw.pid)], check=True, capture_output=True)
        return _callgrind_total(out_dir / f"cg.out.{counter}"), wall, result

    idle_instr, idle_wall, _ = window(lambda: time.sleep(args.seconds))
    idle_rate = idle_instr / idle_wall
    per_request = []
    for _ in range(args.rounds):
        instr, wall, out = window(
            lambda: _round(gw_url, key, stream=False, max_tokens=16, concurrency=args.concurrency, seconds=args.seconds)
        )
        assert out is not None
        if out["errors"] or out["bad"]:
            raise SystemExit(f"errors {out['errors']}, bad {out['bad']}: {out['error_sample']}")
        per_request.append((instr - idle_rate * wall) / out["requests"])
        print(f"  {out['requests']} requests in {wall:.1f} s: {per_request[-1] / 1e6:.3f} M instructions each")
    procs_mod.stop(gw, sig=2)
    print(
        f"{args.tree}: median {statistics.median(per_request) / 1e6:.3f} M instructions per non-streamed request "
        f"(idle {idle_rate / 1e6:.1f} M/s subtracted)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tree", type=Path, default=ROOT, help="checkout whose gateway runs (default: this one)")
    parser.add_argument("--database", default="crosslogic_perf", help="PostgreSQL database name (created)")
    parser.add_argument("--redis-db", type=int, default=10, help="Redis database (flushed)")
    parser.add_argument(
        "--private-redis", action="store_true", help="a throwaway redis-server of its own instead of REDIS_URL's"
    )
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--modes", default="nonstream,stream", help="nonstream, stream or both")
    parser.add_argument("--json", action="store_true", help="one JSON line instead of text")
    parser.add_argument("--profile", action="store_true", help="cProfile the gateway (one process)")
    parser.add_argument(
        "--server",
        default="uvicorn",
        choices=["uvicorn", *SERVERS],
        help="the ASGI server (default: the tree's own start_gateway, uvicorn; others must be importable)",
    )
    parser.add_argument(
        "--callgrind",
        action="store_true",
        help="count instructions under valgrind's callgrind instead (slow, independent of the load)",
    )
    args = parser.parse_args()

    with contextlib.ExitStack() as stack:
        own = stack.enter_context(private_redis()) if args.private_redis else None
        measure(args, own)


def measure(args: argparse.Namespace, own_redis: str | None) -> None:
    tree = args.tree.resolve()
    procs_mod = _procs_module(tree)
    base = urlparse(os.environ.get("DATABASE_URL") or "postgres://postgres@127.0.0.1:5432/postgres")
    db_url = urlunparse(base._replace(path=f"/{args.database}"))
    redis_base = urlparse(os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379")
    redis_url = own_redis or urlunparse(redis_base._replace(path=f"/{args.redis_db}"))
    env = {
        **os.environ,
        "DATABASE_URL": db_url,
        "REDIS_URL": redis_url,
        "LOG_LEVEL": "WARNING",
        "DJANGO_SETTINGS_MODULE": "crosslogic.settings",
        "PYTHONPATH": os.pathsep.join(filter(None, [str(tree), os.environ.get("PYTHONPATH")])),
        "GATEWAY_TENANT_INFLIGHT_PER_NODE": "100000",
    }
    env.pop("VLLM_API_KEY", None)
    procs_mod.ROOT = tree
    procs_mod.prepare_database(db_url, env, redis_url)

    from vllm_sim import run_simulator_process

    results: dict[str, list[float]] = {}
    sim_opts = dict(model=MODEL, api_key=NODE_KEY, light=True, max_num_seqs=4096, kv_cache_tokens=100_000_000)
    with procs_mod.Procs() as procs, run_simulator_process(itl_ms=0, ttft_ms=0, **sim_opts) as sim:
        key = procs_mod.seed(env, sim.url, model=MODEL, node_key=NODE_KEY)
        if args.callgrind:
            callgrind(procs_mod, env, procs, key, args)
            return
        profile_to = ROOT / "var" / "bench" / f"cpu-{args.database}.prof" if args.profile else None
        if profile_to:
            gw, gw_url = _start_profiled(procs_mod, env, procs, profile_to)
        elif args.server != "uvicorn":
            gw, gw_url = _start_server(args.server, env, procs, tree)
        else:
            gw, gw_url = procs_mod.start_gateway(env, 1, procs)
        procs_mod.wait_routed(gw_url, key, MODEL)
        modes = args.modes.split(",")
        # Warm-up: imports, connections, caches.
        _round(gw_url, key, stream=False, max_tokens=16, concurrency=args.concurrency, seconds=1)
        for _ in range(args.rounds):
            for mode in modes:
                stream = mode == "stream"
                max_tokens = 128 if stream else 16
                calls0 = command_calls(own_redis)
                cpu0 = procs_mod.cpu_seconds(gw.pid)
                us0 = _user_system(gw.pid)
                out = _round(
                    gw_url,
                    key,
                    stream=stream,
                    max_tokens=max_tokens,
                    concurrency=args.concurrency,
                    seconds=args.seconds,
                )
                cpu = procs_mod.cpu_seconds(gw.pid) - cpu0
                us1 = _user_system(gw.pid)
                system_share = (us1[1] - us0[1]) / max(1e-9, (us1[0] - us0[0]) + (us1[1] - us0[1]))
                results.setdefault(f"{mode}_system_pct", []).append(100 * system_share)
                if out["errors"] or out["bad"]:
                    raise SystemExit(f"{mode}: errors {out['errors']}, bad {out['bad']}: {out['error_sample']}")
                if stream:
                    results.setdefault("stream_ms_per_1k_tokens", []).append(cpu * 1e6 / out["tokens"])
                else:
                    results.setdefault("nonstream_ms_per_1k_requests", []).append(cpu * 1e6 / out["requests"])
                results.setdefault(f"{mode}_req_per_s", []).append(out["window_requests"] / args.seconds)
                if own_redis:
                    calls = calls_delta(calls0, command_calls(own_redis))
                    scripts = calls.get("evalsha", 0) + calls.get("eval", 0)
                    results.setdefault(f"{mode}_redis_scripts_per_request", []).append(scripts / out["requests"])
        procs_mod.stop(gw, sig=2)  # SIGINT: uvicorn exits cleanly, so cProfile writes its file
    if profile_to:
        import pstats

        pstats.Stats(str(profile_to)).sort_stats("tottime").print_stats(40)
        print(f"profile: {profile_to}")
    summary = {k: round(statistics.median(v), 1) for k, v in results.items()}
    if args.json:
        print(json.dumps({"tree": str(tree), "median": summary, "rounds": results}))
    else:
        print(f"{tree} ({args.server}): " + ", ".join(f"{k} {v}" for k, v in summary.items()))
        for k, v in results.items():
            print(f"  {k}: " + ", ".join(f"{x:.1f}" for x in v))


if __name__ == "__main__":
    main()
