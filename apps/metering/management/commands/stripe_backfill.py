"""``manage.py stripe_backfill --start 2026-11-01 --end 2026-11-30``: send the Billing Meter events
of a range of rolled-up hours that were not sent (or only partly), then everything still due.
Safe to repeat: what was sent is recorded per tenant-hour-meter, and Stripe deduplicates by
identifier. Stripe accepts events at most 35 days old; older hours are skipped."""

from __future__ import annotations

from argparse import ArgumentParser
from typing import Any

from django.core.management.base import BaseCommand, CommandError
from django.db import transaction
from django.utils import timezone

from apps.metering import billing, stripe_billing
from apps.metering.timerange import parse_range


class Command(BaseCommand):
    help = "Send Stripe Billing Meter events for the rolled-up hours in [start, end) not sent yet."

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--start", required=True, help="ISO date/date-time or Unix seconds (UTC if no offset).")
        parser.add_argument("--end", required=True, help="Exclusive; rounded up to the hour.")
        parser.add_argument("--dry-run", action="store_true", help="Only show what would be sent.")

    def handle(self, *args: Any, **opts: Any) -> None:
        if not stripe_billing.enabled():
            raise CommandError("Stripe is off: set STRIPE_API_KEY (and the STRIPE_METER_* event names).")
        now = timezone.now()
        try:
            start, end = parse_range(start=opts["start"], end=opts["end"], now=now, max_days=40)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        if opts["dry_run"]:
            with transaction.atomic():
                plan = billing.meter_events_plan(start=start, end=end, now=now)
                for event in plan.created:
                    self.stdout.write(f"would send {event.identifier} {event.event_name} value={event.value}")
                transaction.set_rollback(True)
            return
        plan = billing.meter_events_plan(start=start, end=end, now=now)
        result = billing.meter_events_send(now=now)
        for error in result.errors:
            self.stderr.write(error)
        self.stdout.write(f"{len(plan.created)} new meter event(s) planned; {result.sent} sent, {result.failed} failed")
        if result.failed:
            raise CommandError(f"{result.failed} meter event(s) failed; they are kept and resent by the hourly task")
