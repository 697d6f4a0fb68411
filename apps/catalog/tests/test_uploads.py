"""The weights pipeline against moto's S3 server: layout, checksums, resume, refusals, progress, cancel."""

from __future__ import annotations

import hashlib
import json
import time

import pytest

from apps.catalog import storage
from apps.catalog.models import ServedModel, UploadStatus, WeightUpload
from apps.catalog.tests.conftest import make_model_folder
from apps.catalog.transfer import MANIFEST_NAME
from apps.catalog.uploads import UploadError, upload_cancel, upload_execute, upload_request

pytestmark = [pytest.mark.django_db, pytest.mark.slow]  # starts moto_server, a subprocess

WEIGHTS = [
    "config.json",
    "generation_config.json",
    "model-00001-of-00002.safetensors",
    "model-00002-of-00002.safetensors",
    "model.safetensors.index.json",
    "tokenizer.json",
    "tokenizer_config.json",
]


def _sha(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _upload_from_dir(model: ServedModel, folder, **hooks) -> str:
    upload_request(model=model, local_dir=str(folder), prefix="models/test-model")
    return upload_execute(upload_id=model.latest_upload.pk, **hooks)


def test_folder_upload_puts_every_needed_file_at_the_prefix_root_with_its_sha256(r2, catalog_model, model_folder):
    assert _upload_from_dir(catalog_model, model_folder) == "uploaded"

    catalog_model.refresh_from_db()
    assert catalog_model.latest_upload.status == UploadStatus.UPLOADED
    assert catalog_model.storage_uri == f"s3://{r2}/models/test-model"
    listed = {o.key: o.size for o in storage.list_objects(r2, "models/test-model/")}
    assert sorted(listed) == sorted(
        [f"models/test-model/{name}" for name in WEIGHTS] + [f"models/test-model/{MANIFEST_NAME}"]
    )  # README.md left out
    for name in WEIGHTS:
        info = storage.head(r2, f"models/test-model/{name}")
        assert info.size == (model_folder / name).stat().st_size
        assert info.sha256 == _sha(model_folder / name)
        body = storage.get_bytes(r2, f"models/test-model/{name}")
        assert hashlib.sha256(body).hexdigest() == _sha(model_folder / name)
    assert {e["path"]: e["sha256"] for e in catalog_model.manifest} == {n: _sha(model_folder / n) for n in WEIGHTS}
    assert catalog_model.total_bytes == sum((model_folder / n).stat().st_size for n in WEIGHTS)
    manifest_object = json.loads(storage.get_bytes(r2, f"models/test-model/{MANIFEST_NAME}"))
    assert manifest_object["files"] == catalog_model.manifest


def test_the_big_file_goes_as_a_parallel_multipart_upload(r2, catalog_model, model_folder):
    _upload_from_dir(catalog_model, model_folder)

    big = "models/test-model/model-00001-of-00002.safetensors"
    assert storage.request_log.keys[("UploadPart", big)] == 3  # 12 MB in 5 MB parts
    assert storage.request_log.keys[("CreateMultipartUpload", big)] == 1
    assert storage.request_log.keys[("PutObject", "models/test-model/config.json")] == 1


def test_a_rerun_sends_no_object_bytes(r2, catalog_model, model_folder):
    _upload_from_dir(catalog_model, model_folder)
    storage.request_log.reset()

    assert _upload_from_dir(catalog_model, model_folder) == "uploaded"

    assert storage.request_log.keys_written() == set()
    assert storage.request_log.operations["HeadObject"] >= len(WEIGHTS)
    catalog_model.refresh_from_db()
    assert catalog_model.latest_upload.status == UploadStatus.UPLOADED


def test_an_upload_killed_after_the_first_file_resumes_from_the_second(r2, settings, catalog_model, model_folder):
    settings.UPLOAD_FILES_IN_FLIGHT = 1  # one file at a time: the kill lands exactly after file 1

    def die_after_first(rel: str) -> None:
        raise KeyboardInterrupt(f"worker killed after {rel}")

    with pytest.raises(KeyboardInterrupt):
        _upload_from_dir(catalog_model, model_folder, on_file_done=die_after_first)
    catalog_model.refresh_from_db()
    assert catalog_model.latest_upload.status == UploadStatus.FAILED
    first = f"models/test-model/{WEIGHTS[0]}"
    assert storage.request_log.keys_written() == {first}
    storage.request_log.reset()

    assert _upload_from_dir(catalog_model, model_folder) == "uploaded"

    written = storage.request_log.keys_written()
    assert first not in written
    assert written == {f"models/test-model/{name}" for name in WEIGHTS[1:]} | {f"models/test-model/{MANIFEST_NAME}"}


def test_a_killed_parallel_upload_resends_only_what_had_not_landed(r2, catalog_model, model_folder):
    def die_after_first(rel: str) -> None:
        raise KeyboardInterrupt(f"worker killed after {rel}")

    with pytest.raises(KeyboardInterrupt):
        _upload_from_dir(catalog_model, model_folder, on_file_done=die_after_first)
    landed = {o.key for o in storage.list_objects(r2, "models/test-model/")}
    big = "models/test-model/model-00001-of-00002.safetensors"
    assert landed and big not in landed  # the small files in flight landed; the big one was cancelled mid-multipart
    assert storage.abort_incomplete_uploads(r2, "models/test-model/", keys={big}) == 0  # and its parts were aborted
    storage.request_log.reset()

    assert _upload_from_dir(catalog_model, model_folder) == "uploaded"

    everything = {f"models/test-model/{name}" for name in WEIGHTS}
    assert storage.request_log.keys_written() == (everything - landed) | {f"models/test-model/{MANIFEST_NAME}"}


def test_a_changed_file_is_sent_again_on_rerun(r2, catalog_model, model_folder):
    _upload_from_dir(catalog_model, model_folder)
    (model_folder / "config.json").write_text('{"architectures": ["MistralForCausalLM"]}')
    storage.request_log.reset()

    _upload_from_dir(catalog_model, model_folder)

    assert storage.request_log.keys_written() == {"models/test-model/config.json", f"models/test-model/{MANIFEST_NAME}"}


@pytest.mark.parametrize("bad_name", ["pytorch_model.bin", "model.pt", "weights.pth", "state.pkl", "x.ckpt"])
def test_pickle_weights_are_refused_before_anything_is_uploaded(r2, catalog_model, model_folder, bad_name):
    (model_folder / bad_name).write_bytes(b"\x80\x04pickle")

    assert _upload_from_dir(catalog_model, model_folder) == "failed"

    catalog_model.refresh_from_db()
    assert bad_name in catalog_model.latest_upload.error
    assert "safetensors" in catalog_model.latest_upload.error and "execute code" in catalog_model.latest_upload.error
    assert list(storage.list_objects(r2)) == []
    assert storage.request_log.keys_written() == set()


def test_a_folder_without_safetensors_is_refused(r2, catalog_model, tmp_path):
    folder = tmp_path / "empty-model"
    folder.mkdir()
    (folder / "config.json").write_text("{}")

    assert _upload_from_dir(catalog_model, folder) == "failed"
    catalog_model.refresh_from_db()
    assert "no *.safetensors" in catalog_model.latest_upload.error


def test_a_missing_folder_fails_with_its_path(r2, catalog_model, tmp_path):
    assert _upload_from_dir(catalog_model, tmp_path / "nowhere") == "failed"
    catalog_model.refresh_from_db()
    assert str(tmp_path / "nowhere") in catalog_model.latest_upload.error


def test_bad_credentials_fail_with_a_clear_reason(r2, moto_endpoint, catalog_model, model_folder):
    from apps.catalog.tests.conftest import set_moto_auth

    set_moto_auth(moto_endpoint, enforce=True)
    try:
        assert _upload_from_dir(catalog_model, model_folder) == "failed"
    finally:
        set_moto_auth(moto_endpoint, enforce=False)
    catalog_model.refresh_from_db()
    assert catalog_model.latest_upload.status == UploadStatus.FAILED
    assert "rejected the credentials" in catalog_model.latest_upload.error
    assert "R2_ACCESS_KEY_ID" in catalog_model.latest_upload.error


def test_an_unreachable_endpoint_fails_with_a_clear_reason(r2, settings, catalog_model, model_folder):
    from apps.catalog.tests.conftest import _free_port

    settings.R2_ENDPOINT_URL = f"http://127.0.0.1:{_free_port()}"

    assert _upload_from_dir(catalog_model, model_folder) == "failed"
    catalog_model.refresh_from_db()
    assert "Cannot reach the storage endpoint" in catalog_model.latest_upload.error
    assert settings.R2_ENDPOINT_URL in catalog_model.latest_upload.error


def test_a_missing_bucket_fails_with_a_clear_reason(r2, settings, catalog_model, model_folder):
    settings.R2_BUCKET = "no-such-bucket-here"

    assert _upload_from_dir(catalog_model, model_folder) == "failed"
    catalog_model.refresh_from_db()
    assert "Bucket 'no-such-bucket-here' does not exist" in catalog_model.latest_upload.error
    assert "r2_check --create-bucket" in catalog_model.latest_upload.error


def test_progress_advances_on_the_row_while_uploading(r2, catalog_model, model_folder):
    seen: list[int] = []

    def watch(snapshot: dict) -> None:
        seen.append(WeightUpload.objects.values_list("bytes_done", flat=True).get(model=catalog_model))

    _upload_from_dir(catalog_model, model_folder, on_progress=watch)

    assert len(seen) >= 2
    assert seen == sorted(seen)  # never goes backwards
    catalog_model.refresh_from_db()
    upload = catalog_model.latest_upload
    assert upload.bytes_done == upload.bytes_total == catalog_model.total_bytes > 0
    assert upload.finished_at is not None


def test_progress_writes_are_throttled_to_the_interval(r2, settings, catalog_model, tmp_path):
    from django.db import connection
    from django.test.utils import CaptureQueriesContext

    settings.UPLOAD_PROGRESS_INTERVAL_S = 0.5
    settings.R2_MAX_CONCURRENCY = 1  # slow enough to span several intervals
    folder = make_model_folder(tmp_path / "slow-model", big=30 * 1024 * 1024)
    upload_request(model=catalog_model, local_dir=str(folder), prefix="models/throttle")

    started = time.monotonic()
    with CaptureQueriesContext(connection) as queries:
        assert upload_execute(upload_id=catalog_model.latest_upload.pk) == "uploaded"
    elapsed = time.monotonic() - started

    progress_writes = [
        q
        for q in queries.captured_queries
        if q["sql"].startswith('UPDATE "catalog_weightupload"') and '"rate_bps"' in q["sql"]
    ]
    # One forced write at the start, one per interval at most, and the final "uploaded" write.
    assert 2 <= len(progress_writes) <= elapsed / 0.5 + 3


def test_cancel_stops_the_transfer_between_parts(r2, settings, catalog_model, tmp_path):
    settings.R2_MAX_CONCURRENCY = 1  # one part at a time, so there is time to cancel mid-file
    folder = make_model_folder(tmp_path / "big-model", big=40 * 1024 * 1024)
    upload_request(model=catalog_model, local_dir=str(folder), prefix="models/cancel-me")
    outcome: dict[str, str] = {}

    def cancel_once_bytes_flow(snapshot: dict) -> None:
        if snapshot["done"] > 0 and "sent" not in outcome:
            outcome["sent"] = "yes"
            upload_cancel(model=ServedModel.objects.get(pk=catalog_model.pk))  # staff press "Cancel upload"

    started = time.monotonic()
    outcome["status"] = upload_execute(upload_id=catalog_model.latest_upload.pk, on_progress=cancel_once_bytes_flow)

    assert outcome["status"] == "cancelled"
    catalog_model.refresh_from_db()
    assert catalog_model.latest_upload.status == UploadStatus.CANCELLED
    big = "models/cancel-me/model-00001-of-00002.safetensors"
    assert storage.request_log.keys[("UploadPart", big)] < 8  # 40 MB = 8 parts; it stopped before the end
    assert storage.head(r2, big) is None
    assert storage.head(r2, f"models/cancel-me/{MANIFEST_NAME}") is None
    assert time.monotonic() - started < 30


def test_cancelling_a_queued_upload_means_the_worker_never_starts_it(r2, catalog_model, model_folder):
    upload_request(model=catalog_model, local_dir=str(model_folder))
    upload_cancel(model=catalog_model)

    assert upload_execute(upload_id=catalog_model.latest_upload.pk) == "skipped"
    assert catalog_model.latest_upload.status == UploadStatus.CANCELLED
    assert storage.request_log.keys_written() == set()


def test_a_second_request_while_one_runs_is_refused(r2, catalog_model, model_folder):
    upload_request(model=catalog_model, local_dir=str(model_folder))
    with pytest.raises(UploadError, match="already queued"):
        upload_request(model=catalog_model, local_dir=str(model_folder))


def test_an_upload_whose_worker_died_can_be_queued_again(settings, catalog_model):
    from datetime import timedelta

    from django.utils import timezone

    silent_since = timezone.now() - timedelta(seconds=settings.UPLOAD_STALE_AFTER_S + 5)
    dead = WeightUpload.objects.create(model=catalog_model, status=UploadStatus.UPLOADING, updated_at=silent_since)

    upload = upload_request(model=catalog_model, hf_repo="acme/tiny")

    assert upload.status == UploadStatus.QUEUED and catalog_model.latest_upload == upload
    dead.refresh_from_db()
    assert dead.status == UploadStatus.FAILED and "went silent" in dead.error


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"local_dir": "relative/path"}, "absolute path"),
        ({"hf_repo": "not a repo"}, "hf_repo"),
        ({"hf_repo": "org/name", "local_dir": "/tmp/x"}, "not both"),
        ({}, "not both"),
        ({"local_dir": "/tmp/x", "prefix": "../escape"}, "prefix"),
    ],
)
def test_bad_upload_requests_are_refused_and_change_nothing(catalog_model, kwargs, message):
    with pytest.raises(UploadError, match=message):
        upload_request(model=catalog_model, **kwargs)
    catalog_model.refresh_from_db()
    assert catalog_model.latest_upload is None


