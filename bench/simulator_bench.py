"""How many SSE chunks per second the simulator serves, flat out (``--ttft-ms 0 --itl-ms 0``) or paced.

    .venv/bin/python bench/simulator_bench.py [--streams 32] [--tokens 256] [--rounds 4] [--itl-ms 0]

Starts ``python -m vllm_sim`` as a subprocess, drives concurrent streaming chat requests
at it with aiohttp, and prints chunks/s and the simulator's CPU seconds per 1,000 chunks (from
/proc). Bounded in count and time; a dev tool, not a test.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from pathlib import Path

import aiohttp

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run as a script from anywhere

from vllm_sim import run_simulator_process


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as stat:
        fields = stat.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime


async def _drive(url: str, streams: int, tokens: int, rounds: int) -> int:
    body = {"model": "bench", "messages": [{"role": "user", "content": "go"}], "max_tokens": tokens, "stream": True}
    connector = aiohttp.TCPConnector(limit=streams)
    timeout = aiohttp.ClientTimeout(total=60)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:

        async def one() -> int:
            chunks = 0
            async with session.post(url + "/v1/chat/completions", json=body) as response:
                async for line in response.content:
                    if line.startswith(b"data: {"):
                        chunks += 1
            return chunks

        total = 0
        for _ in range(rounds):
            total += sum(await asyncio.gather(*(one() for _ in range(streams))))
        return total


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--streams", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--itl-ms", type=float, default=0.0, help="paced streams instead of flat out")
    args = parser.parse_args()
    with run_simulator_process(model="bench", ttft_ms=0, itl_ms=args.itl_ms) as sim:
        cpu0, t0 = _cpu_seconds(sim.proc.pid), time.perf_counter()
        chunks = asyncio.run(_drive(sim.url, args.streams, args.tokens, args.rounds))
        elapsed, cpu = time.perf_counter() - t0, _cpu_seconds(sim.proc.pid) - cpu0
    print(
        f"{chunks} chunks in {elapsed:.2f}s: {chunks / elapsed:,.0f} chunks/s "
        f"(client and simulator share the machine); simulator CPU {cpu:.2f}s = "
        f"{1000 * cpu / chunks * 1000:.1f} ms per 1,000 chunks -> ~{chunks / cpu:,.0f} chunks/s per core"
    )


if __name__ == "__main__":
    main()
