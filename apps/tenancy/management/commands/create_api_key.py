from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandParser

from apps.tenancy.management.commands._common import (
    add_limit_arguments,
    csv_list,
    expiry_from_days,
    get_tenant,
    limits_from,
    service_errors,
)
from apps.tenancy.models import Scope
from apps.tenancy.services import api_key_issue


class Command(BaseCommand):
    help = (
        "Issue an API key for a tenant. The raw key is the last line of output and is shown only once. "
        "Example: create_api_key --tenant acme --name ci --scopes inference,usage:read"
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--tenant", required=True, help="Tenant slug.")
        parser.add_argument("--name", default="", help="A label for the key.")
        parser.add_argument(
            "--scopes",
            default=Scope.INFERENCE,
            help=f"Comma-separated, from: {', '.join(Scope.values)} (default: inference).",
        )
        parser.add_argument("--models", default=None, help="Comma-separated served model names (default: all).")
        parser.add_argument("--expires-days", type=int, default=None, help="Expire after N days (default: never).")
        add_limit_arguments(parser, what="override of the tenant's")

    def handle(self, *args: Any, **options: Any) -> None:
        tenant = get_tenant(options["tenant"])
        expires_at = expiry_from_days(options["expires_days"])
        with service_errors():
            key, raw = api_key_issue(
                tenant=tenant,
                name=options["name"],
                scopes=csv_list(options["scopes"]) or [],
                allowed_models=csv_list(options["models"]),
                expires_at=expires_at,
                **limits_from(options),
            )
        expiry = key.expires_at.isoformat() if key.expires_at else "never"
        self.stdout.write(
            self.style.SUCCESS(
                f"Created API key {key.prefix}… for {tenant.slug}: scopes {', '.join(key.scopes)}, "
                f"models {', '.join(key.allowed_models) or 'all'}, expires {expiry}."
            )
        )
        self.stdout.write("Store it now; it is not shown again:")
        self.stdout.write(raw)
