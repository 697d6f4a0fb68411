"""Helpers shared by the tenancy management commands."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta

from django.core.exceptions import PermissionDenied, ValidationError
from django.core.management.base import CommandError, CommandParser
from django.utils import timezone

from apps.tenancy.models import Tenant


@contextmanager
def service_errors() -> Iterator[None]:
    """Turn a service's ValidationError into a CommandError that names the field."""
    try:
        yield
    except ValidationError as exc:
        if hasattr(exc, "error_dict"):
            lines = [f"{field}: {' '.join(messages)}" for field, messages in exc.message_dict.items()]
        else:
            lines = exc.messages
        raise CommandError("; ".join(lines)) from None
    except PermissionDenied as exc:
        raise CommandError(str(exc)) from None


def csv_list(value: str | None) -> list[str] | None:
    if value is None:
        return None
    return [part.strip() for part in value.split(",") if part.strip()]


def get_tenant(slug: str) -> Tenant:
    try:
        return Tenant.objects.get(slug=slug)
    except Tenant.DoesNotExist:
        known = ", ".join(Tenant.objects.order_by("slug").values_list("slug", flat=True)[:10]) or "none yet"
        raise CommandError(f"No tenant '{slug}' (known: {known}). Create it with create_tenant.") from None


def expiry_from_days(days: int | None) -> datetime | None:
    if days is None:
        return None
    if days < 1:
        raise CommandError("--expires-days must be at least 1.")
    return timezone.now() + timedelta(days=days)


def add_limit_arguments(parser: CommandParser, *, what: str) -> None:
    parser.add_argument("--rpm", type=int, dest="requests_per_minute", help=f"Requests per minute ({what}).")
    parser.add_argument("--tpm", type=int, dest="tokens_per_minute", help=f"Tokens per minute ({what}).")
    parser.add_argument(
        "--concurrency", type=int, dest="max_concurrent_requests", help=f"Max concurrent requests ({what})."
    )


def limits_from(options: dict) -> dict[str, int]:
    limits = {}
    for field in ("requests_per_minute", "tokens_per_minute", "max_concurrent_requests"):
        value = options.get(field)
        if value is not None:
            if value < 1:
                raise CommandError(f"{field}: must be at least 1.")
            limits[field] = value
    return limits
