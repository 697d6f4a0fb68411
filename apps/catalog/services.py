"""Writes for the model catalog. The weights pipeline to R2 lives in uploads.py."""

from __future__ import annotations

from decimal import Decimal

from apps.catalog.models import ServedModel
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
) -> ServedModel:
    model = ServedModel(name=name, hf_repo=hf_repo, hf_revision=hf_revision or "main", storage_uri=storage_uri)
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


def model_update(*, model: ServedModel, **fields: object) -> ServedModel:
    """Change the named ``fields`` of a saved model (a new instance is saved whole).

    Upload progress and status live on WeightUpload rows, so edits and uploads no longer write the
    same row every second; the named columns are still the only ones written because a finishing
    upload publishes ``storage_uri``, ``manifest`` and ``total_bytes`` here, and a save from a copy
    read before that would undo it.
    """
    for field, value in fields.items():
        setattr(model, field, value)
    model.full_clean()
    model.save(update_fields=[*fields, "updated_at"] if model.pk is not None else None)
    invalidation.bump(invalidation.ROUTING)
    return model


def model_delete(*, model: ServedModel) -> None:
    """Delete a catalog entry that no node ever served (usage and nodes keep their history)."""
    from django.core.exceptions import ValidationError

    if model.nodes.exists():
        raise ValidationError(f"{model.name} has nodes (live or past): deactivate it instead of deleting it.")
    model.delete()
    invalidation.bump(invalidation.ROUTING)
