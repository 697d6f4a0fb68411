"""The weights pipeline to R2, as services: request, run (in the worker), cancel, record the outcome.

Each attempt is a WeightUpload row, the source of truth for it: queued (upload_request) ->
uploading (upload_claim, a conditional UPDATE only one worker wins) -> uploaded | failed |
cancelled. At most one attempt per model is busy (a partial unique index says so). Progress is
written on the attempt at most every UPLOAD_PROGRESS_INTERVAL_S with one conditional UPDATE that
also notices a cancel request; the catalog row (ServedModel) is written only to point it at the new
weights. The transfer itself (hashing, resumable multipart upload, manifest) is in transfer.py.
"""

from __future__ import annotations

import glob
import logging
import re
import shutil
import threading
import time
from collections.abc import Callable
from datetime import timedelta
from pathlib import Path

from django.conf import settings
from django.contrib.auth.models import User
from django.db import IntegrityError, transaction
from django.utils import timezone

from apps.catalog import hf, storage
from apps.catalog.models import BUSY_UPLOAD_STATUSES, JobOrigin, ServedModel, UploadStatus, WeightUpload
from apps.catalog.transfer import (
    UploadCancelled,
    UploadError,
    UploadRefusedError,
    check_repo_listing,
    scan_folder,
    select_files,
    select_paths,
    transfer_folder,
)
from apps.core import invalidation

log = logging.getLogger(__name__)

__all__ = [
    "UploadCancelled",
    "UploadError",
    "UploadRefusedError",
    "upload_cancel",
    "upload_execute",
    "upload_request",
    "upload_run",
]

HF_REPO_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
PREFIX_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._=@+-]*(/[A-Za-z0-9._=@+-]+)*$")
BUSY_STATUSES = BUSY_UPLOAD_STATUSES


def _slug(value: str) -> str:
    return re.sub(r"[^A-Za-z0-9._=-]+", "-", value).strip("-") or "x"


def default_prefix(*, model: ServedModel, hf_repo: str = "", revision: str = "") -> str:
    """``models/<org>--<name>/<revision>`` for a hub repo (the worker pins it to the commit sha);
    otherwise the model's own folder."""
    if hf_repo:
        return f"models/{_slug(hf_repo.replace('/', '--'))}/{_slug(revision or 'main')}"
    if model.storage_uri:
        bucket, prefix = storage.parse_uri(model.storage_uri)
        if bucket == settings.R2_BUCKET and prefix:
            return prefix
    return f"models/{_slug(model.name.replace('/', '--'))}"


def requested_prefix(source: dict) -> str:
    """The prefix staff asked for in ``source`` ("" when it was derived from the pinned commit), to
    queue the same upload again: a retry must pin the revision afresh, not reuse the old commit's prefix."""
    return "" if source.get("prefix_auto") else str(source.get("prefix", ""))


def parse_hf_spec(spec: str) -> tuple[str, str]:
    """``org/name@rev`` -> (``org/name``, ``rev``); revision defaults to main."""
    repo, _, revision = spec.strip().partition("@")
    return repo, revision or "main"


def is_stale(upload: WeightUpload | None) -> bool:
    """A busy attempt whose worker has been silent for UPLOAD_STALE_AFTER_S (taken as dead)."""
    cutoff = timezone.now() - timedelta(seconds=settings.UPLOAD_STALE_AFTER_S)
    return upload is not None and upload.status in BUSY_STATUSES and upload.updated_at < cutoff


