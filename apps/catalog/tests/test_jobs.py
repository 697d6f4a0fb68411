"""Job state in its own rows: one WeightUpload per attempt, one WeightVerification per check; the
columns they replace are carried over by migrations 0004-0006."""

from __future__ import annotations

import pytest
from django.urls import reverse

from apps.catalog import storage
from apps.catalog.models import JobOrigin, UploadStatus, VerifyStatus, WeightUpload, WeightVerification
from apps.catalog.uploads import UploadError, upload_claim, upload_execute, upload_request
from apps.catalog.verify import verify_model


@pytest.mark.django_db
@pytest.mark.slow  # the R2 store is a server process
def test_every_attempt_keeps_its_own_row_and_the_model_shows_the_latest(r2, catalog_model, model_folder):
    (model_folder / "bad.pt").write_bytes(b"pickle")
    first = upload_request(model=catalog_model, local_dir=str(model_folder), prefix="models/hist")
    assert upload_execute(upload_id=first.pk) == "failed"
    (model_folder / "bad.pt").unlink()

    second = upload_request(
        model=catalog_model, local_dir=str(model_folder), prefix="models/hist", origin=JobOrigin.COMMAND
    )
    assert upload_execute(upload_id=second.pk) == "uploaded"

    first.refresh_from_db()
    assert first.status == UploadStatus.FAILED and "bad.pt" in first.error  # history is not overwritten
    assert catalog_model.latest_upload == second
    assert list(catalog_model.uploads.values_list("status", "origin")) == [
        (UploadStatus.UPLOADED, JobOrigin.COMMAND),
        (UploadStatus.FAILED, JobOrigin.ADMIN),
    ]


@pytest.mark.django_db
def test_only_one_worker_claims_an_attempt(catalog_model):
    upload = upload_request(model=catalog_model, hf_repo="acme/tiny")

    assert upload_claim(upload_id=upload.pk) is True
    assert upload_claim(upload_id=upload.pk) is False  # a redelivered task, or a second worker


@pytest.mark.django_db
def test_the_database_refuses_a_second_busy_attempt_even_past_the_service(catalog_model):
    from django.db import IntegrityError, transaction

    upload_request(model=catalog_model, hf_repo="acme/tiny")
    with pytest.raises(IntegrityError), transaction.atomic():
        WeightUpload.objects.create(model=catalog_model, status=UploadStatus.UPLOADING)
    with pytest.raises(UploadError, match="already queued"):
        upload_request(model=catalog_model, hf_repo="acme/other")


@pytest.mark.django_db
@pytest.mark.slow  # the R2 store is a server process
def test_a_worker_whose_attempt_was_replaced_stops_and_publishes_nothing(r2, catalog_model, model_folder):
    upload = upload_request(model=catalog_model, local_dir=str(model_folder), prefix="models/replaced")

    def replaced_as_dead(snapshot: dict) -> None:
        # What upload_request does to an attempt silent for UPLOAD_STALE_AFTER_S.
        WeightUpload.objects.filter(pk=upload.pk).update(status=UploadStatus.FAILED, error="went silent")

    assert upload_execute(upload_id=upload.pk, on_progress=replaced_as_dead) == "cancelled"

    upload.refresh_from_db()
    catalog_model.refresh_from_db()
    assert (upload.status, upload.error) == (UploadStatus.FAILED, "went silent")  # the replacement's word stands
    assert catalog_model.manifest == [] and catalog_model.total_bytes == 0


@pytest.mark.django_db
@pytest.mark.slow  # the R2 store is a server process
def test_each_verification_is_a_row_with_its_outcome(r2, catalog_model, model_folder, settings):
    upload = upload_request(model=catalog_model, local_dir=str(model_folder), prefix="models/checked")
    upload_execute(upload_id=upload.pk)
    catalog_model.refresh_from_db()

    assert verify_model(model=catalog_model, origin=JobOrigin.API).ok
    storage.put_bytes(r2, "models/checked/config.json", b"{}")
    assert not verify_model(model=catalog_model, full=True).ok
    settings.R2_BUCKET = "no-such-bucket-here"
    settings.R2_ENDPOINT_URL = "http://127.0.0.1:9"  # nothing listens: the check cannot run
    with pytest.raises(storage.StorageError):
        verify_model(model=catalog_model)

    checks = list(WeightVerification.objects.filter(model=catalog_model).order_by("id"))
    assert [(c.status, c.full, c.origin) for c in checks] == [
        (VerifyStatus.OK, False, JobOrigin.API),
        (VerifyStatus.MISMATCH, True, JobOrigin.ADMIN),
        (VerifyStatus.ERROR, False, JobOrigin.ADMIN),
    ]
    assert checks[0].checked == 7 and checks[0].finished_at is not None
    assert any("config.json" in p for p in checks[1].problems)
    assert "127.0.0.1:9" in checks[2].error
    assert catalog_model.latest_verification == checks[2]


@pytest.mark.django_db
def test_the_admin_change_page_and_the_api_show_the_history(admin_client, admin_user, catalog_model):
    from rest_framework.test import APIClient

    WeightUpload.objects.create(model=catalog_model, status=UploadStatus.FAILED, error="disk full on the worker")
    upload_request(model=catalog_model, hf_repo="acme/tiny@v3", requested_by=admin_user)
    WeightVerification.objects.create(
        model=catalog_model, status=VerifyStatus.MISMATCH, checked=3, problems=["a: missing"]
    )

    page = admin_client.get(reverse("admin:catalog_servedmodel_change", args=[catalog_model.pk])).content.decode()
    assert "disk full on the worker" in page and "acme/tiny@v3" in page and f"Admin ({admin_user.username})" in page
    assert "1 of 3" in page  # the verification's problems
    listing = admin_client.get(reverse("admin:catalog_weightupload_changelist"), {"model__id__exact": catalog_model.pk})
    assert listing.status_code == 200 and listing.content.decode().count("acme/tiny@v3") == 1
    assert admin_client.get(reverse("admin:catalog_weightupload_add")).status_code == 403  # rows come from services

    api = APIClient()
    api.force_authenticate(admin_user)
    detail = api.get(f"/api/v1/models/{catalog_model.pk}/").json()
    assert detail["latest_upload"]["status"] == "queued" and detail["latest_upload"]["requested_by"] == "admin"
    assert detail["latest_verification"]["problems"] == ["a: missing"]
    history = api.get(f"/api/v1/models/{catalog_model.pk}/uploads/").json()
    assert [u["status"] for u in history["results"]] == ["queued", "failed"] and history["count"] == 2
    checks = api.get(f"/api/v1/models/{catalog_model.pk}/verifications/").json()
    assert [c["status"] for c in checks["results"]] == ["mismatch"]
