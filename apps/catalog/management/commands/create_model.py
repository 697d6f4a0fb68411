"""Add a model to the catalog."""

from __future__ import annotations

from decimal import Decimal, InvalidOperation
from typing import Any

from django.core.exceptions import ValidationError
from django.core.management.base import BaseCommand, CommandError, CommandParser

from apps.catalog.services import model_create


def _price(value: str | None, flag: str) -> Decimal | None:
    if value is None:
        return None
    try:
        price = Decimal(value)
    except InvalidOperation:
        raise CommandError(f"{flag}: '{value}' is not a number (USD per 1M tokens, e.g. 0.20).") from None
    if not price.is_finite() or price < 0:
        raise CommandError(f"{flag}: '{value}' must be a non-negative number of USD per 1M tokens.")
    return price


class Command(BaseCommand):
    help = "Create a catalog model: NAME is the `model` string customers send."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name")
        parser.add_argument("--hf-repo", default="", help="Hugging Face repo id, e.g. Qwen/Qwen2.5-7B-Instruct.")
        parser.add_argument("--revision", default="main", help="Branch, tag or commit of the repo.")
        parser.add_argument("--storage-uri", default="", help="s3://bucket/prefix holding the weights, if uploaded.")
        parser.add_argument("--price-in", default=None, help="USD per 1M input tokens.")
        parser.add_argument("--price-out", default=None, help="USD per 1M output tokens.")
        parser.add_argument("--accelerator", default=None, help="SkyPilot accelerator, e.g. L4:1 or A100-80GB:2.")
        parser.add_argument("--context-length", type=int, default=None)
        parser.add_argument("--min-replicas", type=int, default=None)
        parser.add_argument("--max-replicas", type=int, default=None)
        parser.add_argument("--inactive", action="store_true", help="Create it switched off.")

    def handle(self, *args: Any, **opts: Any) -> None:
        extra: dict[str, object] = {}
        for option, field in (
            ("accelerator", "accelerator"),
            ("context_length", "context_length"),
            ("min_replicas", "min_replicas"),
            ("max_replicas", "max_replicas"),
        ):
            if opts[option] is not None:
                extra[field] = opts[option]
        for option in ("context_length", "min_replicas", "max_replicas"):
            if opts[option] is not None and opts[option] < 0:
                raise CommandError(f"--{option.replace('_', '-')}: must not be negative.")
        if opts["inactive"]:
            extra["is_active"] = False
        try:
            model = model_create(
                name=opts["name"],
                hf_repo=opts["hf_repo"],
                hf_revision=opts["revision"],
                storage_uri=opts["storage_uri"],
                price_input_per_mtok=_price(opts["price_in"], "--price-in"),
                price_output_per_mtok=_price(opts["price_out"], "--price-out"),
                **extra,
            )
        except ValidationError as exc:
            details = "; ".join(f"{field}: {' '.join(msgs)}" for field, msgs in exc.message_dict.items())
            raise CommandError(f"Cannot create model '{opts['name']}': {details}") from exc
        self.stdout.write(
            self.style.SUCCESS(
                f"Created model {model.name} (id {model.pk}): ${model.price_input_per_mtok}/M in, "
                f"${model.price_output_per_mtok}/M out, {model.accelerator}, storage {model.storage_uri or 'not set'}."
            )
        )
