"""Carry each model's upload_* and verify_* columns over into one WeightUpload and one
WeightVerification row (the only attempt the columns remember), before 0006 drops them.

Busy uploads keep their status: a worker gone with the upgrade leaves its attempt silent, and
after UPLOAD_STALE_AFTER_S a new request replaces it, as with any dead worker.
"""

from django.db import migrations

MIGRATION = "migration"


def columns_to_rows(apps, schema_editor):
    Model = apps.get_model("catalog", "Model")
    WeightUpload = apps.get_model("catalog", "WeightUpload")
    WeightVerification = apps.get_model("catalog", "WeightVerification")
    uploads, checks = [], []
    for model in Model.objects.order_by("pk").iterator():
        if model.upload_status != "none":
            uploads.append(WeightUpload(
                model=model, status=model.upload_status, source=model.upload_source or {}, error=model.upload_error,
                bytes_done=model.upload_bytes_done, bytes_total=model.upload_bytes_total,
                rate_bps=model.upload_rate_bps, current_file=model.upload_current_file,
                cancel_requested=model.upload_cancel_requested, origin=MIGRATION,
                requested_at=model.upload_started_at or model.updated_at, started_at=model.upload_started_at,
                finished_at=model.upload_finished_at, updated_at=model.updated_at,
            ))
        if model.verify_status or model.verified_at:
            checks.append(WeightVerification(
                model=model, status=model.verify_status or "error", uri=model.storage_uri,
                problems=model.verify_report or [], origin=MIGRATION,
                started_at=model.verified_at or model.updated_at, finished_at=model.verified_at,
            ))
    WeightUpload.objects.bulk_create(uploads, batch_size=500)
    WeightVerification.objects.bulk_create(checks, batch_size=500)


def _latest_per_model(job_model):
    """The newest row of each model (DISTINCT ON would do it in SQL, but SQLite has none)."""
    seen = set()
    for row in job_model.objects.order_by("model_id", "-id").iterator():
        if row.model_id not in seen:
            seen.add(row.model_id)
            yield row


def rows_to_columns(apps, schema_editor):
    """Backwards: the latest attempt of each kind goes back into the columns (0006 re-added them)."""
    Model = apps.get_model("catalog", "Model")
    WeightUpload = apps.get_model("catalog", "WeightUpload")
    WeightVerification = apps.get_model("catalog", "WeightVerification")
    for upload in _latest_per_model(WeightUpload):
        Model.objects.filter(pk=upload.model_id).update(
            upload_status=upload.status, upload_source=upload.source, upload_error=upload.error,
            upload_bytes_done=upload.bytes_done, upload_bytes_total=upload.bytes_total,
            upload_rate_bps=upload.rate_bps, upload_current_file=upload.current_file,
            upload_cancel_requested=upload.cancel_requested, upload_started_at=upload.started_at,
            upload_finished_at=upload.finished_at,
        )
    for check in _latest_per_model(WeightVerification):
        Model.objects.filter(pk=check.model_id).update(
            verify_status="" if check.status == "running" else check.status,
            verified_at=check.finished_at, verify_report=check.problems,
        )


class Migration(migrations.Migration):

    dependencies = [
        ('catalog', '0004_weight_jobs'),
    ]

    operations = [
        migrations.RunPython(columns_to_rows, rows_to_columns),
    ]
