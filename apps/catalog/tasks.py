"""Celery tasks for the catalog: thin wrappers around the services in uploads.py."""

from __future__ import annotations

from celery import shared_task

from apps.catalog.uploads import upload_execute


@shared_task(acks_late=False)
def upload_weights_task(upload_id: int) -> str:
    # acks_late off: a redelivered upload would find its attempt 'uploading' and skip anyway; a
    # killed upload is retried from the admin (its attempt goes stale) and resumes where it stopped.
    # (Named apart from the old upload_model_task(model_id): a message queued before the upgrade
    # carries a model id, and must not be read as an attempt id.)
    return upload_execute(upload_id=upload_id)
