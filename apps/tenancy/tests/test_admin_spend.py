"""Spend limits in the admin: typed in dollars, stored in micro-dollars, shown as a bar with the
month's spend in dollars on the tenant list, the tenant page and the key page."""

from __future__ import annotations

from datetime import timedelta

import pytest
from django.urls import reverse
from django.utils import timezone

from apps.metering.display import budget_bar, dollars
from apps.metering.tests.factories import make_usage
from apps.tenancy.models import ApiKey
from apps.tenancy.services import api_key_issue, tenant_create

pytestmark = pytest.mark.django_db


@pytest.fixture
def acme(db):
    tenant = tenant_create(slug="acme", monthly_spend_limit_micros=10_000_000, budget_alert_percent=80)
    make_usage(tenant=tenant, cost_micros=8_500_000)  # $8.50 this month
    make_usage(tenant=tenant, cost_micros=99_000_000, created_at=timezone.now() - timedelta(days=40))  # not this month
    return tenant


def test_the_tenant_list_shows_this_months_spend_against_the_limit(admin_client, acme):
    tenant_create(slug="nolimit")

    page = admin_client.get(reverse("admin:tenancy_tenant_changelist")).content.decode()

    assert "$8.50 / $10.00 (85%)" in page and "⚠ over 80%" in page
    assert "$0.00 <small>(no limit)</small>" in page
    assert "8500000" not in page  # dollars, not micro-dollars


def test_the_tenant_page_takes_the_limit_in_dollars(admin_client, acme):
    url = reverse("admin:tenancy_tenant_change", args=[acme.pk])
    page = admin_client.get(url).content.decode()
    assert 'value="10.000000"' in page or 'value="10"' in page
    assert "$8.50 / $10.00 (85%)" in page

    form = {
        "slug": "acme",
        "name": acme.name,
        "contact_email": "",
        "requests_per_minute": 600,
        "tokens_per_minute": 200_000,
        "max_concurrent_requests": 32,
        "monthly_token_budget": "",
        "monthly_spend_limit_micros": "12.345678",
        "budget_alert_percent": 90,
        "budget_webhook_url": "https://hooks.acme.test/budget",
        "api_keys-TOTAL_FORMS": 0,
        "api_keys-INITIAL_FORMS": 0,
    }
    saved = admin_client.post(url, form)

    assert saved.status_code == 302, saved.content.decode()[:2000]
    acme.refresh_from_db()
    assert (acme.monthly_spend_limit_micros, acme.budget_alert_percent) == (12_345_678, 90)
    refused = admin_client.post(url, {**form, "monthly_spend_limit_micros": "-1"})
    assert refused.status_code == 200 and "greater than or equal to 0" in refused.content.decode()


def test_the_key_page_shows_the_keys_own_spend(admin_client, acme):
    key, _ = api_key_issue(tenant=acme, name="batch", monthly_spend_limit_micros=1_000_000)
    make_usage(tenant=acme, api_key=key, cost_micros=1_250_000)

    page = admin_client.get(reverse("admin:tenancy_apikey_change", args=[key.pk])).content.decode()

    assert "$1.25 / $1.00 (125%)" in page and "⚠ limit reached" in page


def test_a_key_issued_in_the_admin_gets_its_limit_in_micro_dollars(admin_client, acme):
    created = admin_client.post(
        reverse("admin:tenancy_apikey_add"),
        {"tenant": acme.pk, "name": "capped", "scopes": ["inference"], "monthly_spend_limit_micros": "2.5"},
    )

    assert created.status_code == 302
    assert ApiKey.objects.get(name="capped").monthly_spend_limit_micros == 2_500_000


def test_dollars_and_the_bar():
    assert dollars(8_500_000) == "$8.50" and dollars(1_234_567_891) == "$1,234.57" and dollars(4200) == "$0.0042"
    assert "⚠ limit reached" in budget_bar(spent_micros=0, limit_micros=0, alert_percent=80)  # a $0 limit
    assert "width:100%" in budget_bar(spent_micros=5, limit_micros=1, alert_percent=80)  # the bar stops at full
    assert "⚠" not in budget_bar(spent_micros=79, limit_micros=100, alert_percent=80)
