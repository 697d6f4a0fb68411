"""Migrations 0004-0006 carry the job-state columns of the catalog row over into WeightUpload and
WeightVerification rows, then drop the columns: run forwards on the test database."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.db import connection
from django.db.migrations.executor import MigrationExecutor
from django.utils import timezone

BEFORE = [("catalog", "0003_validators")]
AFTER = [("catalog", "0006_drop_job_columns")]


@pytest.fixture
def executor(transactional_db):
    executor = MigrationExecutor(connection)
    executor.migrate(BEFORE)
    try:
        yield executor
    finally:
        executor = MigrationExecutor(connection)  # back to the code's state for the tests that follow
        executor.loader.build_graph()
        executor.migrate(executor.loader.graph.leaf_nodes())


def _apps_at(executor: MigrationExecutor, targets: list[tuple[str, str]]):
    executor.loader.build_graph()
    return executor.loader.project_state(targets).apps


def test_the_job_columns_become_rows_then_disappear(executor):
    old = _apps_at(executor, BEFORE)
    old_model = old.get_model("catalog", "Model")
    started = timezone.now() - timedelta(hours=2)
    finished = started + timedelta(minutes=7)
    verified = finished + timedelta(minutes=1)
    source = {"kind": "hf", "repo": "acme/tiny", "revision": "v1", "prefix": "models/acme--tiny/v1", "keep": False}
    done = old_model.objects.create(
        name="done",
        storage_uri="s3://weights/models/acme--tiny/v1",
        upload_status="uploaded",
        upload_source=source,
        upload_bytes_done=4096,
        upload_bytes_total=4096,
        upload_started_at=started,
        upload_finished_at=finished,
        verify_status="mismatch",
        verified_at=verified,
        verify_report=["config.json: missing"],
    )
    running = old_model.objects.create(
        name="running",
        upload_status="uploading",
        upload_source={"kind": "dir", "path": "/w", "prefix": "m/r"},
        upload_bytes_done=10,
        upload_bytes_total=100,
        upload_rate_bps=5,
        upload_current_file="a.safetensors",
        upload_cancel_requested=True,
        upload_started_at=started,
    )
    failed = old_model.objects.create(name="failed", upload_status="failed", upload_error="SlowDown")
    never = old_model.objects.create(name="never")

    executor.loader.build_graph()
    executor.migrate(AFTER)

    new = _apps_at(executor, AFTER)
    WeightUpload = new.get_model("catalog", "WeightUpload")
    WeightVerification = new.get_model("catalog", "WeightVerification")
    uploads = {u.model_id: u for u in WeightUpload.objects.all()}
    assert set(uploads) == {done.pk, running.pk, failed.pk}  # "none" had nothing to carry
    assert (uploads[done.pk].status, uploads[done.pk].source, uploads[done.pk].bytes_total) == (
        "uploaded",
        source,
        4096,
    )
    assert (uploads[done.pk].started_at, uploads[done.pk].finished_at) == (started, finished)
    assert uploads[done.pk].origin == "migration" and uploads[done.pk].requested_at == started
    run = uploads[running.pk]
    assert (run.status, run.bytes_done, run.bytes_total, run.rate_bps, run.current_file, run.cancel_requested) == (
        "uploading",
        10,
        100,
        5,
        "a.safetensors",
        True,
    )
    assert (uploads[failed.pk].status, uploads[failed.pk].error) == ("failed", "SlowDown")
    checks = list(WeightVerification.objects.all())
    assert [(c.model_id, c.status, c.problems, c.finished_at, c.uri) for c in checks] == [
        (done.pk, "mismatch", ["config.json: missing"], verified, "s3://weights/models/acme--tiny/v1")
    ]
    columns = {c.name for c in connection.introspection.get_table_description(connection.cursor(), "catalog_model")}
    assert not {c for c in columns if c.startswith(("upload_", "verify_", "verified_"))}
    assert new.get_model("catalog", "Model").objects.filter(pk=never.pk).exists()


def test_backwards_puts_the_latest_attempt_back_in_the_columns(executor):
    executor.loader.build_graph()
    executor.migrate(AFTER)
    new = _apps_at(executor, AFTER)
    model = new.get_model("catalog", "Model").objects.create(name="m")
    WeightUpload = new.get_model("catalog", "WeightUpload")
    WeightUpload.objects.create(model=model, status="failed", error="old", source={"prefix": "a"})
    WeightUpload.objects.create(model=model, status="uploaded", source={"prefix": "b"}, bytes_total=9)

    executor.loader.build_graph()
    executor.migrate(BEFORE)

    old = _apps_at(executor, BEFORE).get_model("catalog", "Model").objects.get(pk=model.pk)
    assert (old.upload_status, old.upload_source, old.upload_bytes_total, old.verify_status) == (
        "uploaded",
        {"prefix": "b"},
        9,
        "",
    )


def test_the_rename_to_served_model_keeps_the_table_and_the_permissions_staff_hold(executor):
    from django.contrib.auth.models import Group, Permission
    from django.contrib.contenttypes.models import ContentType

    executor.loader.build_graph()
    executor.migrate(AFTER)  # before 0007: the class was Model, its permissions change_model, …
    ContentType.objects.clear_cache()
    operators = Group.objects.create(name="operators")
    operators.permissions.add(Permission.objects.get(content_type__app_label="catalog", codename="change_model"))

    executor.loader.build_graph()
    executor.migrate([("catalog", "0007_rename_model_servedmodel")])
    ContentType.objects.clear_cache()

    from apps.catalog.models import ServedModel

    assert ServedModel._meta.db_table == "catalog_model"
    assert "catalog_model" in connection.introspection.table_names()
    assert "catalog_servedmodel" not in connection.introspection.table_names()
    assert list(operators.permissions.values_list("codename", flat=True)) == ["change_servedmodel"]
    assert ContentType.objects.get_for_model(ServedModel).model == "servedmodel"
