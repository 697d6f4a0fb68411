"""Check a model's objects in the bucket against its manifest."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from apps.catalog.management.commands._common import get_model
from apps.catalog.models import JobOrigin
from apps.catalog.storage import StorageError
from apps.catalog.verify import verify_model


class Command(BaseCommand):
    help = "Verify NAME's objects: size and stored sha256 per file (--full also re-hashes every object's bytes)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name")
        parser.add_argument(
            "--full", action="store_true", help="Stream every object and recompute its sha256 (reads the whole model)."
        )

    def handle(self, *args: Any, **opts: Any) -> None:
        model = get_model(opts["name"])
        try:
            report = verify_model(model=model, full=opts["full"], origin=JobOrigin.COMMAND)
        except StorageError as exc:
            raise CommandError(str(exc)) from exc
        for problem in report.problems:
            self.stdout.write(self.style.ERROR(f"MISMATCH {problem}"))
        if not report.ok:
            raise CommandError(report.summary())
        self.stdout.write(self.style.SUCCESS(report.summary()))
