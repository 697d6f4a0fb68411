"""bench/dashboard_bench.py must keep working: at toy size, end to end, on its own database."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse, urlunparse

import pytest

pytestmark = pytest.mark.slow  # runs the benchmark as a subprocess

ROOT = Path(__file__).resolve().parents[3]


def test_the_dashboard_benchmark_generates_data_and_times_the_page():
    source = urlparse(os.environ["DATABASE_URL"])
    name = "/crosslogic_dashboard_bench_check" + os.environ.get("TEST_DB_SUFFIX", "")
    database = urlunparse(source._replace(path=name))
    out = subprocess.run(
        [
            sys.executable,
            "bench/dashboard_bench.py",
            "--records",
            "5000",
            "--rollup-days",
            "3",
            "--tenants",
            "2",
            "--models",
            "2",
            "--nodes",
            "4",
            "--runs",
            "2",
            "--database-url",
            database,
        ],
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "5,000 raw records" in out.stdout and "288 rollup rows" in out.stdout  # 72 h x 2 x 2
    assert "GET /admin/dashboard/ " in out.stdout and "GET /admin/dashboard/data.json" in out.stdout
    queries = re.search(r"first call \(cold caches\): [\d.]+ ms, (\d+) queries", out.stdout)
    assert queries is not None and int(queries.group(1)) <= 13  # as apps/metering/tests/test_dashboard.py
