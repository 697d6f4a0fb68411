"""The benchmarks are not tests and their numbers are not checked here, but they must keep
working: each runs at toy size, end to end, against the real services, and must finish cleanly
with every answer correct."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse, urlunparse

import pytest
from django.conf import settings

pytestmark = pytest.mark.slow  # starts the benchmarks, as subprocesses

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str, timeout: float) -> str:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)
    assert out.returncode == 0, f"{args[0]} failed ({out.returncode}):\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    return out.stdout


def test_the_gateway_benchmark_runs_and_every_answer_is_correct():
    source = urlparse(os.environ["DATABASE_URL"])
    database = urlunparse(source._replace(path="/crosslogic_bench_check" + os.environ.get("TEST_DB_SUFFIX", "")))
    redis_db = urlparse(settings.REDIS_URL).path.strip("/") or "0"  # this run's own Redis database

    out = _run(
        "bench/gateway_bench.py",
        "--quick",
        "--concurrency",
        "4",
        "--seconds",
        "1",
        "--max-tokens",
        "8",
        "--flat-concurrency",
        "4",
        "--burst",
        "4",
        "--database-url",
        database,
        "--redis-db",
        redis_db,
        "--no-write",
        timeout=300,
    )

    assert "events identical (id/created aside)" in out
    rounds = [line for line in out.splitlines() if line.startswith("  ") and " tok/s " in line]
    assert len(rounds) == 4, "\n".join(rounds)  # 4 streams, 4 in lockstep, saturation, non-streaming
    assert any("lockstep" in line for line in rounds), "\n".join(rounds)
    assert all("errors 0/0, bad 0/0" in line for line in rounds), "\n".join(rounds)
    assert "| 4 |" in out  # the table it would write to docs/benchmarks.md


def test_the_upload_benchmark_runs_through_multipart():
    # Two 20 MiB shards: above the 16 MiB multipart threshold, so both paths send parts.
    out = _run(
        "bench/r2_upload_bench.py", "--size-mb", "40", "--shards", "2", "--rounds", "1", "--no-docs", timeout=300
    )

    assert "throughput ratio service / plain" in out and "upload worker peak memory" in out
    assert out.count("round 1 ") == 2  # both paths uploaded
    assert "R2 front: no request refused" in out  # through the https front that refuses what R2 refuses
