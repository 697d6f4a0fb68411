"""List the model folders in the bucket: size, files, manifest state, and the catalog model using each."""

from __future__ import annotations

from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from apps.catalog.display import human_bytes
from apps.catalog.selectors import storage_browser
from apps.catalog.storage import StorageError


class Command(BaseCommand):
    help = "List model prefixes in R2_BUCKET with total size, file count, manifest state and catalog model."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--bucket", default="", help="Another bucket than R2_BUCKET.")

    def handle(self, *args: Any, **opts: Any) -> None:
        try:
            rows = storage_browser(bucket=opts["bucket"] or None)
        except StorageError as exc:
            raise CommandError(str(exc)) from exc
        if not rows:
            self.stdout.write("No model folders in the bucket yet (upload one with upload_model).")
            return
        self.stdout.write(f"{'PREFIX':<50} {'SIZE':>10} {'FILES':>5}  {'MANIFEST':<9} MODEL")
        for row in rows:
            names = ", ".join(m.name for m in row.models) or "-"
            size = human_bytes(row.total_bytes)
            self.stdout.write(f"{row.prefix:<50} {size:>10} {row.file_count:>5}  {row.manifest_state:<9} {names}")
            for problem in row.manifest_problems[:5]:
                self.stdout.write(f"    ! {problem}")
