from __future__ import annotations

from typing import Any

from django.contrib.auth.models import User
from django.core.management.base import BaseCommand, CommandError, CommandParser

from apps.tenancy.management.commands._common import expiry_from_days, service_errors
from apps.tenancy.services import staff_token_issue


class Command(BaseCommand):
    help = (
        "Issue a management-API token (cls_…) for a staff user. The raw token is the last line of output "
        "and is shown only once. Example: create_staff_token --user alice --name deploy"
    )

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--user", required=True, help="Username of an active staff user.")
        parser.add_argument("--name", default="", help="A label for the token.")
        parser.add_argument("--expires-days", type=int, default=None, help="Expire after N days (default: never).")

    def handle(self, *args: Any, **options: Any) -> None:
        try:
            user = User.objects.get(username=options["user"])
        except User.DoesNotExist:
            raise CommandError(f"No user '{options['user']}'. Create one with createsuperuser.") from None
        if not user.is_active:
            raise CommandError(f"User '{user.username}' is inactive.")
        expires_at = expiry_from_days(options["expires_days"])
        with service_errors():
            token, raw = staff_token_issue(user=user, name=options["name"], expires_at=expires_at)
        self.stdout.write(self.style.SUCCESS(f"Created staff token {token.prefix}… for {user.username}."))
        self.stdout.write("Use it as 'Authorization: Bearer <token>'. Store it now; it is not shown again:")
        self.stdout.write(raw)