def upload_request(
    *,
    model: ServedModel,
    hf_repo: str = "",
    revision: str = "",
    local_dir: str = "",
    prefix: str = "",
    keep_downloads: bool = False,
    origin: str = JobOrigin.ADMIN,
    requested_by: User | None = None,
) -> WeightUpload:
    """Create a queued upload attempt of ``model``'s weights from a hub repo or a server-side folder.

    Raises UploadError (with a message naming the bad input) and changes nothing on bad input or
    when an upload is already running (a dead one, silent for UPLOAD_STALE_AFTER_S, is closed as
    failed and replaced). Nothing runs it until someone does: ``apps.catalog.enqueue.upload_enqueue``
    hands it to a worker after commit; ``upload_execute`` runs it in this process.
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
    if hf_repo and not prefix.strip("/"):
        source["prefix_auto"] = True  # the worker replaces the revision by the commit sha it resolves
    prefix = prefix.strip("/") or default_prefix(model=model, hf_repo=hf_repo, revision=revision)
    if not PREFIX_RE.match(prefix) or ".." in prefix.split("/"):
        raise UploadError(f"prefix: '{prefix}' is not a valid object prefix (letters, digits, . _ - = @ + and /).")
    source["prefix"] = prefix

    now = timezone.now()
    stale_cutoff = now - timedelta(seconds=settings.UPLOAD_STALE_AFTER_S)
    with transaction.atomic():
        WeightUpload.objects.filter(model=model, status__in=BUSY_STATUSES, updated_at__lt=stale_cutoff).update(
            status=UploadStatus.FAILED,
            finished_at=now,
            updated_at=now,
            rate_bps=0,
            error=f"The worker went silent for over {settings.UPLOAD_STALE_AFTER_S} s; replaced by a new upload.",
        )
        try:
            with transaction.atomic():  # a savepoint: the unique index refuses a second busy attempt
                upload = WeightUpload.objects.create(
                    model=model,
                    status=UploadStatus.QUEUED,
                    source=source,
                    origin=origin,
                    requested_by=requested_by,
                    requested_at=now,
                    updated_at=now,
                )
        except IntegrityError:
            busy = WeightUpload.objects.filter(model=model, status__in=BUSY_STATUSES).first()
            if busy is None:
                raise
            raise UploadError(
                f"An upload is already {busy.get_status_display().lower()} for {model.name}: "
                "wait for it, or cancel it first."
            ) from None
        if hf_repo:
            ServedModel.objects.filter(pk=model.pk).update(hf_repo=hf_repo, hf_revision=revision, updated_at=now)
    model.refresh_from_db()
    return upload


def upload_claim(*, upload_id: int) -> bool:
    """queued -> uploading, once: a second worker (or a cancelled request) gets False."""
    now = timezone.now()
    return (
        WeightUpload.objects.filter(pk=upload_id, status=UploadStatus.QUEUED).update(
            status=UploadStatus.UPLOADING,
            started_at=now,
            updated_at=now,
            cancel_requested=False,
        )
        == 1
    )


def upload_cancel(*, model: ServedModel) -> WeightUpload:
    """Cancel ``model``'s queued upload at once; ask a running one to stop (it checks between parts)."""
    now = timezone.now()
    attempts = WeightUpload.objects.filter(model=model)
    if not attempts.filter(status=UploadStatus.QUEUED).update(
        status=UploadStatus.CANCELLED,
        finished_at=now,
        updated_at=now,
        error="Cancelled.",
    ) and not attempts.filter(status=UploadStatus.UPLOADING).update(cancel_requested=True):
        latest = attempts.order_by("-id").first()
        label = latest.get_status_display() if latest else UploadStatus.NONE.label
        raise UploadError(f"No upload is running for {model.name} (status: {label}).")
    return attempts.order_by("-id")[0]  # the one just cancelled (or asked to stop) is the latest


def upload_record_failure(*, upload_id: int, reason: str) -> None:
    now = timezone.now()
    WeightUpload.objects.filter(pk=upload_id, status__in=BUSY_STATUSES).update(
        status=UploadStatus.FAILED,
        error=reason[:4000],
        finished_at=now,
        updated_at=now,
        rate_bps=0,
    )


def upload_record_cancelled(*, upload_id: int) -> None:
    now = timezone.now()
    WeightUpload.objects.filter(pk=upload_id, status__in=BUSY_STATUSES).update(
        status=UploadStatus.CANCELLED,
        error="Cancelled by staff.",
        finished_at=now,
        updated_at=now,
        rate_bps=0,
        cancel_requested=False,
    )


class RowProgress:
    """Progress on the WeightUpload row: bytes are counted in memory, the row written every interval.

    The write is ``UPDATE … WHERE status = uploading AND cancel_requested = false``: zero rows means
    staff asked to cancel (or the attempt was closed as dead and replaced), so one query per
    interval both reports progress and checks for cancellation.
    """

    def __init__(self, upload_id: int, on_progress: Callable[[dict], None] | None = None) -> None:
        self.upload_id = upload_id
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
        written = WeightUpload.objects.filter(
            pk=self.upload_id,
            status=UploadStatus.UPLOADING,
            cancel_requested=False,
        ).update(
            bytes_done=max(0, min(done, self.total)),
            bytes_total=self.total,
            rate_bps=int(self.rate),
            current_file=self.current[:500],
            updated_at=timezone.now(),
        )
        if self.on_progress is not None:
            self.on_progress(self.snapshot())
        if written == 0:
            raise UploadCancelled()


