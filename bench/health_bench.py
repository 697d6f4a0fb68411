"""Health-check benchmark: N simulated vLLM nodes checked by apps.fleet.health, timed side by side.

One helper process (this script with --serve) answers /n/<i>/health and /n/<i>/metrics for every
virtual node on a few ports; N Node rows point at them. The benchmark then times, in one run:
  1. a sequential pass over a sample (one node at a time: the naive design), extrapolated to N;
  2. the same concurrent design with httpx instead of aiohttp, over the sample;
  3. the concurrent network pass alone (check_targets, aiohttp), over all N;
  4. the full pass the Celery task does (read nodes, check, bulk-write health, transitions).
Everything happens inside a transaction that is rolled back: no row survives the run.

    DATABASE_URL=postgres://…/a_migrated_db .venv/bin/python bench/health_bench.py --nodes 1000
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

METRICS = (
    "# HELP vllm:num_requests_running Number of requests in model execution batches.\n"
    "# TYPE vllm:num_requests_running gauge\n"
    'vllm:num_requests_running{engine="0",model_name="bench"} 3.0\n'
    "# TYPE vllm:num_requests_waiting gauge\n"
    'vllm:num_requests_waiting{engine="0",model_name="bench"} 1.0\n'
    "# TYPE vllm:kv_cache_usage_perc gauge\n"
    'vllm:kv_cache_usage_perc{engine="0",model_name="bench"} 0.42\n'
)


def serve(ports: int, delay_ms: float) -> None:
    """Answer for every virtual node on ``ports`` listening sockets; print the ports, then serve."""
    from aiohttp import web

    async def health(request: web.Request) -> web.Response:
        if delay_ms:
            await asyncio.sleep(delay_ms / 1000)
        return web.Response(text="")

    async def metrics(request: web.Request) -> web.Response:
        return web.Response(text=METRICS, content_type="text/plain")

    async def main() -> None:
        app = web.Application()
        app.router.add_get("/n/{i}/health", health)
        app.router.add_get("/n/{i}/metrics", metrics)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        bound = []
        for _ in range(ports):
            site = web.TCPSite(runner, "127.0.0.1", 0, backlog=1024)
            await site.start()
            bound.append(site._server.sockets[0].getsockname()[1])
        print(" ".join(map(str, bound)), flush=True)
        await asyncio.Event().wait()

    asyncio.run(main())


async def _httpx_pass(urls: list[str], concurrency: int, timeout: float) -> int:
    """The design of apps.fleet.health with httpx's pool instead of aiohttp's (for comparison)."""
    import httpx

    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=timeout, limits=limits) as client:

        async def one(url: str) -> bool:
            async with sem:
                try:
                    ok = (await client.get(url + "/health")).status_code == 200
                    await client.get(url + "/metrics")
                    return ok
                except httpx.HTTPError:
                    return False

        return sum(await asyncio.gather(*(one(u) for u in urls)))


def bench(nodes: int, ports: int, delay_ms: float, sample: int, concurrency: int) -> None:
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "crosslogic.settings")
    import logging

    import django

    django.setup()
    logging.getLogger("httpx").setLevel(logging.WARNING)  # one INFO line per request otherwise
    from django.conf import settings
    from django.db import transaction

    from apps.catalog.models import ServedModel
    from apps.fleet import health
    from apps.fleet.models import Node, NodeStatus

    server = subprocess.Popen(
        [sys.executable, __file__, "--serve", "--ports", str(ports), "--delay-ms", str(delay_ms)],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        bound = [int(p) for p in server.stdout.readline().split()]
        settings.FLEET_HEALTH_CONCURRENCY = concurrency
        with transaction.atomic():
            model = ServedModel.objects.create(name=f"bench-health-{os.getpid()}", max_replicas=nodes)
            rows = [
                Node(
                    model=model,
                    launcher="static",
                    status=NodeStatus.READY,
                    endpoint_url=f"http://127.0.0.1:{bound[i % len(bound)]}/n/{i}",
                )
                for i in range(nodes)
            ]
            Node.objects.bulk_create(rows, batch_size=1000)
            ids = list(Node.objects.filter(model=model).values_list("id", flat=True))
            targets = [health.Target(n.pk, n.endpoint_url) for n in Node.objects.filter(model=model)]

            t0 = time.perf_counter()
            sequential = asyncio.run(health.check_targets(targets[:sample], concurrency=1))
            seq_s = (time.perf_counter() - t0) / len(targets[:sample]) * nodes

            t0 = time.perf_counter()
            httpx_ok = asyncio.run(
                _httpx_pass([t.url for t in targets[:sample]], concurrency, settings.FLEET_HEALTH_TIMEOUT_S)
            )
            httpx_rate = len(targets[:sample]) / (time.perf_counter() - t0)

            t0 = time.perf_counter()
            results = asyncio.run(health.check_targets(targets))
            net_s = time.perf_counter() - t0

            summary = health.run_health_checks(ids)
            full_s = summary.seconds
            ok = sum(r.ok for r in results)
            seq_ok = sum(r.ok for r in sequential)
            written = Node.objects.filter(model=model, requests_running=3, consecutive_failures=0).count()
            transaction.set_rollback(True)
    finally:
        server.terminate()
        server.wait(5)

    print(f"nodes={nodes} ports={len(bound)} server delay={delay_ms:g} ms concurrency={concurrency}")
    print(
        f"sequential (sample {sample}, extrapolated): {seq_s:8.2f} s  {nodes / seq_s:8.0f} nodes/s"
        f"  ({seq_ok}/{sample} healthy)"
    )
    print(
        f"httpx, same design (sample {sample}):        {nodes / httpx_rate:8.2f} s  {httpx_rate:8.0f} nodes/s"
        f"  ({httpx_ok}/{sample} healthy; time extrapolated)"
    )
    print(
        f"concurrent network pass:                  {net_s:8.2f} s  {nodes / net_s:8.0f} nodes/s"
        f"  ({ok}/{nodes} healthy)"
    )
    print(
        f"full pass (read, check, bulk write):      {full_s:8.2f} s  {nodes / full_s:8.0f} nodes/s"
        f"  ({summary.healthy} healthy, {written} rows written)"
    )
    print(
        f"speed-up over sequential: {seq_s / full_s:.1f}x; target: {nodes} nodes < 5 s -> "
        f"{'OK' if full_s < 5 else 'MISSED'}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=1000)
    parser.add_argument("--ports", type=int, default=50, help="listening sockets the virtual nodes share")
    parser.add_argument("--delay-ms", type=float, default=5.0, help="server-side /health delay (network + vLLM)")
    parser.add_argument("--sample", type=int, default=50, help="nodes checked sequentially for the baseline")
    parser.add_argument("--concurrency", type=int, default=200)
    parser.add_argument("--serve", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.nodes < 1 or args.ports < 1 or args.sample < 1:
        parser.error("--nodes, --ports and --sample must be positive")
    if args.serve:
        serve(args.ports, args.delay_ms)
    else:
        bench(args.nodes, args.ports, args.delay_ms, min(args.sample, args.nodes), args.concurrency)


if __name__ == "__main__":
    main()
