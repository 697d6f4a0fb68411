"""Filters that the OpenAPI schema types strictly are refused when a value does not fit, instead of
silently ignored (issue #11: schemathesis's negative_data_rejection check)."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import User
from rest_framework.test import APIClient

from apps.tenancy.services import staff_token_issue

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff() -> APIClient:
    user = User.objects.create_user("ops", is_staff=True, is_superuser=True)
    client = APIClient(raise_request_exception=False)
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {staff_token_issue(user=user, name='t')[1]}")
    return client


@pytest.mark.parametrize(
    ("url", "param"),
    [
        ("/api/v1/models/?active=null", "active"),
        ("/api/v1/models/?is_active=maybe", "is_active"),
        ("/api/v1/usage/?estimated=null", "estimated"),
        ("/api/v1/nodes/?live=", "live"),
        ("/api/v1/keys/?scope=", "scope"),
        ("/api/v1/keys/?status=", "status"),
        ("/api/v1/tenants/?status=", "status"),
        ("/api/v1/nodes/?status=", "status"),
        ("/api/v1/models/?upload_status=", "upload_status"),
        ("/api/v1/keys/?created_before=", "created_before"),
        ("/api/v1/usage/?status_code=1.5", "status_code"),
        ("/api/v1/usage/?node=3.0", "node"),
        ("/api/v1/usage/?api_key=", "api_key"),
    ],
)
def test_a_filter_value_outside_the_schema_is_a_json_400_naming_it(staff, url, param) -> None:
    response = staff.get(url)
    assert response.status_code == 400, (response.status_code, response.content[:300])
    assert response["Content-Type"].startswith("application/json")
    assert param in response.content.decode()


@pytest.mark.parametrize(
    "url",
    [
        "/api/v1/models/?active=true",
        "/api/v1/models/?is_active=False",
        "/api/v1/models/?active=1",
        "/api/v1/usage/?estimated=false",
        "/api/v1/nodes/?live=true&status=ready&status=loading",
        "/api/v1/keys/?scope=inference",
        "/api/v1/tenants/?status=active",
        "/api/v1/models/",
        "/api/v1/usage/?status_code=200&node=3&api_key=-1",
        "/api/v1/keys/?name=&search=",
    ],
)
def test_values_the_schema_allows_still_filter(staff, url) -> None:
    assert staff.get(url).status_code == 200


@pytest.mark.parametrize(
    ("url", "body", "field"),
    [
        ("/api/v1/tenants/", {"slug": "acme", "name": 5}, "name"),
        ("/api/v1/tenants/", {"slug": 12345, "name": "Acme"}, "slug"),
        ("/api/v1/models/", {"name": 3.5}, "name"),
    ],
)
def test_a_number_where_the_schema_says_string_is_a_400_not_coerced(staff, url, body, field) -> None:
    response = staff.post(url, body, format="json")
    assert response.status_code == 400, (response.status_code, response.content[:300])
    assert field in response.content.decode() and "Not a valid string" in response.content.decode()


def test_suspending_with_a_numeric_reason_is_a_400(staff, tenant) -> None:
    response = staff.post(f"/api/v1/tenants/{tenant.slug}/suspend/", {"reason": 5}, format="json")
    assert response.status_code == 400 and "reason" in response.content.decode()
    tenant.refresh_from_db()
    assert tenant.status == "active"
