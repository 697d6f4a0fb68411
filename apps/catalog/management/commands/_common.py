"""Helpers shared by the catalog's management commands."""

from __future__ import annotations

from django.core.management.base import CommandError

from apps.catalog.models import ServedModel


def get_model(name: str) -> ServedModel:
    try:
        return ServedModel.objects.get(name=name)
    except ServedModel.DoesNotExist:
        known = ", ".join(ServedModel.objects.order_by("name").values_list("name", flat=True)[:10]) or "none yet"
        raise CommandError(f"No model named '{name}' (known: {known}). Create it with create_model.") from None
