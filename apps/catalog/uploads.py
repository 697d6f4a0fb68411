"""The weights pipeline to R2, as services: request, run (in the worker), cancel, record the outcome.

The row is the source of truth: ``upload_status`` moves none/failed/cancelled/uploaded -> queued
(upload_request) -> uploading (the task claims it) -> uploaded | failed | cancelled. Progress is
written at most every UPLOAD_PROGRESS_INTERVAL_S with one conditional UPDATE that also notices a
cancel request. The transfer itself (hashing, resumable multipart upload, manifest) is in transfer.py.
"""

from __future__ import annotations

import logging
import re
import shutil
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.db import transaction
from django.db.models import Q
from django.utils import timezone

from apps.catalog import hf, storage
from apps.catalog.models import Model, UploadStatus
from apps.catalog.transfer import (
    ALLOW_PATTERNS,
    UploadCancelled,
    UploadError,
    UploadRefusedError,
    check_repo_listing,
    scan_folder,
    select_files,
    transfer_folder,
)
from apps.core import invalidation

log = logging.getLogger(__name__)

__all__ = ["UploadCancelled", "UploadError", "UploadRefusedError", "upload_cancel", "upload_request", "upload_run"]

HF_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=@+-]*(/[A-Za-z0-9._=@+-]+)*$")
IDLE_STATUSES = (UploadStatus.NONE, UploadStatus.FAILED, UploadStatus.CANCELLED, UploadStatus.UPLOADED)
BUSY_STATUSES = (UploadStatus.QUEUED, UploadStatus.UPLOADING, UploadStatus.VERIFYING)


def _slug(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "-", value).strip("-") or "x"


def default_prefix(*, model: Model, hf_repo: str = "", revision: str = "") -> str:
    """``models/<org>--<name>/<revision>`` for a hub repo; otherwise the model's own folder."""
    if hf_repo:
        return f"models/{_slug(hf_repo.replace('/', '--'))}/{_slug(revision or 'main')}"
    if model.storage_uri:
        bucket, prefix = storage.parse_uri(model.storage_uri)
        if bucket == settings.R2_BUCKET and prefix:
            return prefix
    return f"models/{_slug(model.name.replace('/', '--'))}"


def parse_hf_spec(spec: str) -> tuple[str, str]:
    """``org/name@rev`` -> (``org/name``, ``rev``); revision defaults to main."""
    repo, _, revision = spec.strip().partition("@")
    return repo, revision or "main"


def is_stale(model: Model) -> bool:
    cutoff = timezone.now() - timedelta(seconds=settings.UPLOAD_STALE_AFTER_S)
    return model.upload_status in BUSY_STATUSES and model.updated_at < cutoff


