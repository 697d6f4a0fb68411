"""The API's error shape, the OpenAPI schema and the Swagger UI."""

from __future__ import annotations

import pytest
from django.core.exceptions import ValidationError as DjangoValidationError
from rest_framework import exceptions
from rest_framework.test import APIClient

from apps.core.api import exception_handler


def test_django_validation_error_with_fields_becomes_a_400_naming_the_field() -> None:
    response = exception_handler(DjangoValidationError({"scopes": "Unknown scope(s): root."}), {})
    assert response.status_code == 400
    assert response.data == {
        "error": {
            "message": "scopes: Unknown scope(s): root.",
            "type": "invalid_request",
            "fields": {"scopes": ["Unknown scope(s): root."]},
        }
    }


def test_django_validation_error_without_fields_is_a_non_field_400() -> None:
    response = exception_handler(DjangoValidationError("Nope."), {})
    assert response.status_code == 400
    assert response.data["error"]["message"] == "Nope."
    assert response.data["error"]["fields"] == {"non_field_errors": ["Nope."]}


def test_nested_drf_errors_still_name_the_outer_field() -> None:
    # DRF keys a list item's errors by its index (the stub allows str keys only: arg-type is off in tests).
    errors = {"scopes": {0: ['"root" is not a valid choice.']}}
    response = exception_handler(exceptions.ValidationError(errors), {})
    assert response.data["error"]["message"] == 'scopes: "root" is not a valid choice.'


def test_other_errors_keep_their_status_and_get_a_type() -> None:
    response = exception_handler(exceptions.NotFound(), {})
    assert (response.status_code, response.data["error"]["type"]) == (404, "not_found")
    assert exception_handler(RuntimeError("boom"), {}) is None  # left to Django's 500 handling


@pytest.mark.django_db
def test_openapi_schema_and_swagger_ui_are_served() -> None:
    client = APIClient()
    schema = client.get("/api/schema/?format=json")
    assert schema.status_code == 200
    body = schema.json()
    assert body["components"]["securitySchemes"]["bearerAuth"]["scheme"] == "bearer"
    for path in (
        "/api/v1/tenants/",
        "/api/v1/tenants/{slug}/suspend/",
        "/api/v1/keys/",
        "/api/v1/keys/{id}/revoke/",
        "/api/v1/usage/",
        "/api/v1/staff-tokens/",
    ):
        assert path in body["paths"], path
    docs = client.get("/api/docs/")
    assert docs.status_code == 200 and b"swagger" in docs.content.lower()
    # The page's assets come from our own static files: the admin works with no internet access.
    assert b"cdn." not in docs.content and b"/static/drf_spectacular_sidecar/swagger-ui-dist/" in docs.content


def test_database_conflicts_become_409s() -> None:
    from django.db import IntegrityError
    from django.db.models import ProtectedError

    response = exception_handler(IntegrityError("duplicate key value violates unique constraint"), {})
    assert (response.status_code, response.data["error"]["type"]) == (409, "conflict")
    assert "duplicate key" not in response.data["error"]["message"]  # no SQL details leak
    response = exception_handler(ProtectedError("protected", set()), {})
    assert response.status_code == 409
