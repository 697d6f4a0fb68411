"""Management commands: r2_check, upload_model, list_models, verify_model, create_model."""

from __future__ import annotations

from decimal import Decimal
from io import StringIO

import pytest
from django.core.management import CommandError, call_command

from apps.catalog import storage
from apps.catalog.models import ServedModel, UploadStatus
from apps.catalog.tests.conftest import _free_port, set_moto_auth

pytestmark = [pytest.mark.django_db, pytest.mark.slow]  # starts most tests upload to moto_server, a subprocess


def _call(*args: str) -> str:
    out = StringIO()
    call_command(*args, stdout=out)
    return out.getvalue()


def _call_failing(*args: str) -> tuple[str, str]:
    out = StringIO()
    with pytest.raises(CommandError) as excinfo:
        call_command(*args, stdout=out)
    return out.getvalue(), str(excinfo.value)


# --- r2_check -----------------------------------------------------------------------------------
def test_r2_check_creates_the_bucket_and_passes_every_check(r2, settings):
    settings.R2_BUCKET = f"{r2}-new"

    out = _call("r2_check", "--create-bucket")

    lines = [line for line in out.splitlines() if line.strip()]
    assert [line.split()[0] for line in lines[:5]] == ["OK"] * 5  # settings, endpoint, credentials, bucket, probe
    assert lines[5] == "Storage is ready for model uploads."
    assert "created" in out and "wrote, read back and deleted" in out
    assert list(storage.list_objects(settings.R2_BUCKET)) == []  # the probe cleaned up after itself


def test_r2_check_without_create_fails_on_a_missing_bucket_and_says_how_to_fix(r2, settings):
    settings.R2_BUCKET = "bucket-that-is-not-there"

    out, error = _call_failing("r2_check")

    assert "FAIL bucket" in out
    assert "--create-bucket" in out and "Cloudflare dashboard" in out
    assert "OK   credentials" in out
    assert "1 check(s) failed" in error


def test_r2_check_reports_bad_credentials(r2, moto_endpoint):
    set_moto_auth(moto_endpoint, enforce=True)
    try:
        out, _ = _call_failing("r2_check")
    finally:
        set_moto_auth(moto_endpoint, enforce=False)

    assert "OK   endpoint" in out
    assert "FAIL credentials" in out and "R2_SECRET_ACCESS_KEY" in out
    assert "SKIP bucket" in out


def test_r2_check_reports_an_unreachable_endpoint(r2, settings):
    settings.R2_ENDPOINT_URL = f"http://127.0.0.1:{_free_port()}"

    out, _ = _call_failing("r2_check")

    assert "FAIL endpoint" in out and "Check R2_ENDPOINT_URL" in out
    assert "SKIP credentials" in out


def test_r2_check_names_missing_settings(settings):
    settings.R2_ENDPOINT_URL = ""
    settings.R2_SECRET_ACCESS_KEY = ""

    out, _ = _call_failing("r2_check")

    assert "FAIL settings" in out and "R2_ENDPOINT_URL" in out and "R2_SECRET_ACCESS_KEY" in out


def test_r2_check_never_prints_the_secret(r2, settings):
    settings.R2_SECRET_ACCESS_KEY = "very-secret-value-123"
    assert "very-secret-value-123" not in _call("r2_check")


# --- upload_model / list_models / verify_model --------------------------------------------------
def test_upload_model_sync_from_a_folder_prints_progress_and_the_result(r2, catalog_model, model_folder):
    out = _call("upload_model", catalog_model.name, "--from-dir", str(model_folder), "--sync", "--prefix", "m/x")

    assert "%" in out and "model-00001-of-00002.safetensors" in out
    assert "Uploaded 7 file(s)" in out and f"s3://{r2}/m/x" in out
    catalog_model.refresh_from_db()
    assert catalog_model.latest_upload.status == UploadStatus.UPLOADED


def test_upload_model_from_the_hub_fetches_only_what_vllm_needs(r2, catalog_model, model_folder, fake_hub):
    (model_folder / "pytorch_model.bin").write_bytes(b"pickle")  # the hub repo also ships pickles
    (model_folder / "original").mkdir()
    (model_folder / "original" / "consolidated.00.pth").write_bytes(b"pickle")
    (model_folder / "tokenizer.model").write_bytes(b"sentencepiece")
    fake_hub.repos[("acme/tiny-llama", "v1")] = model_folder

    out = _call("upload_model", catalog_model.name, "--from-hf", "acme/tiny-llama@v1", "--sync")

    assert "Uploaded 8 file(s)" in out
    _, _, fetched = fake_hub.downloads[0]
    assert "pytorch_model.bin" not in fetched and "original/consolidated.00.pth" not in fetched
    assert "README.md" not in fetched and "tokenizer.model" in fetched
    catalog_model.refresh_from_db()
    commit = fake_hub.commit("acme/tiny-llama", "v1")  # the tag, pinned to its commit
    assert catalog_model.storage_uri == f"s3://{r2}/models/acme--tiny-llama/{commit}"
    assert (catalog_model.hf_repo, catalog_model.hf_revision) == ("acme/tiny-llama", "v1")
    assert storage.head(r2, f"models/acme--tiny-llama/{commit}/tokenizer.model") is not None


def test_downloads_are_removed_after_upload_unless_kept(r2, settings, catalog_model, model_folder, fake_hub):
    fake_hub.repos[("acme/tiny", "main")] = model_folder

    _call("upload_model", catalog_model.name, "--from-hf", "acme/tiny", "--sync")
    assert not any(settings.UPLOAD_WORK_DIR.rglob("*.safetensors"))

    _call("upload_model", catalog_model.name, "--from-hf", "acme/tiny", "--sync", "--keep-downloads")
    assert len(list(settings.UPLOAD_WORK_DIR.rglob("*.safetensors"))) == 2


