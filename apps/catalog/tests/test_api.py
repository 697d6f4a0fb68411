"""The catalog's management API: staff CRUD and actions; customer keys are refused."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from apps.catalog import storage
from apps.catalog.models import ServedModel, UploadStatus, WeightUpload
from apps.catalog.services import model_create
from apps.catalog.uploads import upload_execute, upload_request

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff_api(db) -> APIClient:
    from django.contrib.auth.models import User

    from apps.tenancy.services import staff_token_issue

    user = User.objects.create_user("catalog-operator", password="pw-operator-1", is_staff=True)
    _, raw = staff_token_issue(user=user, name="ci")
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    return client


@pytest.fixture
def customer_api(api_key) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {api_key[1]}")
    return client


def test_staff_crud_on_models(staff_api):
    created = staff_api.post(
        "/api/v1/models/",
        {
            "name": "mistral-7b",
            "hf_repo": "mistralai/Mistral-7B-Instruct-v0.3",
            "price_input_per_mtok": "0.1",
            "price_output_per_mtok": "0.3",
            "accelerator": "L4:1",
            "extra_vllm_args": ["--enable-prefix-caching"],
        },
        format="json",
    )
    assert created.status_code == 201, created.json()
    model_id = created.json()["id"]
    assert created.json()["upload_status"] == "none"

    patched = staff_api.patch(f"/api/v1/models/{model_id}/", {"max_replicas": 4}, format="json")
    assert patched.status_code == 200 and patched.json()["max_replicas"] == 4
    assert staff_api.get(f"/api/v1/models/{model_id}/").json()["name"] == "mistral-7b"

    assert staff_api.delete(f"/api/v1/models/{model_id}/").status_code == 204
    assert not ServedModel.objects.filter(pk=model_id).exists()


def test_a_model_with_nodes_cannot_be_deleted(staff_api, node):
    response = staff_api.delete(f"/api/v1/models/{node.model_id}/")
    assert response.status_code == 409
    assert "deactivate" in response.json()["error"]["message"]


def test_filters_by_name_active_and_upload_status(staff_api):
    model_create(name="alpha-model")
    model_create(name="beta-model", is_active=False)
    uploaded = model_create(name="gamma-model")
    WeightUpload.objects.create(model=uploaded, status=UploadStatus.FAILED)
    WeightUpload.objects.create(model=uploaded, status=UploadStatus.UPLOADED)  # the latest attempt counts

    def names(query: str) -> list[str]:
        return [m["name"] for m in staff_api.get(f"/api/v1/models/?{query}").json()["results"]]

    assert names("name=beta") == ["beta-model"]
    assert names("is_active=false") == ["beta-model"]
    assert names("upload_status=uploaded") == ["gamma-model"]


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({"name": "bad name!"}, "name"),
        ({"name": "ok-name", "storage_uri": "ftp://x"}, "storage_uri"),
        ({"name": "ok-name", "min_replicas": 3, "max_replicas": 1}, "max_replicas"),
        ({"name": "ok-name", "price_input_per_mtok": "-1"}, "price_input_per_mtok"),
        ({"name": "ok-name", "accelerator": "L4:"}, "accelerator"),
    ],
)
def test_bad_input_is_a_400_naming_the_field(staff_api, body, field):
    response = staff_api.post("/api/v1/models/", body, format="json")

    assert response.status_code == 400
    error = response.json()["error"]
    assert field in error["fields"] and error["message"].startswith(f"{field}:")
    assert not ServedModel.objects.filter(name="ok-name").exists()


def test_duplicate_name_is_a_400_naming_the_field(staff_api, catalog_model):
    response = staff_api.post("/api/v1/models/", {"name": catalog_model.name}, format="json")
    assert response.status_code == 400 and "name" in response.json()["error"]["fields"]


def test_customer_keys_are_refused_everywhere(customer_api, catalog_model):
    assert customer_api.get("/api/v1/models/").status_code == 403
    assert customer_api.get(f"/api/v1/models/{catalog_model.pk}/").status_code == 403
    assert customer_api.post("/api/v1/models/", {"name": "sneaky"}, format="json").status_code == 403
    assert (
        customer_api.post(f"/api/v1/models/{catalog_model.pk}/upload/", {"hf_repo": "a/b"}, format="json").status_code
        == 403
    )
    assert customer_api.post(f"/api/v1/models/{catalog_model.pk}/verify/").status_code == 403
    assert not ServedModel.objects.filter(name="sneaky").exists()
    catalog_model.refresh_from_db()
    assert catalog_model.latest_upload is None


def test_upload_action_queues_and_reports_202(staff_api, catalog_model, django_capture_on_commit_callbacks):
    with django_capture_on_commit_callbacks(execute=False) as callbacks:
        response = staff_api.post(
            f"/api/v1/models/{catalog_model.pk}/upload/", {"hf_repo": "acme/tiny@v2"}, format="json"
        )

    assert response.status_code == 202, response.json()
    body = response.json()
    assert body["upload_status"] == "queued"
    assert body["latest_upload"]["status"] == "queued"
    assert body["latest_upload"]["origin"] == "api" and body["latest_upload"]["requested_by"] == "catalog-operator"
    assert body["latest_upload"]["source"] == {
        "kind": "hf",
        "repo": "acme/tiny",
        "revision": "v2",
        "keep": False,
        "prefix": "models/acme--tiny/v2",
        "prefix_auto": True,
    }
    assert len(callbacks) == 1


@pytest.mark.parametrize(
    ("body", "field"),
    [
        ({}, "hf_repo"),
        ({"hf_repo": "not a repo"}, "hf_repo"),
        ({"local_dir": "relative/dir"}, "local_dir"),
        ({"hf_repo": "a/b", "prefix": "../up"}, "prefix"),
    ],
)
def test_bad_upload_input_is_a_400_naming_the_field(staff_api, catalog_model, body, field):
    response = staff_api.post(f"/api/v1/models/{catalog_model.pk}/upload/", body, format="json")
    assert response.status_code == 400
    assert field in response.json()["error"]["fields"]


def test_a_second_upload_while_one_is_queued_is_a_409(staff_api, catalog_model):
    upload_request(model=catalog_model, hf_repo="acme/tiny")
    response = staff_api.post(f"/api/v1/models/{catalog_model.pk}/upload/", {"hf_repo": "acme/tiny"}, format="json")
    assert response.status_code == 409


def test_cancel_upload_action(staff_api, catalog_model):
    assert staff_api.post(f"/api/v1/models/{catalog_model.pk}/cancel-upload/").status_code == 409
    upload_request(model=catalog_model, hf_repo="acme/tiny")

    response = staff_api.post(f"/api/v1/models/{catalog_model.pk}/cancel-upload/")

    assert response.status_code == 200 and response.json()["upload_status"] == "cancelled"


@pytest.mark.slow  # the r2 fixture starts moto_server
def test_verify_action_reports_ok_then_the_mismatch(staff_api, r2, catalog_model, model_folder):
    upload_request(model=catalog_model, local_dir=str(model_folder), prefix="models/api")
    upload_execute(upload_id=catalog_model.latest_upload.pk)
    url = f"/api/v1/models/{catalog_model.pk}/verify/"

    assert staff_api.post(url, {}, format="json").json()["ok"] is True
    storage.delete(r2, "models/api/tokenizer.json")
    report = staff_api.post(url, {"full": True}, format="json").json()

    assert report["ok"] is False and report["problems"] == ["tokenizer.json: missing"]
