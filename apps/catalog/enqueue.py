"""Hand catalog work to the Celery workers. The only module that enqueues catalog tasks: it
imports the task functions themselves, so a renamed task fails at import, not in a worker."""

from __future__ import annotations

from django.db import transaction

from apps.catalog.models import WeightUpload
from apps.catalog.tasks import upload_weights_task


def upload_enqueue(*, upload: WeightUpload) -> None:
    """Run the queued attempt in a worker once the current transaction commits (a worker must
    never look for a row the request has not committed yet)."""
    upload_id = upload.pk
    transaction.on_commit(lambda: upload_weights_task.delay(upload_id))
