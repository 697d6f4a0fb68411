"""The budget webhook signing secret from the management API and the admin: shown once when
rotated, never in a tenant's representation; staff only; webhook URLs are http(s) only."""

from __future__ import annotations

import pytest
from django.contrib.messages import get_messages
from django.urls import reverse

from apps.tenancy.models import Tenant
from apps.tenancy.services import api_key_issue, tenant_webhook_secret
from apps.tenancy.tests.conftest import bearer

pytestmark = pytest.mark.django_db


def test_staff_rotate_the_secret_and_see_it_once(staff_api, tenant):
    first = staff_api.post(f"/api/v1/tenants/{tenant.slug}/rotate-webhook-secret/")
    second = staff_api.post(f"/api/v1/tenants/{tenant.slug}/rotate-webhook-secret/")

    assert first.status_code == 200 and first["Cache-Control"] == "no-store"
    raw = second.json()["budget_webhook_secret"]
    assert raw.startswith("whsec_") and raw != first.json()["budget_webhook_secret"]
    tenant.refresh_from_db()
    assert tenant_webhook_secret(tenant=tenant) == raw  # the last one shown is the one deliveries use
    shown = staff_api.get(f"/api/v1/tenants/{tenant.slug}/").json()
    assert shown["budget_webhook_secret_rotated_at"] == second.json()["budget_webhook_secret_rotated_at"]
    listed = staff_api.get("/api/v1/tenants/").content.decode()
    assert raw not in str(shown) and raw not in listed and "sealed" not in listed


def test_the_secret_cannot_be_written_through_a_patch(staff_api, tenant):
    patched = staff_api.patch(
        f"/api/v1/tenants/{tenant.slug}/",
        {"budget_webhook_secret_sealed": "x", "budget_webhook_secret_rotated_at": "2020-01-01T00:00:00Z"},
        format="json",
    )

    # Refused as unknown (the sealed column is not in the API) or ignored as read-only: never written.
    assert patched.status_code in (200, 400), patched.json()
    stored = Tenant.objects.get(pk=tenant.pk)
    assert (stored.budget_webhook_secret_sealed, stored.budget_webhook_secret_rotated_at) == ("", None)


def test_a_customer_key_cannot_rotate_a_secret(tenant):
    _, raw = api_key_issue(tenant=tenant, scopes=["inference", "keys:manage", "usage:read"])

    refused = bearer(raw).post(f"/api/v1/tenants/{tenant.slug}/rotate-webhook-secret/")

    assert refused.status_code in (401, 403) and Tenant.objects.get(pk=tenant.pk).budget_webhook_secret_sealed == ""


def test_an_unknown_tenant_is_a_404(staff_api):
    assert staff_api.post("/api/v1/tenants/nobody/rotate-webhook-secret/").status_code == 404


@pytest.mark.parametrize(
    "url", ["ftp://hooks.acme.test/budget", "file:///etc/passwd", "javascript:alert(1)", "https://"]
)
def test_a_webhook_url_must_be_http_or_https(staff_api, tenant, url):
    refused = staff_api.patch(f"/api/v1/tenants/{tenant.slug}/", {"budget_webhook_url": url}, format="json")

    assert refused.status_code == 400 and "budget_webhook_url" in refused.json()["error"]["fields"], refused.json()


def test_the_admin_action_shows_a_new_secret_once(admin_client, tenant):
    changelist = reverse("admin:tenancy_tenant_changelist")

    done = admin_client.post(changelist, {"action": "rotate_webhook_secret", "_selected_action": [tenant.pk]})

    assert done.status_code == 302
    [message] = [str(m) for m in get_messages(done.wsgi_request)]
    tenant.refresh_from_db()
    raw = tenant_webhook_secret(tenant=tenant)
    assert raw in message and "will not be shown again" in message
    assert raw in admin_client.get(done.url).content.decode()  # the message, on the page after the action
    page = admin_client.get(reverse("admin:tenancy_tenant_change", args=[tenant.pk])).content.decode()
    assert raw not in page and tenant.budget_webhook_secret_sealed not in page and "rotate it to see" in page


def test_the_admin_action_wants_exactly_one_tenant(admin_client, tenant):
    other = Tenant.objects.create(slug="other", name="other")

    done = admin_client.post(
        reverse("admin:tenancy_tenant_changelist"),
        {"action": "rotate_webhook_secret", "_selected_action": [tenant.pk, other.pk]},
    )

    assert "exactly one" in str(next(iter(get_messages(done.wsgi_request))))
    assert not Tenant.objects.exclude(budget_webhook_secret_sealed="").exists()


def test_the_admin_form_refuses_an_ftp_webhook(admin_client, tenant):
    url = reverse("admin:tenancy_tenant_change", args=[tenant.pk])
    form = {
        "slug": tenant.slug,
        "name": tenant.name,
        "contact_email": "",
        "requests_per_minute": 600,
        "tokens_per_minute": 200_000,
        "max_concurrent_requests": 32,
        "monthly_token_budget": "",
        "monthly_spend_limit_micros": "",
        "budget_alert_percent": 80,
        "budget_webhook_url": "ftp://hooks.acme.test/budget",
        "api_keys-TOTAL_FORMS": 0,
        "api_keys-INITIAL_FORMS": 0,
    }

    refused = admin_client.post(url, form)

    assert refused.status_code == 200 and "Enter a valid URL" in refused.content.decode()
    assert Tenant.objects.get(pk=tenant.pk).budget_webhook_url == ""
