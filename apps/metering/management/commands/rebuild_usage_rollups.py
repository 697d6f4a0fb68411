"""``manage.py rebuild_usage_rollups --start 2026-11-01 --end 2026-11-30``: recompute the hourly
rollups of a range from the raw records (apps.metering.rollups.rollups_build, one hour at a time).
Safe to run any time: each hour is replaced as a whole. Hours whose raw records retention has
already deleted are left as they are."""

from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.utils import timezone

from apps.metering.rollups import rollups_build_range
from apps.metering.timerange import parse_range


class Command(BaseCommand):
    help = "Recompute the hourly usage rollups of [start, end) from raw usage records (complete hours only)."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--start", required=True, help="ISO date/date-time or Unix seconds (UTC if no offset).")
        parser.add_argument("--end", required=True, help="Exclusive; rounded up to the hour.")

    def handle(self, *args: Any, **opts: Any) -> None:
        now = timezone.now()
        try:
            start, end = parse_range(start=opts["start"], end=opts["end"], now=now, max_days=3660)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        results = rollups_build_range(start=start, end=end, now=now)
        kept = [r for r in results if r.groups < 0]
        for result in results:
            if result.groups >= 0 and int(opts["verbosity"]) > 1:
                self.stdout.write(f"{result.hour:%Y-%m-%d %H}:00  {result.records} records, {result.groups} rows")
        self.stdout.write(
            self.style.SUCCESS(
                f"{len(results) - len(kept)} hour(s) rebuilt from {sum(r.records for r in results if r.groups >= 0)} "
                f"records" + (f"; {len(kept)} pruned hour(s) kept as they were" if kept else "")
            )
        )
