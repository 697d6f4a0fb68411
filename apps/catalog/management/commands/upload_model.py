"""Upload a model's weights to R2 from a Hugging Face repo or a folder (queued, or here with --sync)."""

from __future__ import annotations

import sys
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from apps.catalog.display import human_bytes
from apps.catalog.enqueue import upload_enqueue
from apps.catalog.management.commands._common import get_model
from apps.catalog.models import JobOrigin, UploadStatus, WeightUpload
from apps.catalog.uploads import UploadError, parse_hf_spec, upload_execute, upload_request


class Command(BaseCommand):
    help = "Upload NAME's weights to R2: from --from-hf REPO[@REV] (default: the model's repo) or --from-dir PATH."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("name", help="Served model name (see create_model).")
        source = parser.add_mutually_exclusive_group()
        source.add_argument("--from-hf", metavar="REPO[@REV]", default="", help="A hub repo, e.g. org/name@main.")
        source.add_argument("--from-dir", metavar="PATH", default="", help="A folder on this machine.")
        parser.add_argument("--prefix", default="", help="Object prefix (default models/<org>--<name>/<revision>).")
        parser.add_argument("--keep-downloads", action="store_true", help="Keep the files downloaded from the hub.")
        parser.add_argument("--sync", action="store_true", help="Upload here, now, with progress; don't enqueue.")

    def handle(self, *args: Any, **opts: Any) -> None:
        model = get_model(opts["name"])
        hf_repo, revision, local_dir = "", "", ""
        if opts["from_dir"]:
            local_dir = str(opts["from_dir"])
        elif opts["from_hf"]:
            hf_repo, revision = parse_hf_spec(opts["from_hf"])
        elif model.hf_repo:
            hf_repo, revision = model.hf_repo, model.hf_revision or "main"
        else:
            raise CommandError(f"{model.name} has no Hugging Face repo: pass --from-hf REPO[@REV] or --from-dir PATH.")
        if local_dir and not local_dir.startswith("/"):
            from pathlib import Path

            local_dir = str(Path(local_dir).resolve())
        try:
            upload = upload_request(
                model=model,
                hf_repo=hf_repo,
                revision=revision,
                local_dir=local_dir,
                prefix=opts["prefix"],
                keep_downloads=opts["keep_downloads"],
                origin=JobOrigin.COMMAND,
            )
        except UploadError as exc:
            raise CommandError(str(exc)) from exc
        source = f"{hf_repo}@{revision}" if hf_repo else local_dir
        if not opts["sync"]:
            upload_enqueue(upload=upload)
            target = str(upload.source["prefix"])
            if upload.source.get("prefix_auto"):  # the worker pins the revision to its commit
                target = f"{target.rsplit('/', 1)[0]}/<commit of {revision}>"
            self.stdout.write(
                f"Queued upload #{upload.pk} of {model.name} from {source} to {target}; follow it in the admin."
            )
            return
        self._run_here(upload.pk, source)

    def _run_here(self, upload_id: int, source: str) -> None:
        tty = sys.stdout.isatty()

        def show(p: dict) -> None:
            pct = 100 * p["done"] / p["total"] if p["total"] else 0.0
            eta = f"ETA {int((p['total'] - p['done']) / p['rate'])}s" if p["rate"] else "ETA ?"
            line = (
                f"{pct:5.1f}%  {human_bytes(p['done'])} / {human_bytes(p['total'])}  "
                f"{human_bytes(p['rate'])}/s  {eta}  {p['file']}"
            )
            self.stdout.write(line[:150].ljust(150) if tty else line, ending="\r" if tty else "\n")
            self.stdout.flush()

        self.stdout.write(f"Uploading from {source} …")
        status = upload_execute(upload_id=upload_id, on_progress=show)
        if tty:
            self.stdout.write("")
        upload = WeightUpload.objects.select_related("model").get(pk=upload_id)
        model = upload.model
        if upload.status != UploadStatus.UPLOADED:
            raise CommandError(f"Upload {status}: {upload.error or upload.get_status_display()}")
        self.stdout.write(
            self.style.SUCCESS(
                f"Uploaded {len(model.manifest)} file(s), {human_bytes(model.total_bytes)} to {model.storage_uri}"
            )
        )
