"""The usage endpoint: staff filters, customer scope and confinement."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.contrib.auth.models import User
from django.utils import timezone
from rest_framework.test import APIClient

from apps.metering.selectors import usage_last_24h
from apps.metering.tests.factories import make_usage
from apps.tenancy.services import api_key_issue, staff_token_issue, tenant_create

pytestmark = pytest.mark.django_db


def _client(raw: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    return client


@pytest.fixture
def staff_api(db) -> APIClient:
    user = User.objects.create_user("ops", is_staff=True)
    return _client(staff_token_issue(user=user)[1])


def _ids(response) -> list[str]:
    assert response.status_code == 200, response.json()
    return [row["request_id"] for row in response.json()["results"]]


def test_staff_filter_usage_by_tenant_key_model_node_and_date(staff_api, tenant, api_key, catalog_model, node) -> None:
    other = tenant_create(slug="other")
    now = timezone.now()
    a = make_usage(
        tenant=tenant,
        api_key=api_key[0],
        model=catalog_model,
        node=node,
        request_id="a",
        created_at=now - timedelta(hours=1),
    )
    make_usage(tenant=tenant, request_id="b", model_name="other-model", created_at=now - timedelta(days=3))
    make_usage(tenant=other, request_id="c", created_at=now - timedelta(minutes=5))

    assert _ids(staff_api.get("/api/v1/usage/")) == ["c", "a", "b"]
    assert _ids(staff_api.get("/api/v1/usage/?tenant=acme")) == ["a", "b"]
    assert _ids(staff_api.get(f"/api/v1/usage/?api_key={api_key[0].pk}")) == ["a"]
    assert _ids(staff_api.get(f"/api/v1/usage/?key_prefix={api_key[0].prefix}")) == ["a"]
    assert _ids(staff_api.get("/api/v1/usage/?model=other-model")) == ["b"]
    assert _ids(staff_api.get(f"/api/v1/usage/?node={node.pk}")) == ["a"]
    after = (now - timedelta(days=1)).isoformat()
    assert _ids(staff_api.get("/api/v1/usage/", {"created_after": after, "tenant": "acme"})) == ["a"]
    assert _ids(staff_api.get("/api/v1/usage/", {"created_before": after})) == ["b"]
    assert _ids(staff_api.get("/api/v1/usage/?ordering=created_at&limit=2")) == ["b", "a"]
    row = staff_api.get(f"/api/v1/usage/{a.pk}/").json()
    assert row["node"] == node.pk and row["total_tokens"] == 42 and row["api_key_prefix"] == api_key[0].prefix


def test_bad_date_filter_is_a_400_naming_the_field(staff_api) -> None:
    response = staff_api.get("/api/v1/usage/?created_after=yesterday")
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("created_after:")


def test_usage_read_key_lists_its_tenants_usage_without_node_details(tenant, node) -> None:
    key, raw = api_key_issue(tenant=tenant, scopes=["usage:read"])
    make_usage(tenant=tenant, api_key=key, node=node, request_id="mine")
    response = _client(raw).get("/api/v1/usage/")
    assert _ids(response) == ["mine"]
    assert "node" not in response.json()["results"][0]


def test_key_without_usage_read_gets_a_clear_403(tenant) -> None:
    _, raw = api_key_issue(tenant=tenant, scopes=["inference", "keys:manage"])
    response = _client(raw).get("/api/v1/usage/")
    assert response.status_code == 403
    assert response.json()["error"]["message"] == "This API key lacks the 'usage:read' scope."


def test_usage_is_read_only(staff_api, tenant) -> None:
    record = make_usage(tenant=tenant)
    assert staff_api.post("/api/v1/usage/", {}, format="json").status_code == 405
    assert staff_api.delete(f"/api/v1/usage/{record.pk}/").status_code == 405


def test_last_24h_totals_count_only_the_last_day(tenant) -> None:
    make_usage(tenant=tenant, prompt_tokens=10, completion_tokens=5)
    make_usage(tenant=tenant, prompt_tokens=100, completion_tokens=100, created_at=timezone.now() - timedelta(hours=25))
    totals = usage_last_24h()
    assert (totals["requests"], totals["tokens"], totals["prompt_tokens"]) == (1, 15, 10)
