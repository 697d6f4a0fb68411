"""Celery tasks for the catalog: thin wrappers around the services in uploads.py."""

from __future__ import annotations

from celery import shared_task

from apps.catalog.uploads import upload_execute


@shared_task(acks_late=False)
def upload_model_task(model_id: int) -> str:
    # acks_late off: a redelivered upload would find the row 'uploading' and skip anyway; a
    # killed upload is retried from the admin (its row goes stale) and resumes where it stopped.
    return upload_execute(model_id=model_id)
