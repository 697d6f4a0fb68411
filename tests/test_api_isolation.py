"""Tenant isolation on the management API, checked both ways: a customer key never sees,
changes or even confirms the existence of another tenant's keys or usage (404, not 403)."""

from __future__ import annotations

import pytest
from rest_framework.test import APIClient

from apps.metering.tests.factories import make_usage
from apps.tenancy.services import api_key_issue, api_key_verify, tenant_create

pytestmark = pytest.mark.django_db

ALL_SCOPES = ["inference", "usage:read", "keys:manage"]


def _client(raw: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    return client


@pytest.fixture
def two_tenants(db) -> dict[str, dict]:
    world = {}
    for slug in ("alpha", "bravo"):
        tenant = tenant_create(slug=slug)
        key, raw = api_key_issue(tenant=tenant, name=f"{slug}-admin", scopes=ALL_SCOPES)
        spare, spare_raw = api_key_issue(tenant=tenant, name=f"{slug}-spare")
        usage = make_usage(tenant=tenant, api_key=key)
        world[slug] = {
            "tenant": tenant,
            "key": key,
            "client": _client(raw),
            "spare": spare,
            "spare_raw": spare_raw,
            "usage": usage,
        }
    return world


@pytest.mark.parametrize(("me", "them"), [("alpha", "bravo"), ("bravo", "alpha")])
def test_a_key_lists_only_its_own_tenants_keys_and_usage(two_tenants, me, them) -> None:
    client = two_tenants[me]["client"]
    keys = client.get("/api/v1/keys/").json()["results"]
    assert {k["tenant"] for k in keys} == {me} and len(keys) == 2
    usage = client.get("/api/v1/usage/").json()["results"]
    assert [u["request_id"] for u in usage] == [two_tenants[me]["usage"].request_id]
    # Asking for the other tenant by filter yields nothing rather than their rows.
    assert client.get(f"/api/v1/keys/?tenant={them}").json()["results"] == []
    assert client.get(f"/api/v1/usage/?tenant={them}").json()["results"] == []
    assert client.get(f"/api/v1/keys/?prefix={two_tenants[them]['spare'].prefix}").json()["results"] == []


@pytest.mark.parametrize(("me", "them"), [("alpha", "bravo"), ("bravo", "alpha")])
def test_another_tenants_objects_are_404_not_403(two_tenants, me, them) -> None:
    client = two_tenants[me]["client"]
    theirs = two_tenants[them]
    for response in (
        client.get(f"/api/v1/keys/{theirs['spare'].pk}/"),
        client.post(f"/api/v1/keys/{theirs['spare'].pk}/revoke/"),
        client.get(f"/api/v1/usage/{theirs['usage'].pk}/"),
    ):
        assert response.status_code == 404
        assert response.json()["error"]["type"] == "not_found"
    # And it really was not revoked.
    assert api_key_verify(raw=theirs["spare_raw"]) is not None


@pytest.mark.parametrize(("me", "them"), [("alpha", "bravo"), ("bravo", "alpha")])
def test_another_tenants_ids_look_exactly_like_missing_ids(two_tenants, me, them) -> None:
    client = two_tenants[me]["client"]
    existing = client.get(f"/api/v1/keys/{two_tenants[them]['spare'].pk}/")
    missing = client.get("/api/v1/keys/999999/")
    assert (existing.status_code, existing.json()) == (missing.status_code, missing.json())


def test_keys_created_by_a_customer_land_in_its_own_tenant(two_tenants) -> None:
    response = two_tenants["alpha"]["client"].post("/api/v1/keys/", {"name": "new"}, format="json")
    assert response.status_code == 201
    assert api_key_verify(raw=response.json()["key"]).tenant == two_tenants["alpha"]["tenant"]
    bravo_keys = two_tenants["bravo"]["client"].get("/api/v1/keys/").json()["results"]
    assert "new" not in {k["name"] for k in bravo_keys}