def upload_request(
    *,
    model: Model,
    hf_repo: str = "",
    revision: str = "",
    local_dir: str = "",
    prefix: str = "",
    keep_downloads: bool = False,
    enqueue: bool = True,
) -> Model:
    """Queue an upload of ``model``'s weights from a hub repo or a server-side folder.

    Raises UploadError (with a message naming the bad input) and changes nothing on bad input or
    when an upload is already running (a dead one, silent for UPLOAD_STALE_AFTER_S, may be replaced).
    """
    hf_repo, revision, local_dir, prefix = hf_repo.strip(), revision.strip(), local_dir.strip(), prefix.strip()
    if bool(hf_repo) == bool(local_dir):
        raise UploadError("Give either a Hugging Face repo or a local folder, not both (nor neither).")
    if hf_repo:
        if "@" in hf_repo and not revision:
            hf_repo, revision = parse_hf_spec(hf_repo)
        if not HF_REPO_RE.match(hf_repo):
            raise UploadError(f"hf_repo: '{hf_repo}' is not a Hugging Face repo id like org/name.")
        revision = revision or "main"
        if not re.match(r"^[\w./-]{1,100}$", revision):
            raise UploadError(f"revision: '{revision}' is not a valid branch, tag or commit.")
        source: dict[str, object] = {"kind": "hf", "repo": hf_repo, "revision": revision, "keep": keep_downloads}
    else:
        if not Path(local_dir).is_absolute():
            raise UploadError(f"local_dir: '{local_dir}' must be an absolute path on the worker machine.")
        source = {"kind": "dir", "path": local_dir}
    prefix = prefix.strip("/") or default_prefix(model=model, hf_repo=hf_repo, revision=revision)
    if not PREFIX_RE.match(prefix) or ".." in prefix.split("/"):
        raise UploadError(f"prefix: '{prefix}' is not a valid object prefix (letters, digits, . _ - = @ + and /).")
    source["prefix"] = prefix

    now = timezone.now()
    stale_cutoff = now - timedelta(seconds=settings.UPLOAD_STALE_AFTER_S)
    fields: dict[str, object] = {
        "upload_status": UploadStatus.QUEUED, "upload_source": source, "upload_error": "",
        "upload_cancel_requested": False, "upload_bytes_done": 0, "upload_bytes_total": 0, "upload_rate_bps": 0,
        "upload_current_file": "", "upload_started_at": None, "upload_finished_at": None, "updated_at": now,
    }
    if hf_repo:
        fields.update(hf_repo=hf_repo, hf_revision=revision)
    with transaction.atomic():
        claimed = Model.objects.filter(
            Q(upload_status__in=IDLE_STATUSES) | Q(upload_status__in=BUSY_STATUSES, updated_at__lt=stale_cutoff),
            pk=model.pk,
        ).update(**fields)
        if claimed != 1:
            model.refresh_from_db()
            raise UploadError(
                f"An upload is already {model.get_upload_status_display().lower()} for {model.name}: "
                "wait for it, or cancel it first."
            )
        if enqueue:
            from apps.catalog.tasks import upload_model_task

            model_id = model.pk
            transaction.on_commit(lambda: upload_model_task.delay(model_id))
    model.refresh_from_db()
    return model


def upload_claim(*, model_id: int) -> bool:
    """queued -> uploading, once: a second worker (or a cancelled request) gets False."""
    now = timezone.now()
    return Model.objects.filter(pk=model_id, upload_status=UploadStatus.QUEUED).update(
        upload_status=UploadStatus.UPLOADING, upload_started_at=now, updated_at=now, upload_cancel_requested=False,
    ) == 1


def upload_cancel(*, model: Model) -> Model:
    """Cancel a queued upload at once; ask a running one to stop (it checks between parts)."""
    now = timezone.now()
    if Model.objects.filter(pk=model.pk, upload_status=UploadStatus.QUEUED).update(
        upload_status=UploadStatus.CANCELLED, upload_finished_at=now, updated_at=now, upload_error="Cancelled.",
    ):
        model.refresh_from_db()
        return model
    if not Model.objects.filter(pk=model.pk, upload_status=UploadStatus.UPLOADING).update(
        upload_cancel_requested=True
    ):
        model.refresh_from_db()
        raise UploadError(f"No upload is running for {model.name} (status: {model.get_upload_status_display()}).")
    model.refresh_from_db()
    return model


def upload_record_failure(*, model_id: int, reason: str) -> None:
    now = timezone.now()
    Model.objects.filter(pk=model_id, upload_status__in=BUSY_STATUSES).update(
        upload_status=UploadStatus.FAILED, upload_error=reason[:4000], upload_finished_at=now, updated_at=now,
        upload_rate_bps=0,
    )


def upload_record_cancelled(*, model_id: int) -> None:
    now = timezone.now()
    Model.objects.filter(pk=model_id, upload_status__in=BUSY_STATUSES).update(
        upload_status=UploadStatus.CANCELLED, upload_error="Cancelled by staff.", upload_finished_at=now,
        updated_at=now, upload_rate_bps=0, upload_cancel_requested=False,
    )


