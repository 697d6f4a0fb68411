"""The catalog admin: changelist without N+1, forms, upload action and form, progress JSON, storage browser."""

from __future__ import annotations

from datetime import timedelta
from decimal import Decimal

import pytest
from django.urls import reverse
from django.utils import timezone

from apps.catalog import storage
from apps.catalog.models import ServedModel, UploadStatus, WeightUpload
from apps.catalog.services import model_create
from apps.catalog.uploads import upload_execute, upload_request

pytestmark = pytest.mark.django_db


@pytest.fixture
def eager_celery(monkeypatch):
    from crosslogic.celery import app

    # The app reads Django settings with the CELERY_ namespace: the namespaced key is the one that counts.
    monkeypatch.setitem(app.conf, "CELERY_TASK_ALWAYS_EAGER", True)
    return app


def _form_data(**overrides) -> dict:
    data = {
        "name": "new-model",
        "is_active": "on",
        "hf_repo": "",
        "hf_revision": "main",
        "storage_uri": "",
        "accelerator": "L4:1",
        "dtype": "auto",
        "max_model_len": "",
        "context_length": "",
        "tensor_parallel_size": "1",
        "gpu_memory_utilization": "0.9",
        "extra_vllm_args": "[]",
        "price_input_per_mtok": "0.1",
        "price_output_per_mtok": "0.2",
        "min_replicas": "0",
        "max_replicas": "1",
        # The autoscaling policy (its defaults, as the form shows them).
        "target_ongoing_requests": "16",
        "target_kv_cache_usage": "0.8",
        "target_queue_wait_s": "",
        "scale_up_window_s": "0",
        "scale_down_window_s": "300",
        "idle_to_zero_s": "900",
        "spot_fallback": "on",
        "spot_fallback_preemptions": "2",
        "spot_fallback_window_s": "1800",
        "warm_pool": "on",
    }
    data.update(overrides)
    return data


def test_changelist_shows_counts_and_progress_without_a_query_per_row(admin_client, django_assert_max_num_queries):
    from apps.fleet.services import node_create

    for i in range(15):
        model = model_create(name=f"model-{i}")
        node_create(model=model, launcher="static", endpoint_url=f"http://127.0.0.1:{9000 + i}")
    WeightUpload.objects.create(
        model=ServedModel.objects.get(name="model-3"),
        status=UploadStatus.UPLOADING,
        bytes_done=50,
        bytes_total=100,
        rate_bps=10,
    )
    for model in ServedModel.objects.exclude(name="model-3")[:5]:  # history: older attempts must not cost a query each
        WeightUpload.objects.create(model=model, status=UploadStatus.FAILED, error="old")
        WeightUpload.objects.create(model=model, status=UploadStatus.UPLOADED)

    with django_assert_max_num_queries(12):
        response = admin_client.get(reverse("admin:catalog_servedmodel_changelist"))

    assert response.status_code == 200
    body = response.content.decode()
    assert "Storage browser (R2)" in body
    assert 'data-active="1"' in body and "50.0%" in body and "ETA 5s" in body
    assert "0 / 1 / 1" in body  # ready / live / all nodes


def test_add_and_change_pages_render(admin_client, catalog_model):
    assert admin_client.get(reverse("admin:catalog_servedmodel_add")).status_code == 200
    response = admin_client.get(reverse("admin:catalog_servedmodel_change", args=[catalog_model.pk]))
    assert response.status_code == 200
    assert "Upload weights" in response.content.decode()
    assert "No node has become ready yet." in response.content.decode()


def test_change_page_shows_median_cold_start_per_accelerator(admin_client, catalog_model):
    from apps.fleet.models import Node

    now = timezone.now()
    for seconds in (60, 90, 300):
        Node.objects.create(
            model=catalog_model,
            accelerator="L4:1",
            requested_at=now - timedelta(seconds=seconds),
            ready_at=now,
            launcher="static",
        )

    body = admin_client.get(reverse("admin:catalog_servedmodel_change", args=[catalog_model.pk])).content.decode()

    assert "L4:1: 90.0 s (over 3 node(s))" in body


def test_adding_a_model_through_the_admin_uses_the_service(admin_client):
    response = admin_client.post(reverse("admin:catalog_servedmodel_add"), _form_data())
    assert response.status_code == 302
    assert ServedModel.objects.get(name="new-model").price_output_per_mtok == Decimal("0.2")


