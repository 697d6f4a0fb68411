"""Hand catalog work to the Celery workers. The only module that enqueues catalog tasks: it
imports the task functions themselves, so a renamed task fails at import, not in a worker."""

from __future__ import annotations

from django.db import transaction

from apps.catalog.tasks import upload_model_task


def upload_enqueue(*, model_id: int) -> None:
    """Run the queued upload of ``model_id`` in a worker once the current transaction commits
    (a worker must never look for a row the request has not committed yet)."""
    transaction.on_commit(lambda: upload_model_task.delay(model_id))
