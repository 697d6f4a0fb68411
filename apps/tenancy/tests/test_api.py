"""The management API for tenants, keys and staff tokens, as staff and as customer keys."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.utils import timezone
from rest_framework.test import APIClient

from apps.tenancy.models import ApiKey, Tenant
from apps.tenancy.services import (
    api_key_issue,
    api_key_verify,
    staff_token_issue,
    staff_token_revoke,
    tenant_create,
)
from apps.tenancy.tests.conftest import bearer

pytestmark = pytest.mark.django_db


# --- Authentication -------------------------------------------------------------------------


def test_anonymous_requests_get_a_json_401() -> None:
    response = APIClient().get("/api/v1/tenants/")
    assert response.status_code == 401
    assert response.json()["error"]["type"] == "authentication_error"


def test_staff_token_authenticates_as_its_user_and_records_use(staff_api, staff_token) -> None:
    assert staff_api.get("/api/v1/tenants/").status_code == 200
    staff_token[0].refresh_from_db()
    assert staff_token[0].last_used_at is not None


def test_revoked_staff_token_is_rejected(staff_api, staff_token) -> None:
    staff_token_revoke(token=staff_token[0])
    response = staff_api.get("/api/v1/tenants/")
    assert response.status_code == 401
    assert "staff token" in response.json()["error"]["message"]


def test_staff_token_stops_working_when_its_user_loses_staff(staff_api, staff_user) -> None:
    staff_user.is_staff = False
    staff_user.save()
    assert staff_api.get("/api/v1/tenants/").status_code == 401


def test_expired_staff_token_is_rejected(staff_user) -> None:
    token, raw = staff_token_issue(user=staff_user, expires_at=timezone.now() + timedelta(seconds=30))
    type(token).objects.filter(pk=token.pk).update(expires_at=timezone.now() - timedelta(seconds=1))
    assert bearer(raw).get("/api/v1/tenants/").status_code == 401


def test_staff_session_works_too(client, staff_user) -> None:
    client.force_login(staff_user)
    assert client.get("/api/v1/tenants/").status_code == 200


def test_malformed_authorization_header_is_a_clear_401() -> None:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION="Token abc")
    response = client.get("/api/v1/tenants/")
    assert response.status_code == 401
    assert "Bearer" in response.json()["error"]["message"]


# --- Tenants --------------------------------------------------------------------------------


def test_staff_crud_on_tenants(staff_api) -> None:
    created = staff_api.post(
        "/api/v1/tenants/",
        {"slug": "globex", "name": "Globex", "contact_email": "ops@globex.test", "requests_per_minute": 10},
        format="json",
    )
    assert created.status_code == 201, created.json()
    assert created.json()["status"] == "active" and created.json()["requests_per_minute"] == 10

    listed = staff_api.get("/api/v1/tenants/?status=active").json()
    assert [t["slug"] for t in listed["results"]] == ["globex"] and listed["count"] == 1

    patched = staff_api.patch("/api/v1/tenants/globex/", {"monthly_token_budget": 1_000_000}, format="json")
    assert patched.status_code == 200 and patched.json()["monthly_token_budget"] == 1_000_000

    assert staff_api.delete("/api/v1/tenants/globex/").status_code == 204
    assert not Tenant.objects.filter(slug="globex").exists()


def test_tenant_status_cannot_be_written_directly(staff_api, tenant) -> None:
    response = staff_api.patch(f"/api/v1/tenants/{tenant.slug}/", {"status": "suspended"}, format="json")
    assert response.status_code == 200
    tenant.refresh_from_db()
    assert tenant.status == "active"


def test_suspend_and_reactivate_actions(staff_api, tenant, api_key) -> None:
    _, raw = api_key
    response = staff_api.post(f"/api/v1/tenants/{tenant.slug}/suspend/", {"reason": "unpaid"}, format="json")
    assert response.status_code == 200
    assert response.json()["status"] == "suspended" and response.json()["status_reason"] == "unpaid"
    assert bearer(raw).get("/api/v1/keys/").status_code == 401  # a suspended tenant's keys stop working

    response = staff_api.post(f"/api/v1/tenants/{tenant.slug}/reactivate/")
    assert response.status_code == 200 and response.json()["status"] == "active"
    assert bearer(raw).get("/api/v1/keys/").status_code == 200


def test_duplicate_slug_is_a_400_naming_the_field(staff_api, tenant) -> None:
    response = staff_api.post("/api/v1/tenants/", {"slug": tenant.slug}, format="json")
    assert response.status_code == 400
    error = response.json()["error"]
    assert error["type"] == "invalid_request"
    assert error["message"].startswith("slug:") and "slug" in error["fields"]


def test_invalid_email_and_limit_are_400s_naming_the_field(staff_api) -> None:
    response = staff_api.post("/api/v1/tenants/", {"slug": "x", "contact_email": "nope"}, format="json")
    assert response.status_code == 400 and "contact_email" in response.json()["error"]["fields"]
    response = staff_api.post("/api/v1/tenants/", {"slug": "x", "tokens_per_minute": 0}, format="json")
    assert response.status_code == 400 and "tokens_per_minute" in response.json()["error"]["fields"]


def test_tenant_with_usage_cannot_be_deleted(staff_api, tenant) -> None:
    from apps.metering.tests.factories import make_usage

    make_usage(tenant=tenant)
    response = staff_api.delete(f"/api/v1/tenants/{tenant.slug}/")
    assert response.status_code == 409
    assert "suspend" in response.json()["error"]["message"]
    assert Tenant.objects.filter(pk=tenant.pk).exists()


def test_customer_keys_cannot_touch_tenants(api_key, tenant) -> None:
    client = bearer(api_key[1])
    assert client.get("/api/v1/tenants/").status_code == 403
    assert client.get(f"/api/v1/tenants/{tenant.slug}/").status_code == 403
    assert client.post(f"/api/v1/tenants/{tenant.slug}/suspend/").status_code == 403
    assert (
        client.patch(f"/api/v1/tenants/{tenant.slug}/", {"requests_per_minute": 10**6}, format="json").status_code
        == 403
    )
    tenant.refresh_from_db()
    assert tenant.is_active and tenant.requests_per_minute == 600


# --- Keys as staff --------------------------------------------------------------------------


def test_staff_creates_a_key_for_any_tenant_and_sees_the_raw_key_once(staff_api, tenant) -> None:
    response = staff_api.post(
        "/api/v1/keys/", {"tenant": tenant.slug, "name": "ci", "scopes": ["usage:read"]}, format="json"
    )
    assert response.status_code == 201, response.json()
    body = response.json()
    key = api_key_verify(raw=body["key"])
    assert key is not None and key.tenant == tenant and key.scopes == ["usage:read"]
    assert "digest" not in body

    again = staff_api.get(f"/api/v1/keys/{key.pk}/").json()
    assert "key" not in again and "digest" not in again and again["prefix"] == key.prefix
    assert body["key"] not in str(staff_api.get("/api/v1/keys/").json())


def test_staff_updates_and_revokes_keys(staff_api, api_key) -> None:
    key, raw = api_key
    response = staff_api.patch(
        f"/api/v1/keys/{key.pk}/", {"scopes": ["inference"], "requests_per_minute": 5}, format="json"
    )
    assert response.status_code == 200 and response.json()["scopes"] == ["inference"]
    assert response.json()["requests_per_minute"] == 5

    response = staff_api.post(f"/api/v1/keys/{key.pk}/revoke/")
    assert response.status_code == 200 and response.json()["status"] == "revoked"
    assert api_key_verify(raw=raw) is None


def test_unknown_scope_and_unknown_tenant_are_400s_naming_the_field(staff_api, tenant) -> None:
    response = staff_api.post("/api/v1/keys/", {"tenant": tenant.slug, "scopes": ["root"]}, format="json")
    assert response.status_code == 400 and "scopes" in response.json()["error"]["fields"]
    response = staff_api.post("/api/v1/keys/", {"tenant": "nobody"}, format="json")
    assert response.status_code == 400 and response.json()["error"]["message"].startswith("tenant:")


def test_a_service_validation_error_becomes_a_400_naming_the_field(staff_api, tenant) -> None:
    # allowed_models is checked against the catalog by the service, not the serializer.
    response = staff_api.post(
        "/api/v1/keys/", {"tenant": tenant.slug, "allowed_models": ["no-such-model"]}, format="json"
    )
    assert response.status_code == 400
    assert response.json()["error"]["message"].startswith("allowed_models:")
    assert not ApiKey.objects.exists()


def test_key_filters(staff_api, tenant) -> None:
    other = tenant_create(slug="other")
    api_key_issue(tenant=tenant, name="a", scopes=["inference"])
    revoked, _ = api_key_issue(tenant=other, name="b", scopes=["usage:read"])
    staff_api.post(f"/api/v1/keys/{revoked.pk}/revoke/")
    names = lambda q: sorted(k["name"] for k in staff_api.get(f"/api/v1/keys/?{q}").json()["results"])  # noqa: E731
    assert names("tenant=other") == ["b"]
    assert names("scope=inference") == ["a"]
    assert names("status=revoked") == ["b"]
    assert names("status=active") == ["a"]
    assert names("ordering=name&limit=1") == ["a"]


# --- Keys as a customer ---------------------------------------------------------------------


def test_customer_key_lists_creates_and_revokes_its_own_tenants_keys(tenant, api_key) -> None:
    client = bearer(api_key[1])
    response = client.post("/api/v1/keys/", {"name": "worker", "scopes": ["inference"]}, format="json")
    assert response.status_code == 201, response.json()
    new = api_key_verify(raw=response.json()["key"])
    assert new.tenant == tenant and new.scopes == ["inference"]
    listed = client.get("/api/v1/keys/").json()
    assert {k["prefix"] for k in listed["results"]} == {api_key[0].prefix, new.prefix}
    assert client.post(f"/api/v1/keys/{new.pk}/revoke/").status_code == 200
    assert api_key_verify(raw=response.json()["key"]) is None


def test_customer_key_cannot_grant_scopes_it_lacks(tenant) -> None:
    _, raw = api_key_issue(tenant=tenant, scopes=["keys:manage"])
    response = bearer(raw).post("/api/v1/keys/", {"scopes": ["keys:manage", "usage:read"]}, format="json")
    assert response.status_code == 400
    message = response.json()["error"]["message"]
    assert message.startswith("scopes:") and "usage:read" in message
    assert ApiKey.objects.count() == 1


def test_customer_key_cannot_raise_limits_above_its_own(tenant) -> None:
    _, raw = api_key_issue(tenant=tenant, scopes=["keys:manage", "inference"], requests_per_minute=10)
    client = bearer(raw)
    response = client.post("/api/v1/keys/", {"requests_per_minute": 11}, format="json")
    assert response.status_code == 400 and "requests_per_minute" in response.json()["error"]["fields"]
    response = client.post("/api/v1/keys/", {"tokens_per_minute": tenant.tokens_per_minute + 1}, format="json")
    assert response.status_code == 400 and "tokens_per_minute" in response.json()["error"]["fields"]
    # Leaving a limit out inherits the issuer's, rather than falling back to the tenant's higher one.
    response = client.post("/api/v1/keys/", {}, format="json")
    assert response.status_code == 201 and response.json()["requests_per_minute"] == 10


def test_customer_key_cannot_outlive_or_widen_itself(tenant, catalog_model) -> None:
    from apps.catalog.services import model_create

    model_create(name="other-model")
    expiry = timezone.now() + timedelta(days=1)
    _, raw = api_key_issue(
        tenant=tenant, scopes=["keys:manage", "inference"], expires_at=expiry, allowed_models=[catalog_model.name]
    )
    client = bearer(raw)
    later = (expiry + timedelta(days=1)).isoformat()
    response = client.post("/api/v1/keys/", {"expires_at": later}, format="json")
    assert response.status_code == 400 and "expires_at" in response.json()["error"]["fields"]
    response = client.post("/api/v1/keys/", {"allowed_models": ["other-model"]}, format="json")
    assert response.status_code == 400 and "allowed_models" in response.json()["error"]["fields"]
    body = client.post("/api/v1/keys/", {}, format="json").json()
    assert body["allowed_models"] == [catalog_model.name] and body["expires_at"] is not None


def test_customer_key_cannot_update_keys_even_its_own(api_key) -> None:
    key, raw = api_key
    response = bearer(raw).patch(f"/api/v1/keys/{key.pk}/", {"requests_per_minute": 10**6}, format="json")
    assert response.status_code == 403
    key.refresh_from_db()
    assert key.requests_per_minute is None


def test_customer_key_cannot_name_another_tenant(tenant, api_key) -> None:
    tenant_create(slug="victim")
    response = bearer(api_key[1]).post("/api/v1/keys/", {"tenant": "victim"}, format="json")
    assert response.status_code == 400 and response.json()["error"]["message"].startswith("tenant:")
    assert not ApiKey.objects.filter(tenant__slug="victim").exists()


def test_key_without_keys_manage_gets_a_clear_403(tenant) -> None:
    _, raw = api_key_issue(tenant=tenant, scopes=["inference"])
    response = bearer(raw).get("/api/v1/keys/")
    assert response.status_code == 403
    assert response.json()["error"] == {
        "message": "This API key lacks the 'keys:manage' scope.",
        "type": "permission_denied",
    }


def test_revoked_customer_key_is_rejected(api_key) -> None:
    key, raw = api_key
    bearer(raw).post(f"/api/v1/keys/{key.pk}/revoke/")
    assert bearer(raw).get("/api/v1/keys/").status_code == 401


# --- Staff tokens over the API --------------------------------------------------------------


def test_staff_issues_lists_and_revokes_own_tokens(staff_api, staff_token) -> None:
    response = staff_api.post("/api/v1/staff-tokens/", {"name": "deploy"}, format="json")
    assert response.status_code == 201
    raw = response.json()["key"]
    assert raw.startswith("cls_")
    assert bearer(raw).get("/api/v1/tenants/").status_code == 200
    tokens = staff_api.get("/api/v1/staff-tokens/").json()["results"]
    assert {t["name"] for t in tokens} == {"ci", "deploy"} and all("key" not in t for t in tokens)
    assert staff_api.post(f"/api/v1/staff-tokens/{response.json()['id']}/revoke/").status_code == 200
    assert bearer(raw).get("/api/v1/tenants/").status_code == 401


def test_customer_keys_cannot_mint_staff_tokens(api_key) -> None:
    assert bearer(api_key[1]).post("/api/v1/staff-tokens/", {}, format="json").status_code == 403