@pytest.mark.parametrize(
    ("overrides", "field", "message"),
    [
        ({"name": "has spaces!"}, "name", "Use letters, digits"),
        ({"storage_uri": "https://example.com/x"}, "storage_uri", "s3://bucket/prefix"),
        ({"min_replicas": "3", "max_replicas": "1"}, "max_replicas", "at least min replicas"),
        ({"accelerator": "L4:many"}, "accelerator", "SkyPilot syntax"),
    ],
)
def test_bad_input_gives_form_errors_and_saves_nothing(admin_client, overrides, field, message):
    response = admin_client.post(reverse("admin:catalog_servedmodel_add"), _form_data(**overrides))

    assert response.status_code == 200
    errors = response.context["adminform"].form.errors
    assert message in " ".join(errors[field])
    assert not ServedModel.objects.exists()


def test_upload_action_on_one_model_opens_the_upload_form(admin_client, catalog_model):
    response = admin_client.post(
        reverse("admin:catalog_servedmodel_changelist"),
        {"action": "upload_weights", "_selected_action": [catalog_model.pk]},
    )
    assert response.status_code == 302
    assert response["Location"] == reverse("admin:catalog_servedmodel_upload", args=[catalog_model.pk])
    form_page = admin_client.get(response["Location"])
    assert form_page.status_code == 200
    assert "meta-llama/Meta-Llama-3-8B-Instruct@main" in form_page.content.decode()


@pytest.mark.slow  # the r2 fixture starts moto_server
def test_the_upload_form_enqueues_and_the_worker_uploads(
    admin_client, r2, catalog_model, model_folder, eager_celery, django_capture_on_commit_callbacks
):
    with django_capture_on_commit_callbacks(execute=True) as callbacks:
        response = admin_client.post(
            reverse("admin:catalog_servedmodel_upload", args=[catalog_model.pk]),
            {
                "source": "dir",
                "local_dir": str(model_folder),
                "prefix": "models/from-admin",
            },
        )

    assert response.status_code == 302
    assert any("upload_enqueue" in cb.__qualname__ for cb in callbacks)  # enqueued after commit
    catalog_model.refresh_from_db()
    assert catalog_model.latest_upload.status == UploadStatus.UPLOADED
    assert storage.head(r2, "models/from-admin/model-00001-of-00002.safetensors") is not None
    page = admin_client.get(reverse("admin:catalog_servedmodel_change", args=[catalog_model.pk])).content.decode()
    assert "model-00001-of-00002.safetensors" in page and "Uploaded" in page


def test_the_upload_form_shows_errors_on_the_field(admin_client, catalog_model):
    url = reverse("admin:catalog_servedmodel_upload", args=[catalog_model.pk])

    missing = admin_client.post(url, {"source": "dir", "local_dir": ""})
    relative = admin_client.post(url, {"source": "dir", "local_dir": "weights/here"})
    bad_prefix = admin_client.post(url, {"source": "hf", "hf_repo": "org/name", "prefix": "a/../b"})

    assert "Give the folder" in " ".join(missing.context["form"].errors["local_dir"])
    assert "absolute path" in " ".join(relative.context["form"].errors["local_dir"])
    assert "prefix" in " ".join(bad_prefix.context["form"].errors["prefix"])
    catalog_model.refresh_from_db()
    assert catalog_model.latest_upload is None


@pytest.mark.slow  # the r2 fixture starts moto_server
def test_several_failed_uploads_are_retried_from_their_last_source(
    admin_client, r2, catalog_model, model_folder, eager_celery, django_capture_on_commit_callbacks
):
    (model_folder / "bad.pt").write_bytes(b"pickle")
    upload_request(model=catalog_model, local_dir=str(model_folder), prefix="models/retry")
    assert upload_execute(upload_id=catalog_model.latest_upload.pk) == "failed"
    (model_folder / "bad.pt").unlink()
    other = model_create(name="other-model")

    with django_capture_on_commit_callbacks(execute=True):
        admin_client.post(
            reverse("admin:catalog_servedmodel_changelist"),
            {"action": "upload_weights", "_selected_action": [catalog_model.pk, other.pk]},
        )

    catalog_model.refresh_from_db()
    assert catalog_model.latest_upload.status == UploadStatus.UPLOADED
    assert catalog_model.storage_uri == f"s3://{r2}/models/retry"


def test_cancel_action_requests_a_stop(admin_client, catalog_model):
    WeightUpload.objects.create(model=catalog_model, status=UploadStatus.UPLOADING)

    admin_client.post(
        reverse("admin:catalog_servedmodel_changelist"),
        {"action": "cancel_upload", "_selected_action": [catalog_model.pk]},
    )

    catalog_model.refresh_from_db()
    assert catalog_model.latest_upload.cancel_requested is True


