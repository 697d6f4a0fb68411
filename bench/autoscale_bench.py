"""Replay a bursty day against the local fleet and compare three ways of provisioning it.

``make bench-autoscale`` (``bench/autoscale_bench.py``): the day of bench/_autoscale_trace.py
(diurnal ramp, a quiet hour, two 5x bursts) compressed into ``--duration`` seconds (600 by
default) is replayed as streaming chat requests through the real gateway, in front of a real
fleet: the local launcher starting simulator nodes (``python -m vllm_sim`` with a cold start, a
bounded batch ``--max-num-seqs`` and KV cache), a Celery worker, beat with the health checks and
the reconciler. Per policy, on a fresh database:

(a) ``static``: as many nodes as the peak needs, started before the day and kept;
(b) ``qps``: SkyServe's request-rate autoscaler with its default delays (300 s up, 1200 s down,
    decisions every 20 s over a 60 s window; scaled like the cold start), min 1 replica, which
    this script runs itself through the fleet's services (launch; drain the least loaded);
(c) ``ours``: apps.fleet.autoscale on beat, min 0 (requests held by the gateway while a node
    starts), warm pool on.

Measured: node-seconds (nodes holding a machine, sampled every second), client-side TTFT p50/p95
(and p95 outside the first burst), failed requests (any non-200 or incomplete stream), requests
held by the gateway and their wait. Writes var/bench/autoscale-<time>.json, the chart
docs/img/autoscale-bench.png and the "Autoscaling replay" section of docs/benchmarks.md
(``--no-write``: only print).
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
from dataclasses import asdict
from pathlib import Path
from urllib.parse import urlparse, urlunparse

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _autoscale_trace import COLD_START_S, WARM_START_S, Scale, arrivals

ROOT = Path(__file__).resolve().parents[1]
POLICIES = ("static", "qps", "ours")
# Not in the default run: the QPS policy with SkyServe's delays divided like the day instead.
EXTRA_POLICIES = ("qps-day",)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--duration", type=float, default=600.0, help="seconds the day lasts (default 600)")
    parser.add_argument("--quick", action="store_true", help="--duration 150: a smoke run")
    parser.add_argument(
        "--policies", default=",".join(POLICIES), help="comma-separated subset of static,qps,ours (and qps-day)"
    )
    parser.add_argument("--peak-rps", type=float, default=32.0, help="requests per second at the day's peak")
    parser.add_argument("--max-tokens", type=int, default=24, help="tokens per streamed answer")
    parser.add_argument("--max-num-seqs", type=int, default=8, help="each node's batch (vllm_sim --max-num-seqs)")
    parser.add_argument("--itl-ms", type=float, default=30.0, help="each node's time between tokens")
    parser.add_argument("--target-ongoing", type=int, default=6, help="requests per node every policy aims at")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument(
        "--database-url", default=None, help="default: DATABASE_URL's server, database crosslogic_autoscale_bench"
    )
    parser.add_argument("--redis-db", type=int, default=13, help="Redis database of REDIS_URL's server (flushed)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/ alone")
    parser.add_argument(
        "--from-json",
        type=Path,
        nargs="+",
        default=None,
        help="re-render the table, chart and docs of saved runs (several: their rows together); runs nothing",
    )
    args = parser.parse_args()
    if args.from_json is not None:
        rerender(*args.from_json, write=not args.no_write)
        return
    if args.quick:
        args.duration = 150.0
    policies = [p for p in args.policies.split(",") if p]
    unknown = set(policies) - set(POLICIES) - set(EXTRA_POLICIES)
    if unknown or not policies:
        parser.error(f"--policies: choose among {', '.join(POLICIES)} (got {args.policies!r})")
    if args.duration < 60:
        parser.error("--duration: at least 60 seconds (the day needs room for a cold start per hour)")

    source = os.environ.get("DATABASE_URL") or "postgres://postgres@127.0.0.1:5432/crosslogic"
    if urlparse(source).scheme.startswith("sqlite"):
        parser.error("the autoscaling bench needs PostgreSQL (DATABASE_URL): the fleet's processes share it")
    db_url = args.database_url or urlunparse(urlparse(source)._replace(path="/crosslogic_autoscale_bench"))
    redis_base = urlparse(os.environ.get("REDIS_URL") or "redis://127.0.0.1:6379")
    redis_url = urlunparse(redis_base._replace(path=f"/{args.redis_db}"))
    scale = Scale(args.duration)
    var = ROOT / "var" / "bench"
    var.mkdir(parents=True, exist_ok=True)
    cold = scale.delay(COLD_START_S)
    env = {
        **{k: v for k, v in os.environ.items() if k not in ("VLLM_API_KEY",)},
        "DATABASE_URL": db_url,
        "REDIS_URL": redis_url,
        "CELERY_BROKER_URL": redis_url,
        "CROSSLOGIC_ENV_FILE": "",
        "CROSSLOGIC_VAR_DIR": str(var / "state"),
        "DJANGO_SETTINGS_MODULE": "crosslogic.settings",
        "PYTHONPATH": str(ROOT),
        "LOG_LEVEL": "WARNING",
        "FLEET_DEFAULT_LAUNCHER": "local",
        "FLEET_LOCAL_STARTUP_DELAY_S": f"{cold:.2f}",
        "FLEET_LOCAL_SIM_ARGS": (
            f"--max-num-seqs {args.max_num_seqs} --itl-ms {args.itl_ms:g} --ttft-ms 50 "
            f"--kv-cache-tokens {args.max_num_seqs * 512} --warm-start-delay-s {scale.delay(WARM_START_S):.2f}"
        ),
        "FLEET_HEALTH_INTERVAL_S": "1",
        "FLEET_RECONCILE_INTERVAL_S": "2",
        "FLEET_LAUNCH_POLL_S": "1",
        "FLEET_DRAIN_TIMEOUT_S": str(max(5, round(scale.delay(300)))),
        "FLEET_RELAUNCH_BACKOFF_S": "0",
        "FLEET_AUTOSCALE_INTERVAL_S": str(max(1, round(scale.delay(5)))),
        "WARM_POOL_TTL_S": str(max(1, round(scale.delay(3600)))),
        "FLEET_DEFAULT_COLD_START_S": f"{cold:.2f}",
        "FLEET_DEFAULT_WARM_START_S": f"{scale.delay(WARM_START_S):.2f}",
        "GATEWAY_COLD_WAIT_S": str(max(30.0, 4 * cold)),
        "GATEWAY_TENANT_INFLIGHT_PER_NODE": "100000",
    }
    import _autoscale_run as run  # after sys.path; it imports Django with this env

    print(
        f"bench-autoscale: {args.duration:.0f} s day (1 s = {scale.day_factor / 60:.1f} min of the day), "
        f"delays ÷{scale.infra:.1f} (cold start {cold:.1f} s, warm {scale.delay(WARM_START_S):.1f} s), "
        f"peak {args.peak_rps:g} rps, policies {', '.join(policies)}; database {db_url.split('@')[-1]}, "
        f"Redis {redis_url.split('@')[-1]}",
        flush=True,
    )
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    trace = arrivals(scale, args.peak_rps, seed=args.seed)
    print(f"bench-autoscale: {len(trace)} requests in the day", flush=True)
    started = time.time()
    results = run.run_all(policies=policies, scale=scale, trace=trace, env=env, args=args)
    out = {
        "started": started,
        "elapsed_s": time.time() - started,
        "args": vars(args),
        "scale": {"duration_s": scale.duration_s, "infra": scale.infra, "day_factor": scale.day_factor},
        "requests": len(trace),
        "results": {
            name: {
                "summary": asdict(r.summary),
                "samples": [asdict(s) for s in r.samples],
                "requests": r.requests,
                "decisions": r.decisions,
            }
            for name, r in results.items()
        },
        "loadavg": os.getloadavg(),
    }
    path = var / time.strftime("autoscale-%Y%m%d-%H%M%S.json", time.gmtime(started))
    out["argv"] = sys.argv[1:]
    path.write_text(json.dumps(out))
    print(f"bench-autoscale: raw results in {path.relative_to(ROOT)}")
    rerender(path, write=not args.no_write)


def rerender(path: Path, *more: Path, write: bool) -> None:
    import _autoscale_report as report

    out = json.loads(path.read_text())
    for other in more:  # a later run's rows join the first run's table, said so in the header
        extra = json.loads(other.read_text())
        out["results"].update(extra["results"])
        keep = ("started", "elapsed_s", "argv", "loadavg")
        out.setdefault("extra_runs", []).append({**{k: extra.get(k) for k in keep}, "policies": list(extra["results"])})
    table = report.render(out, argv=out.get("argv", []))
    print()
    print(table)
    if write:
        report.chart(out, ROOT / "docs" / "img" / "autoscale-bench.png")
        report.write_doc(ROOT / "docs" / "benchmarks.md", table)
        print("bench-autoscale: wrote docs/img/autoscale-bench.png and docs/benchmarks.md (## Autoscaling replay)")


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("bench-autoscale: interrupted; every process it started is stopped", file=sys.stderr)
        sys.exit(130)
