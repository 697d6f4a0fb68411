"""A compact history of each node's load, for utilisation: one row per node per UTC hour.

The health check sees a node's ``requests_running``/``requests_waiting`` every
FLEET_HEALTH_INTERVAL_S; the Node row keeps only the latest. Each pass adds one sample per
checked node to that node's current hour with one ``INSERT … ON CONFLICT DO UPDATE`` that adds
to the counters (PostgreSQL and SQLite ≥ 3.24 both speak it), so concurrent passes never lose a
sample and nothing is read first. A sample is *busy* when the check succeeded and the node had
requests running or waiting; a failed check is a sample that is not busy (the node served
nothing we could see).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from django.db import connection

from apps.fleet.models import NodeLoadHour


@dataclass(frozen=True)
class LoadSample:
    node_id: int
    ok: bool
    running: int = 0
    waiting: int = 0

    @property
    def busy(self) -> bool:
        return self.ok and (self.running + self.waiting) > 0


def hour_start(at: datetime) -> datetime:
    return at.replace(minute=0, second=0, microsecond=0)


def node_load_record(*, samples: Iterable[LoadSample], at: datetime, batch: int = 1000) -> int:
    """Add one sample per node to the hour holding ``at``; returns how many were written."""
    rows = list(samples)
    if not rows:
        return 0
    table = NodeLoadHour._meta.db_table
    hour = connection.ops.adapt_datetimefield_value(hour_start(at))
    with connection.cursor() as cursor:
        for i in range(0, len(rows), batch):
            chunk = rows[i : i + batch]
            params: list[Any] = []
            for s in chunk:
                running, waiting = (max(0, s.running), max(0, s.waiting)) if s.ok else (0, 0)
                params += [s.node_id, hour, 1, int(s.busy), running, waiting]
            values = ", ".join(["(%s, %s, %s, %s, %s, %s)"] * len(chunk))
            cursor.execute(
                f"INSERT INTO {table} (node_id, hour, samples, busy_samples, running_sum, waiting_sum) "  # noqa: S608
                f"VALUES {values} ON CONFLICT (node_id, hour) DO UPDATE SET "
                f"samples = {table}.samples + excluded.samples, "
                f"busy_samples = {table}.busy_samples + excluded.busy_samples, "
                f"running_sum = {table}.running_sum + excluded.running_sum, "
                f"waiting_sum = {table}.waiting_sum + excluded.waiting_sum",
                params,
            )
    return len(rows)