def _download(model_id: int, source: dict, progress: RowProgress) -> Path:
    """Fetch the hub files of the pinned commit into the work dir in a thread, reporting its size as progress."""
    repo, revision = str(source["repo"]), str(source["commit"])
    listing = hf.repo_files(repo=repo, revision=revision)
    check_repo_listing(listing)
    wanted = [glob.escape(path) for path in select_paths(listing)]  # exact paths, no duplicate weights
    dest = Path(settings.UPLOAD_WORK_DIR) / f"model-{model_id}" / _slug(f"{repo.replace('/', '--')}@{revision}")
    outcome: dict[str, Exception] = {}

    def run() -> None:
        try:
            hf.download(repo=repo, revision=revision, allow_patterns=wanted, dest=dest)
        except Exception as exc:
            outcome["error"] = exc

    worker = threading.Thread(target=run, name=f"hf-download-{model_id}", daemon=True)
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
    upload_id: int,
    on_progress: Callable[[dict], None] | None = None,
    on_file_done: Callable[[str], None] | None = None,
) -> WeightUpload:
    """Do a claimed upload: download if from the hub, refuse pickles, transfer, record the manifest.

    Raises UploadError/UploadRefusedError/UploadCancelled, storage.StorageError or hf.HubError; the
    caller records them on the attempt.
    """
    upload = WeightUpload.objects.get(pk=upload_id)
    model_id = upload.model_id
    source = dict(upload.source)
    bucket = storage.default_bucket()
    if source.get("kind") == "hf":
        # Pin the branch or tag to the commit it names now: the download, the manifest and (unless
        # staff chose one) the prefix use the sha, so re-uploading after the repo changes writes a
        # new prefix instead of overwriting the objects running nodes stream from.
        source["commit"] = hf.resolve_revision(repo=str(source["repo"]), revision=str(source["revision"]))
        if source.get("prefix_auto"):
            model = ServedModel.objects.get(pk=model_id)
            source["prefix"] = default_prefix(model=model, hf_repo=str(source["repo"]), revision=source["commit"])
    prefix = str(source["prefix"])
    WeightUpload.objects.filter(pk=upload_id).update(source=source, current_file="preparing")
    progress = RowProgress(upload_id, on_progress)
    downloaded: Path | None = None
    if source.get("kind") == "hf":
        downloaded = root = _download(model_id, source, progress)
    else:
        root = Path(str(source["path"]))
    files = select_files(scan_folder(root))
    entries = transfer_folder(
        files=files,
        bucket=bucket,
        prefix=prefix,
        progress=progress,
        source={k: v for k, v in source.items() if k not in {"keep", "prefix_auto"}},
        on_file_done=on_file_done,
    )
    total = sum(e["size"] for e in entries)
    now = timezone.now()
    with transaction.atomic():
        finished = WeightUpload.objects.filter(pk=upload_id, status=UploadStatus.UPLOADING).update(
            status=UploadStatus.UPLOADED,
            bytes_done=total,
            bytes_total=total,
            current_file="",
            error="",
            finished_at=now,
            updated_at=now,
            rate_bps=0,
        )
        if finished != 1:
            raise UploadCancelled()  # closed meanwhile (cancelled, or replaced as dead): not ours to publish
        # The storage URI moves only now: nodes launched during the upload keep the complete old prefix.
        ServedModel.objects.filter(pk=model_id).update(
            storage_uri=storage.uri(bucket, prefix), manifest=entries, total_bytes=total, updated_at=now
        )
    invalidation.bump(invalidation.ROUTING)  # nodes launched from now on use the new storage URI
    if downloaded is not None and not source.get("keep"):
        shutil.rmtree(downloaded.parent, ignore_errors=True)
    return WeightUpload.objects.get(pk=upload_id)


def upload_execute(
    *,
    upload_id: int,
    on_progress: Callable[[dict], None] | None = None,
    on_file_done: Callable[[str], None] | None = None,
) -> str:
    """Claim a queued upload attempt and run it here; record the outcome on it and return it
    (``uploaded``, ``failed``, ``cancelled``, or ``skipped`` when it was not ours to claim)."""
    if not upload_claim(upload_id=upload_id):
        return "skipped"  # another worker has it, or it was cancelled before it started
    try:
        upload_run(upload_id=upload_id, on_progress=on_progress, on_file_done=on_file_done)
    except UploadCancelled:
        upload_record_cancelled(upload_id=upload_id)
        return "cancelled"
    except (UploadError, storage.StorageError, hf.HubError) as exc:
        upload_record_failure(upload_id=upload_id, reason=str(exc))
        return "failed"
    except BaseException as exc:
        # Unexpected (a bug, a kill signal turned exception): say so on the row, then let it surface.
        log.exception("upload %s crashed", upload_id)
        upload_record_failure(upload_id=upload_id, reason=f"Unexpected error: {type(exc).__name__}: {exc}")
        raise
    return "uploaded"
