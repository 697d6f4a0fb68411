"""Dashboard benchmark: how fast /admin/dashboard/ opens over 1M raw usage records and a year of rollups.

It creates (or reuses) its own PostgreSQL database, fills it with generate_series inside the server
(no row crosses the wire, so 1M records take seconds), then times, over --runs runs each:
  1. dashboard_data(): every number the page shows (the selector both views call);
  2. GET /admin/dashboard/ as a staff user (selector + template), through Django's test client;
  3. GET /admin/dashboard/data.json (what the page refetches every DASHBOARD_REFRESH_S).
It prints the queries per call (the same at any size: apps/metering/tests/test_dashboard.py) and
the median, p95 and max against the 300 ms target, with this process's own CPU time and the machine's load
average (on a shared machine wall time mostly measures the queue for a core).

    DATABASE_URL=postgres://postgres@127.0.0.1:5432/postgres .venv/bin/python bench/dashboard_bench.py
    … --records 1000000 --days 30 --rollup-days 365 --tenants 10 --models 4 --runs 10
    … --days 1          # the worst case: all 1M records in the last 24 h
    … --reuse           # keep the data of the previous run (same sizes), only time

The database (default crosslogic_dashboard_bench on DATABASE_URL's server) is dropped at the end
unless --keep or --reuse is given.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path
from urllib.parse import urlparse, urlunparse

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

TARGET_MS = 300.0


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--records", type=int, default=1_000_000, help="raw usage records (default 1,000,000)")
    p.add_argument("--days", type=float, default=30, help="the records are spread evenly over this many days")
    p.add_argument("--rollup-days", type=int, default=365, help="days of hourly rollups (default 365)")
    p.add_argument("--tenants", type=int, default=10)
    p.add_argument("--models", type=int, default=4)
    p.add_argument("--nodes", type=int, default=40, help="nodes (half live), with events and load history")
    p.add_argument("--runs", type=int, default=10)
    p.add_argument("--database-url", default="", help="default: crosslogic_dashboard_bench on DATABASE_URL's server")
    p.add_argument("--reuse", action="store_true", help="time the data a previous --keep run left")
    p.add_argument("--keep", action="store_true", help="leave the database for another run")
    return p.parse_args(argv)


def bench_database_url(args: argparse.Namespace) -> str:
    if args.database_url:
        return args.database_url
    source = urlparse(os.environ.get("DATABASE_URL") or "postgres://postgres@127.0.0.1:5432/postgres")
    if not source.scheme.startswith("postgres"):
        raise SystemExit("dashboard_bench needs PostgreSQL: set DATABASE_URL=postgres://… or --database-url")
    return urlunparse(source._replace(path="/crosslogic_dashboard_bench"))


def _admin_connection(url: str):
    import psycopg

    parts = urlparse(url)
    return psycopg.connect(urlunparse(parts._replace(path="/postgres")), autocommit=True)


def ensure_database(url: str) -> None:
    name = urlparse(url).path.lstrip("/")
    with _admin_connection(url) as conn:
        if not conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone():
            conn.execute(f'CREATE DATABASE "{name}"')


def drop_database(url: str) -> None:
    from django.db import connections

    connections.close_all()
    name = urlparse(url).path.lstrip("/")
    with _admin_connection(url) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def generate(args: argparse.Namespace) -> dict[str, float]:
    """Tenants, models, nodes; then records and rollups with one INSERT … SELECT each."""
    from django.db import connection, transaction
    from django.utils import timezone

    from apps.metering import histograms

    timings: dict[str, float] = {}
    started = time.perf_counter()
    with connection.cursor() as cur:
        cur.execute(
            "TRUNCATE metering_usagerecord, metering_usagerollup, metering_usagerolluphour, fleet_nodeloadhour, "
            "fleet_nodeevent, fleet_node, catalog_model, tenancy_tenant RESTART IDENTITY CASCADE"
        )
    now = timezone.now()
    with transaction.atomic(), connection.cursor() as cur:
        # Small tables through the ORM (columns other branches add keep their defaults).
        from apps.catalog.models import ServedModel
        from apps.tenancy.models import Tenant

        Tenant.objects.bulk_create([Tenant(slug=f"bench-{i}", name=f"Bench tenant {i}") for i in range(args.tenants)])
        ServedModel.objects.bulk_create(
            [
                ServedModel(name=f"bench-model-{i}", hf_repo=f"org/bench-{i}", total_bytes=(i + 1) * 16 * 10**9)
                for i in range(args.models)
            ]
        )
        cur.execute("SELECT min(id), max(id) FROM tenancy_tenant")
        t_min, t_max = cur.fetchone()
        cur.execute("SELECT min(id), max(id) FROM catalog_model")
        m_min, m_max = cur.fetchone()
        span_s = args.days * 86400
        # Records: evenly spread over --days up to now, round-robin over tenants and models.
        cur.execute(
            "INSERT INTO metering_usagerecord (request_id, tenant_id, api_key_id, model_id, model_name, node_id, "
            "endpoint, prompt_tokens, completion_tokens, estimated, streamed, status_code, ttft_ms, latency_ms, "
            "cost_micros, created_at) "
            "SELECT 'bench-' || g, %(t0)s + g %% %(nt)s, NULL, %(m0)s + g %% %(nm)s, "
            "'bench-model-' || (g %% %(nm)s), NULL, 'chat.completions', 100 + g %% 900, 20 + g %% 300, false, true, "
            "CASE WHEN g %% 97 = 0 THEN 502 WHEN g %% 89 = 0 THEN 429 ELSE 200 END, 20 + (g %% 500), "
            "200 + (g %% 4000), 50 + g %% 1000, %(now)s - make_interval(secs => g * %(step)s) "
            "FROM generate_series(0, %(n)s - 1) g",
            {
                "t0": t_min,
                "nt": t_max - t_min + 1,
                "m0": m_min,
                "nm": m_max - m_min + 1,
                "n": args.records,
                "step": span_s / max(1, args.records),
                "now": now,
            },
        )
        timings["records_s"] = time.perf_counter() - started
        # A year of hourly rollups for every tenant x model, built up to the hour before this one
        # (the current hour is read live from the raw records, as in production).
        hist = "[" + ",".join(str(10 if 18 <= i <= 30 else 0) for i in range(histograms.BUCKETS)) + "]"
        step = time.perf_counter()
        cur.execute(
            "INSERT INTO metering_usagerollup (hour, tenant_id, api_key_id, api_key_prefix, model_id, model_name, "
            "requests, errors_4xx, errors_429, errors_5xx, cancelled, prompt_tokens, completion_tokens, "
            "estimated_requests, estimated_tokens, cost_micros, ttft_hist, latency_hist, built_at) "
            "SELECT h, t.id, NULL, '', m.id, m.name, 130, 1, 1, 1, 0, 60000, 20000, 0, 0, 70000, "
            "%(hist)s::jsonb, %(hist)s::jsonb, now() "
            "FROM generate_series(date_trunc('hour', %(now)s::timestamptz) - make_interval(days => %(days)s), "
            "date_trunc('hour', %(now)s::timestamptz) - interval '1 hour', interval '1 hour') h "
            "CROSS JOIN tenancy_tenant t CROSS JOIN catalog_model m",
            {"hist": hist, "now": now, "days": args.rollup_days},
        )
        cur.execute(
            "INSERT INTO metering_usagerolluphour (hour, built_at, records, max_record_id, pruned_at) "
            "SELECT DISTINCT hour, now(), 0, 0, NULL::timestamptz FROM metering_usagerollup"
        )
        timings["rollups_s"] = time.perf_counter() - step
        # Nodes: half terminated over the last month, half live; their events; a week of load history.
        from datetime import timedelta
        from decimal import Decimal

        from apps.fleet.models import Node, NodeEvent

        nodes = []
        for g in range(1, args.nodes + 1):
            requested = now - timedelta(days=1 + g % 29)
            live = g % 2 == 0
            nodes.append(
                Node(
                    model_id=m_min + g % (m_max - m_min + 1),
                    cloud="aws",
                    region="us-east-1",
                    accelerator="L4:1",
                    hourly_cost=Decimal("0.8"),
                    cluster_name=f"bench-{g}",
                    status="ready" if live else "terminated",
                    requested_at=requested,
                    ready_at=requested + timedelta(minutes=4),
                    terminated_at=None if live else now - timedelta(hours=g),
                    requests_running=g % 5,
                    requests_waiting=g % 3,
                    kv_cache_usage=0.5,
                )
            )
        Node.objects.bulk_create(nodes)
        events = []
        for node in Node.objects.all():
            events.append(
                NodeEvent(
                    node=node,
                    created_at=node.requested_at,
                    kind="action",
                    to_status="pending",
                    message="requested (skypilot)",
                    actor="bench",
                )
            )
            if node.terminated_at is not None:
                events.append(
                    NodeEvent(
                        node=node,
                        created_at=node.terminated_at,
                        kind="transition",
                        from_status="terminating",
                        to_status="terminated",
                        actor="bench",
                    )
                )
        NodeEvent.objects.bulk_create(events)
        cur.execute(
            "INSERT INTO fleet_nodeloadhour (node_id, hour, samples, busy_samples, running_sum, waiting_sum) "
            "SELECT n.id, h, 240, 120 + n.id %% 120, 300, 20 FROM fleet_node n CROSS JOIN generate_series("
            "date_trunc('hour', %(now)s::timestamptz) - interval '7 days', date_trunc('hour', %(now)s::timestamptz), "
            "interval '1 hour') h WHERE h >= n.requested_at AND (n.terminated_at IS NULL OR h < n.terminated_at)",
            {"now": now},
        )
    with connection.cursor() as cur:
        cur.execute("ANALYZE")
    timings["total_s"] = time.perf_counter() - started
    return timings


def counts() -> dict[str, float]:
    from django.db import connection

    with connection.cursor() as cur:
        out = {}
        for table in ("metering_usagerecord", "metering_usagerollup", "fleet_node"):
            cur.execute(f"SELECT count(*) FROM {table}")
            out[table] = cur.fetchone()[0]
        cur.execute("SELECT EXTRACT(EPOCH FROM max(created_at) - min(created_at)) FROM metering_usagerecord")
        out["record_days"] = float(cur.fetchone()[0] or 0) / 86400
    return out


def _stats(samples: list[float], cpu: list[float]) -> str:
    ordered = sorted(samples)
    p95 = ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]
    verdict = "OK" if statistics.median(ordered) < TARGET_MS else "OVER TARGET"
    return (
        f"median {statistics.median(ordered):7.1f} ms   p95 {p95:7.1f} ms   max {ordered[-1]:7.1f} ms   "
        f"(Python CPU median {statistics.median(cpu):6.1f} ms)   {verdict}"
    )


def measure(runs: int) -> list[str]:
    from django.contrib.auth.models import User
    from django.db import connection
    from django.test import Client
    from django.test.utils import CaptureQueriesContext

    from apps.metering.dashboard import dashboard_data

    user, _ = User.objects.get_or_create(username="bench-staff", defaults={"is_staff": True, "is_superuser": True})
    client = Client()
    client.force_login(user)
    lines = []
    with CaptureQueriesContext(connection) as queries:
        cold_started = time.perf_counter()
        dashboard_data()
        cold = (time.perf_counter() - cold_started) * 1000
    lines.append(f"first call (cold caches): {cold:.1f} ms, {len(queries)} queries")
    for label, call in (
        ("dashboard_data()", lambda: dashboard_data()),
        ("GET /admin/dashboard/", lambda: _get(client, "/admin/dashboard/")),
        ("GET /admin/dashboard/data.json", lambda: _get(client, "/admin/dashboard/data.json")),
    ):
        samples, cpu = [], []
        for _ in range(runs):
            started, cpu_started = time.perf_counter(), time.process_time()
            call()
            samples.append((time.perf_counter() - started) * 1000)
            cpu.append((time.process_time() - cpu_started) * 1000)
        lines.append(f"{label:32s} {_stats(samples, cpu)}")
    return lines


def _get(client, path: str) -> None:
    response = client.get(path)
    if response.status_code != 200:
        raise SystemExit(f"{path} answered {response.status_code}")


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    url = bench_database_url(args)
    ensure_database(url)
    os.environ["DATABASE_URL"] = url
    # The dashboard caches settled minutes and closed days: an in-process cache starts empty and
    # cannot mix with another database's numbers in a shared Redis.
    os.environ["REDIS_URL"] = ""
    os.environ.setdefault("DJANGO_SETTINGS_MODULE", "crosslogic.settings")
    os.environ.setdefault("DEBUG", "true")
    import django

    django.setup()
    from django.core.management import call_command

    try:
        call_command("migrate", verbosity=0, interactive=False)
        if not args.reuse:
            timings = generate(args)
            print(
                f"generated in {timings['total_s']:.1f} s (records {timings['records_s']:.1f} s, "
                f"rollups {timings['rollups_s']:.1f} s)"
            )
        sizes = counts()
        print(
            f"data: {sizes['metering_usagerecord']:,} raw records over {sizes['record_days']:.1f} days, "
            f"{sizes['metering_usagerollup']:,} rollup rows, {sizes['fleet_node']:,} nodes"
        )
        load = os.getloadavg()
        print(f"load average before timing: {load[0]:.1f} {load[1]:.1f} {load[2]:.1f} on {os.cpu_count()} CPUs")
        for line in measure(args.runs):
            print(line)
        load = os.getloadavg()
        print(f"load average after timing:  {load[0]:.1f} {load[1]:.1f} {load[2]:.1f}")
    finally:
        if not (args.keep or args.reuse):
            drop_database(url)
    return 0


if __name__ == "__main__":
    sys.exit(main())