def test_a_hub_repo_with_only_pickle_weights_is_refused_before_download(r2, catalog_model, tmp_path, fake_hub):
    repo = tmp_path / "pickle-repo"
    repo.mkdir()
    (repo / "config.json").write_text("{}")
    (repo / "pytorch_model.bin").write_bytes(b"pickle")
    fake_hub.repos[("acme/old", "main")] = repo

    _, error = _call_failing("upload_model", catalog_model.name, "--from-hf", "acme/old", "--sync")

    assert "pytorch_model.bin" in error and "safetensors" in error
    assert fake_hub.downloads == []


def test_an_unknown_hub_repo_fails_with_its_name(r2, catalog_model, fake_hub):
    _, error = _call_failing("upload_model", catalog_model.name, "--from-hf", "acme/missing", "--sync")
    assert "acme/missing" in error and "not found" in error


def test_upload_model_without_sync_only_queues(r2, catalog_model, model_folder, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        out = _call("upload_model", catalog_model.name, "--from-dir", str(model_folder))

    assert "Queued upload" in out
    assert len(callbacks) == 1  # the Celery enqueue, after commit
    catalog_model.refresh_from_db()
    assert catalog_model.latest_upload.status == UploadStatus.QUEUED


def test_upload_model_bad_input_exits_non_zero_with_a_reason(r2, catalog_model):
    _, error = _call_failing("upload_model", "no-such-model", "--from-dir", "/tmp")
    assert "No model named 'no-such-model'" in error
    ServedModel.objects.filter(pk=catalog_model.pk).update(hf_repo="")
    _, error = _call_failing("upload_model", catalog_model.name)
    assert "--from-hf" in error


def test_list_models_shows_prefixes_sizes_manifest_state_and_the_catalog_model(r2, catalog_model, model_folder):
    _call("upload_model", catalog_model.name, "--from-dir", str(model_folder), "--sync", "--prefix", "models/a")
    storage.put_bytes(r2, "models/stray/config.json", b"{}")  # uploaded by hand, no manifest

    out = _call("list_models")

    rows = {line.split()[0]: line for line in out.splitlines()[1:] if line and not line.startswith(" ")}
    assert "present" in rows["models/a"] and catalog_model.name in rows["models/a"] and " 7 " in rows["models/a"]
    assert "missing" in rows["models/stray"]


def test_verify_model_passes_then_reports_an_object_replaced_behind_its_back(r2, catalog_model, model_folder):
    _call("upload_model", catalog_model.name, "--from-dir", str(model_folder), "--sync", "--prefix", "models/v")
    assert "7 file(s) match" in _call("verify_model", catalog_model.name)

    storage.put_bytes(r2, "models/v/config.json", b'{"tampered": 1}')

    out, error = _call_failing("verify_model", catalog_model.name)
    assert "MISMATCH config.json" in out
    assert "1 problem(s)" in error
    catalog_model.refresh_from_db()
    assert catalog_model.latest_verification.status == "mismatch"


def test_full_verify_catches_bytes_changed_with_size_and_metadata_preserved(r2, catalog_model, model_folder):
    _call("upload_model", catalog_model.name, "--from-dir", str(model_folder), "--sync", "--prefix", "models/f")
    original = storage.head(r2, "models/f/config.json")
    forged = bytearray(storage.get_bytes(r2, "models/f/config.json"))
    forged[0:1] = b" "
    # Written behind our uploader's back (no ChecksumSHA256 for R2 to check), keeping the old metadata.
    storage.client().put_object(
        Bucket=r2,
        Key="models/f/config.json",
        Body=bytes(forged),
        Metadata={storage.SHA256_METADATA_KEY: original.sha256},
    )

    assert "match" in _call("verify_model", catalog_model.name)  # the quick check cannot see it
    out, _ = _call_failing("verify_model", catalog_model.name, "--full")
    assert "MISMATCH config.json: content sha256" in out


# --- create_model ---------------------------------------------------------------------------------
def test_create_model_with_every_option(db):
    out = _call(
        "create_model",
        "qwen-7b",
        "--hf-repo",
        "Qwen/Qwen2.5-7B-Instruct",
        "--revision",
        "v2",
        "--storage-uri",
        "s3://weights/models/qwen",
        "--price-in",
        "0.2",
        "--price-out",
        "0.6",
        "--accelerator",
        "A100-80GB:2",
    )

    model = ServedModel.objects.get(name="qwen-7b")
    assert "Created model qwen-7b" in out
    assert (model.hf_repo, model.hf_revision, model.storage_uri) == (
        "Qwen/Qwen2.5-7B-Instruct",
        "v2",
        "s3://weights/models/qwen",
    )
    assert (model.price_input_per_mtok, model.price_output_per_mtok) == (Decimal("0.2"), Decimal("0.6"))
    assert model.accelerator == "A100-80GB:2"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["bad name!"], "name"),
        (["ok-name", "--storage-uri", "http://not-s3"], "storage_uri"),
        (["ok-name", "--price-in", "cheap"], "--price-in"),
        (["ok-name", "--price-out", "-1"], "--price-out"),
        (["ok-name", "--accelerator", "L4:x"], "accelerator"),
        (["ok-name", "--min-replicas", "3", "--max-replicas", "1"], "max_replicas"),
    ],
)
def test_create_model_refuses_bad_input_and_creates_nothing(db, args, message):
    _, error = _call_failing("create_model", *args)
    assert message in error
    assert not ServedModel.objects.exists()


def test_create_model_refuses_a_duplicate_name(catalog_model):
    _, error = _call_failing("create_model", catalog_model.name)
    assert "already exists" in error
