"""The rate limiter alone, in process (not a test): CPU of the calling process, script calls and
Redis's own time in scripts per admitted-and-settled request, with ``--concurrency`` tasks
admitting against the limits the bench's key has (a tenant and its share of one model).

The checkout whose apps/ is measured is the one you run it from (with PYTHONPATH set to it), so
an older commit runs the same loop.
The Redis database (REDIS_URL, or --redis-url) is flushed. INFO commandstats is server-wide: use
a Redis no one else is busy with, or read the Redis numbers as upper bounds.

    cd /work/main && PYTHONPATH=$PWD /work/wt/leases/.venv/bin/python \\
        /work/wt/leases/bench/limiter_cost.py --redis-url redis://127.0.0.1:6379/3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time

import django


async def run(requests: int, concurrency: int) -> dict:
    from apps.core import redis as redis_lib
    from apps.gateway import limits as limits_module
    from apps.gateway.limits import Limit, RateLimiter

    sync = redis_lib.client()
    assert sync is not None, "REDIS_URL is not set"
    sync.flushdb()
    hot = redis_lib.multiplexed()
    limiter = RateLimiter(hot)
    limits = [
        Limit("key:1", None, None, None),
        Limit("tenant:1", 100_000_000, 2_000_000_000, 100_000),
        Limit("tenant:1:model:1", None, None, 128),
    ]

    def scripts() -> tuple[int, int]:
        stats = sync.info("commandstats").get("cmdstat_evalsha", {})
        return stats.get("calls", 0), stats.get("usec", 0)

    done = 0

    async def client(c: int) -> None:
        nonlocal done
        while done < requests:
            done += 1
            admission = await limiter.admit(limits=limits, reserve_tokens=300, request_id=f"{c}-{done}")
            assert admission.allowed
            await asyncio.sleep(0)  # the request runs
            await limiter.settle(admission, used_tokens=200)

    calls0, usec0 = scripts()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    await asyncio.gather(*(client(c) for c in range(concurrency)))
    cpu, wall = time.process_time() - cpu0, time.perf_counter() - wall0
    calls, usec = scripts()
    await limiter.drain()
    await hot.aclose()
    sync.flushdb()
    return {
        "limits": limits_module.__file__,
        "requests": done,
        "cpu_us_per_request": round(cpu / done * 1e6, 1),
        "wall_us_per_request": round(wall / done * 1e6, 1),
        "scripts_per_request": round((calls - calls0) / done, 3),
        "redis_script_us_per_request": round((usec - usec0) / done, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--requests", type=int, default=20_000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--redis-url", default=None, help="Redis to use (flushed); default REDIS_URL")
    args = parser.parse_args()
    if args.redis_url:
        os.environ["REDIS_URL"] = args.redis_url
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "crosslogic.settings")
    django.setup()
    print(json.dumps(asyncio.run(run(args.requests, args.concurrency))))


if __name__ == "__main__":
    main()
