from __future__ import annotations

import argparse
from decimal import Decimal, InvalidOperation
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from apps.tenancy.management.commands._common import add_limit_arguments, limits_from, service_errors
from apps.tenancy.services import tenant_create


def _dollars(text: str) -> Decimal:
    try:
        value = Decimal(text)
    except InvalidOperation:
        value = Decimal("NaN")
    if not value.is_finite() or value < 0:
        raise argparse.ArgumentTypeError(f"{text!r} is not an amount of US dollars (0 or more, e.g. 25 or 2.50)")
    return value


class Command(BaseCommand):
    help = "Create a tenant. Example: create_tenant acme --name 'Acme Corp' --email ops@acme.com --rpm 600"

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("slug", help="Short unique id: letters, digits, - and _.")
        parser.add_argument("--name", default="", help="Display name (defaults to the slug).")
        parser.add_argument("--email", default="", help="Contact email.")
        add_limit_arguments(parser, what="tenant default")
        parser.add_argument(
            "--monthly-budget",
            type=int,
            dest="monthly_token_budget",
            help="Tokens per calendar month (default: unlimited).",
        )
        parser.add_argument(
            "--spend-limit",
            type=_dollars,
            dest="spend_limit_usd",
            metavar="USD",
            help="US$ per calendar month, e.g. 25 or 2.50 (default: no limit); 429 insufficient_quota beyond it.",
        )

    def handle(self, *args: Any, **options: Any) -> None:
        limits = limits_from(options)
        if options["monthly_token_budget"] is not None:
            if options["monthly_token_budget"] < 0:
                raise CommandError("monthly_token_budget: must not be negative.")
            limits["monthly_token_budget"] = options["monthly_token_budget"]
        if options["spend_limit_usd"] is not None:
            limits["monthly_spend_limit_micros"] = int((options["spend_limit_usd"] * 1_000_000).to_integral_value())
        with service_errors():
            tenant = tenant_create(slug=options["slug"], name=options["name"], contact_email=options["email"], **limits)
        budget = tenant.monthly_token_budget if tenant.monthly_token_budget is not None else "unlimited"
        spend = tenant.monthly_spend_limit_micros
        spend_text = "none" if spend is None else f"${spend / 1_000_000:,.2f}"
        self.stdout.write(self.style.SUCCESS(f"Created tenant {tenant.slug} ({tenant.name})"))
        self.stdout.write(
            f"limits: {tenant.requests_per_minute} req/min, {tenant.tokens_per_minute} tokens/min, "
            f"{tenant.max_concurrent_requests} concurrent, monthly budget {budget}, monthly spend limit {spend_text}"
        )
