"""Writes for the model catalog. The weights pipeline to R2 lives in uploads.py."""

from __future__ import annotations

from decimal import Decimal

from apps.catalog.models import Model
from apps.core import invalidation


def model_create(
    *,
    name: str,
    hf_repo: str = "",
    hf_revision: str = "main",
    storage_uri: str = "",
    price_input_per_mtok: Decimal | None = None,
    price_output_per_mtok: Decimal | None = None,
    **fields: object,
) -> Model:
    model = Model(name=name, hf_repo=hf_repo, hf_revision=hf_revision or "main", storage_uri=storage_uri)
    if price_input_per_mtok is not None:
        model.price_input_per_mtok = price_input_per_mtok
    if price_output_per_mtok is not None:
        model.price_output_per_mtok = price_output_per_mtok
    for field, value in fields.items():
        setattr(model, field, value)
    model.full_clean()
    model.save()
    invalidation.bump(invalidation.ROUTING)
    return model


def model_update(*, model: Model, **fields: object) -> Model:
    """Change ``fields`` (all of the row when none are named, e.g. for a new instance).

    Only the named columns are written: the upload worker updates progress and status on the
    same row concurrently, and a whole-row save from a stale copy would undo its writes.
    """
    for field, value in fields.items():
        setattr(model, field, value)
    model.full_clean()
    if fields and model.pk is not None:
        model.save(update_fields=[*fields, "updated_at"])
    else:
        model.save()
    invalidation.bump(invalidation.ROUTING)
    return model


def model_delete(*, model: Model) -> None:
    """Delete a catalog entry that no node ever served (usage and nodes keep their history)."""
    from django.core.exceptions import ValidationError

    if model.nodes.exists():
        raise ValidationError(f"{model.name} has nodes (live or past): deactivate it instead of deleting it.")
    model.delete()
    invalidation.bump(invalidation.ROUTING)