class RowProgress:
    """Progress on the Model row: bytes are counted in memory, the row written every interval.

    The write is ``UPDATE … WHERE upload_cancel_requested = false``: zero rows means staff asked
    to cancel, so one query per interval both reports progress and checks for cancellation.
    """

    def __init__(self, model_id: int, on_progress: Callable[[dict], None] | None = None) -> None:
        self.model_id = model_id
        self.on_progress = on_progress
        self.total = self.done = 0
        self.current = ""
        self.rate = 0.0
        self._lock = threading.Lock()
        self._last_write = 0.0
        self._last_done = 0
        self._last_at = time.monotonic()

    def start(self, total: int) -> None:
        self.total = total
        self.tick(force=True)

    def add(self, n: int) -> None:
        with self._lock:
            self.done += n

    def skip(self, n: int) -> None:
        self.add(n)
        with self._lock:
            self._last_done += n  # skipped bytes are not sent: keep them out of the rate

    def file(self, rel: str) -> None:
        self.current = rel

    def snapshot(self) -> dict:
        return {"done": self.done, "total": self.total, "rate": int(self.rate), "file": self.current}

    def tick(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last_write < settings.UPLOAD_PROGRESS_INTERVAL_S:
            return
        with self._lock:
            done, elapsed = self.done, max(now - self._last_at, 1e-3)
            instant = max(0, done - self._last_done) / elapsed
            self._last_done, self._last_at = done, now
        self.rate = instant if self.rate == 0 else 0.7 * self.rate + 0.3 * instant  # smoothed for a steady ETA
        self._last_write = now
        written = Model.objects.filter(pk=self.model_id, upload_cancel_requested=False).update(
            upload_bytes_done=max(0, min(done, self.total)), upload_bytes_total=self.total,
            upload_rate_bps=int(self.rate), upload_current_file=self.current[:500], updated_at=timezone.now(),
        )
        if self.on_progress is not None:
            self.on_progress(self.snapshot())
        if written == 0:
            raise UploadCancelled()


def _download(model: Model, source: dict, progress: RowProgress) -> Path:
    """Fetch the hub files into the work dir in a thread, reporting its size as progress."""
    repo, revision = str(source["repo"]), str(source["revision"])
    check_repo_listing(hf.repo_files(repo=repo, revision=revision))
    dest = Path(settings.UPLOAD_WORK_DIR) / f"model-{model.pk}" / _slug(f"{repo.replace('/', '--')}@{revision}")
    outcome: dict[str, Exception] = {}

    def run() -> None:
        try:
            hf.download(repo=repo, revision=revision, allow_patterns=ALLOW_PATTERNS, dest=dest)
        except Exception as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=run, name=f"hf-download-{model.pk}", daemon=True)
    worker.start()
    while worker.is_alive():
        worker.join(timeout=0.25)
        if dest.exists():
            got = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
            progress.file(f"downloading from Hugging Face: {got / 1e6:.0f} MB")
        progress.tick()  # heartbeat and cancel check; a cancelled download finishes in the background
    if "error" in outcome:
        raise outcome["error"]
    return dest


def upload_run(
    *,
    model_id: int,
    on_progress: Callable[[dict], None] | None = None,
    on_file_done: Callable[[str], None] | None = None,
) -> Model:
    """Do a claimed upload: download if from the hub, refuse pickles, transfer, record the manifest.

    Raises UploadError/UploadRefusedError/UploadCancelled, storage.StorageError or hf.HubError; the
    caller records them on the row.
    """
    model = Model.objects.get(pk=model_id)
    source = dict(model.upload_source)
    bucket = storage.default_bucket()
    prefix = str(source["prefix"])
    Model.objects.filter(pk=model_id).update(storage_uri=storage.uri(bucket, prefix), upload_current_file="preparing")
    progress = RowProgress(model_id, on_progress)
    downloaded: Path | None = None
    if source.get("kind") == "hf":
        downloaded = root = _download(model, source, progress)
    else:
        root = Path(str(source["path"]))
    files = select_files(scan_folder(root))
    entries = transfer_folder(files=files, bucket=bucket, prefix=prefix, progress=progress,
                              source={k: v for k, v in source.items() if k != "keep"}, on_file_done=on_file_done)
    total = sum(e["size"] for e in entries)
    now = timezone.now()
    Model.objects.filter(pk=model_id).update(
        upload_status=UploadStatus.UPLOADED, manifest=entries, total_bytes=total, upload_bytes_done=total,
        upload_bytes_total=total, upload_current_file="", upload_error="", upload_finished_at=now, updated_at=now,
        upload_rate_bps=0,
    )
    invalidation.bump(invalidation.ROUTING)  # nodes launched from now on use the new storage URI
    if downloaded is not None and not source.get("keep"):
        shutil.rmtree(downloaded.parent, ignore_errors=True)
    return Model.objects.get(pk=model_id)
