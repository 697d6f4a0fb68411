"""Helpers shared by the catalog's management commands."""

from __future__ import annotations

from django.core.management.base import CommandError

from apps.catalog.models import Model


def get_model(name: str) -> Model:
    try:
        return Model.objects.get(name=name)
    except Model.DoesNotExist:
        known = ", ".join(Model.objects.order_by("name").values_list("name", flat=True)[:10]) or "none yet"
        raise CommandError(f"No model named '{name}' (known: {known}). Create it with create_model.") from None

