"""Celery tasks for the catalog: thin wrappers that claim a row, call a service, record failures."""

from __future__ import annotations

import logging
from collections.abc import Callable

from celery import shared_task

from apps.catalog import uploads
from apps.catalog.hf import HubError
from apps.catalog.storage import StorageError

log = logging.getLogger(__name__)


def run_upload(
    model_id: int,
    *,
    on_progress: Callable[[dict], None] | None = None,
    on_file_done: Callable[[str], None] | None = None,
) -> str:
    """Claim a queued upload and run it here; return the final status (``skipped`` if not claimed)."""
    if not uploads.upload_claim(model_id=model_id):
        return "skipped"  # another worker has it, or it was cancelled before it started
    try:
        uploads.upload_run(model_id=model_id, on_progress=on_progress, on_file_done=on_file_done)
    except uploads.UploadCancelled:
        uploads.upload_record_cancelled(model_id=model_id)
        return "cancelled"
    except (uploads.UploadError, StorageError, HubError) as exc:
        uploads.upload_record_failure(model_id=model_id, reason=str(exc))
        return "failed"
    except BaseException as exc:
        # Unexpected (a bug, a kill signal turned exception): say so on the row, then let it surface.
        log.exception("upload of model %s crashed", model_id)
        uploads.upload_record_failure(model_id=model_id, reason=f"Unexpected error: {type(exc).__name__}: {exc}")
        raise
    return "uploaded"


@shared_task(acks_late=False)
def upload_model_task(model_id: int) -> str:
    # acks_late off: a redelivered upload would find the row 'uploading' and skip anyway; a
    # killed upload is retried from the admin (its row goes stale) and resumes where it stopped.
    return run_upload(model_id)