def test_the_catalog_imports_run_one_way():
    """tasks -> uploads, never back: the upload service must not import the task module, and the
    module that enqueues imports the task function itself (a renamed task fails at import)."""
    import ast
    from pathlib import Path

    import apps.catalog

    root = Path(apps.catalog.__file__).parent
    imported: dict[str, set[str]] = {}
    for path in root.glob("*.py"):
        names = set()
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                names.add(node.module)
            elif isinstance(node, ast.Import):
                names.update(alias.name for alias in node.names)
        imported[path.stem] = names
    assert "apps.catalog.tasks" not in imported["uploads"] | imported["services"] | imported["verify"]
    assert "apps.catalog.uploads" in imported["tasks"]
    users_of_tasks = {module for module, names in imported.items() if "apps.catalog.tasks" in names}
    assert users_of_tasks == {"enqueue"}


def test_a_root_level_consolidated_copy_of_sharded_weights_is_left_out_and_every_sentencepiece_file_kept(
    r2, catalog_model, model_folder
):
    # Mistral-style: the same weights once more, unsharded, beside the shards (the streamer would load both).
    (model_folder / "consolidated.safetensors").write_bytes(b"the same weights again")
    (model_folder / "tokenizer_v2.model").write_bytes(b"sentencepiece")
    (model_folder / "sentencepiece.bpe.model").write_bytes(b"sentencepiece")

    assert _upload_from_dir(catalog_model, model_folder) == "uploaded"

    keys = {o.key.removeprefix("models/test-model/") for o in storage.list_objects(r2, "models/test-model/")}
    assert "consolidated.safetensors" not in keys
    assert {"tokenizer_v2.model", "sentencepiece.bpe.model", *WEIGHTS} <= keys


def test_a_single_unsharded_weights_file_is_still_uploaded(r2, catalog_model, tmp_path):
    folder = tmp_path / "single"
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    (folder / "consolidated.safetensors").write_bytes(b"weights")

    assert _upload_from_dir(catalog_model, folder) == "uploaded"
    assert storage.head(r2, "models/test-model/consolidated.safetensors") is not None
