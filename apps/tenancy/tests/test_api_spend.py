"""Spend limits through the management API: staff set them in micro-dollars, bad values get a
JSON error naming the field, and a customer key cannot give itself a limit of its choosing."""

from __future__ import annotations

import pytest

from apps.tenancy.models import ApiKey
from apps.tenancy.services import api_key_issue
from apps.tenancy.tests.conftest import bearer

pytestmark = pytest.mark.django_db


def test_staff_set_a_tenants_spend_limit_threshold_and_webhook(staff_api, tenant):
    patched = staff_api.patch(
        f"/api/v1/tenants/{tenant.slug}/",
        {
            "monthly_spend_limit_micros": 25_000_000,
            "budget_alert_percent": 90,
            "budget_webhook_url": "https://hooks.acme.test/budget",
        },
        format="json",
    )

    assert patched.status_code == 200, patched.json()
    body = patched.json()
    assert (body["monthly_spend_limit_micros"], body["budget_alert_percent"]) == (25_000_000, 90)
    assert body["budget_webhook_url"] == "https://hooks.acme.test/budget"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("monthly_spend_limit_micros", -1),
        ("budget_alert_percent", 0),
        ("budget_alert_percent", 101),
        ("budget_webhook_url", "not a url"),
    ],
)
def test_bad_budget_values_are_refused_with_the_field_named(staff_api, tenant, field, value):
    refused = staff_api.patch(f"/api/v1/tenants/{tenant.slug}/", {field: value}, format="json")

    assert refused.status_code == 400 and field in refused.json()["error"]["fields"], refused.json()


def test_staff_set_and_clear_a_keys_own_limit(staff_api, api_key):
    key = api_key[0]
    set_ = staff_api.patch(f"/api/v1/keys/{key.pk}/", {"monthly_spend_limit_micros": 1_500_000}, format="json")
    cleared = staff_api.patch(f"/api/v1/keys/{key.pk}/", {"monthly_spend_limit_micros": None}, format="json")

    assert set_.status_code == 200 and set_.json()["monthly_spend_limit_micros"] == 1_500_000
    assert cleared.status_code == 200 and ApiKey.objects.get(pk=key.pk).monthly_spend_limit_micros is None


def test_a_customer_key_cannot_set_a_spend_limit_on_the_keys_it_creates(tenant):
    _, raw = api_key_issue(tenant=tenant, scopes=["inference", "keys:manage"])

    created = bearer(raw).post("/api/v1/keys/", {"name": "child", "monthly_spend_limit_micros": 1}, format="json")

    assert created.status_code == 201
    assert ApiKey.objects.get(pk=created.json()["id"]).monthly_spend_limit_micros is None