def test_upload_status_json_feeds_the_progress_bar(admin_client, catalog_model):
    WeightUpload.objects.create(model=catalog_model, status=UploadStatus.FAILED, error="an older attempt")
    WeightUpload.objects.create(
        model=catalog_model,
        status=UploadStatus.UPLOADING,
        bytes_done=2_000_000_000,
        bytes_total=4_000_000_000,
        rate_bps=100_000_000,
        current_file="model-00002.safetensors",
    )

    data = admin_client.get(reverse("admin:catalog_servedmodel_upload_status"), {"id": [catalog_model.pk]}).json()

    (entry,) = data["models"]
    assert entry["percent"] == 50.0 and entry["eta_seconds"] == 20 and entry["active"] is True
    assert entry["text"] == "50.0% · 2.0 GB / 4.0 GB · 100.0 MB/s · ETA 20s · model-00002.safetensors"


def test_upload_status_json_is_for_staff_only(client, catalog_model):
    response = client.get(reverse("admin:catalog_servedmodel_upload_status"), {"id": [catalog_model.pk]})
    assert response.status_code == 302  # to the admin login


@pytest.mark.slow  # the r2 fixture starts moto_server
def test_storage_browser_lists_bucket_prefixes_with_state_and_model(admin_client, r2, catalog_model, model_folder):
    upload_request(model=catalog_model, local_dir=str(model_folder), prefix="models/browsed")
    upload_execute(upload_id=catalog_model.latest_upload.pk)
    storage.put_bytes(r2, "models/hand-made/config.json", b"{}")
    storage.put_bytes(r2, "models/hand-made/model.safetensors", b"0" * 10)

    body = admin_client.get(reverse("admin:catalog_servedmodel_storage")).content.decode()

    assert "models/browsed" in body and "models/hand-made" in body
    assert "sb-present" in body and "sb-missing" in body
    assert f"Verify {catalog_model.name}" in body


@pytest.mark.slow  # the r2 fixture starts moto_server
def test_storage_browser_explains_a_storage_failure(admin_client, r2, settings):
    settings.R2_BUCKET = "not-a-bucket-here"
    response = admin_client.get(reverse("admin:catalog_servedmodel_storage"))
    assert response.status_code == 200
    assert "does not exist" in response.content.decode()


@pytest.mark.slow  # the r2 fixture starts moto_server
def test_verify_from_the_browser_reports_an_object_overwritten_behind_its_back(
    admin_client, r2, catalog_model, model_folder
):
    upload_request(model=catalog_model, local_dir=str(model_folder), prefix="models/tamper")
    upload_execute(upload_id=catalog_model.latest_upload.pk)
    storage.put_bytes(r2, "models/tamper/model-00002-of-00002.safetensors", b"not the weights")

    response = admin_client.post(
        reverse("admin:catalog_servedmodel_storage_verify"), {"model_id": catalog_model.pk}, follow=True
    )

    body = response.content.decode()
    assert "model-00002-of-00002.safetensors: size 15 != manifest 1048576" in body
    catalog_model.refresh_from_db()
    assert catalog_model.latest_verification.status == "mismatch"
    browser = admin_client.get(reverse("admin:catalog_servedmodel_storage")).content.decode()
    assert "sb-mismatch" in browser  # the listing's sizes no longer match the manifest either


def test_saving_the_change_form_keeps_an_upload_that_finished_meanwhile(admin_client, catalog_model, monkeypatch):
    from apps.catalog.admin import ModelAdminForm

    url = reverse("admin:catalog_servedmodel_change", args=[catalog_model.pk])
    upload = WeightUpload.objects.create(model=catalog_model, status=UploadStatus.UPLOADING)
    original_clean = ModelAdminForm.clean

    def worker_finishes_while_the_form_is_validated(form):
        # The admin has loaded the row; the worker now publishes the finished upload on it.
        WeightUpload.objects.filter(pk=upload.pk).update(status=UploadStatus.UPLOADED)
        ServedModel.objects.filter(pk=catalog_model.pk).update(total_bytes=123, manifest=[{"path": "a", "size": 123}])
        return original_clean(form)

    monkeypatch.setattr(ModelAdminForm, "clean", worker_finishes_while_the_form_is_validated)

    response = admin_client.post(
        url,
        _form_data(
            name=catalog_model.name,
            hf_repo=catalog_model.hf_repo,
            storage_uri=catalog_model.storage_uri,
            max_replicas="3",
        ),
    )

    assert response.status_code == 302
    catalog_model.refresh_from_db()
    assert catalog_model.max_replicas == 3
    assert (catalog_model.latest_upload.status, catalog_model.total_bytes) == (UploadStatus.UPLOADED, 123)
    assert catalog_model.manifest == [{"path": "a", "size": 123}]
