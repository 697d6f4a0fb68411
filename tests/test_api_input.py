"""Hostile input to the management API: a clear JSON 400, never a 500 (issue #11, findings 1 to 3)."""

from __future__ import annotations

import pytest
from django.contrib.auth.models import User
from rest_framework.test import APIClient

from apps.metering.tests.factories import make_usage
from apps.tenancy.services import api_key_issue, staff_token_issue

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff() -> APIClient:
    user = User.objects.create_user("ops", password="pw-ops-1", is_staff=True, is_superuser=True)
    client = APIClient(raise_request_exception=False)
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {staff_token_issue(user=user, name='t')[1]}")
    return client


def _json_400(response) -> str:
    assert response.status_code == 400, (response.status_code, response.content[:200])
    assert response["Content-Type"].startswith("application/json")
    return response.json()["error"]["message"]


@pytest.mark.parametrize(
    ("url", "offset"),
    [
        ("/api/v1/usage/?created_before=2026-01-01T00:00:00", "+20:00"),
        ("/api/v1/keys/?created_after=2026-01-01T00:00:00", "-23:44"),
    ],
)
def test_a_time_zone_offset_postgresql_cannot_store_still_filters_as_the_same_instant(staff, tenant, url, offset):
    make_usage(tenant=tenant)
    api_key_issue(tenant=tenant, name="k", scopes=["inference"])
    response = staff.get(url + offset.replace("+", "%2B"))
    assert response.status_code == 200, response.content[:300]


def test_an_offset_python_refuses_is_a_400(staff):
    _json_400(staff.get("/api/v1/usage/?created_before=2026-01-01T00:00:00%2B25:00"))


def test_a_nul_in_a_json_string_is_refused(staff, tenant, catalog_model):
    message = _json_400(staff.post("/api/v1/keys/", {"tenant": "a\u0000", "name": "k"}, format="json"))
    assert "NUL" in message
    _json_400(staff.post("/api/v1/nodes/", {"model": "x\u0000", "launcher": "static"}, format="json"))
    _json_400(
        staff.post(
            "/api/v1/tenants/", {"slug": "ok", "name": "n", "contact_email": "a@b.c", "\u0000": 1}, format="json"
        )
    )


def test_a_nul_in_the_query_string_is_refused(staff):
    assert "NUL" in _json_400(staff.get("/api/v1/keys/?name=a%00b"))
    _json_400(staff.get("/api/v1/tenants/?search=%00"))


def test_json_nested_100000_levels_is_a_400_not_a_recursion_error(staff):
    body = "[" * 100_000 + "]" * 100_000
    response = staff.generic("POST", "/api/v1/keys/", body, content_type="application/json")
    assert "nested too deeply" in _json_400(response)
