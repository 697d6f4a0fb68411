"""The usage list reads like a bill: formatted numbers, human headers, and totals for whatever
the list shows (filters, search, date drill-down), from one aggregate query."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.test import Client
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from apps.metering.tests.factories import make_usage
from apps.tenancy.services import tenant_create

pytestmark = pytest.mark.django_db


@pytest.fixture
def admin_client_(db) -> Client:
    client = Client()
    client.force_login(User.objects.create_superuser("root", "root@crosslogic.test", "pw-root-123456"))
    return client


def _totals(body: str) -> dict[str, str]:
    found = {}
    for name in ("requests", "prompt", "completion", "tokens", "cost"):
        marker = f'id="usage-total-{name}">'
        start = body.index(marker) + len(marker)
        found[name] = body[start : body.index("<", start)]
    return found


def test_usage_list_formats_milliseconds_dollars_and_headers(admin_client_, tenant) -> None:
    make_usage(tenant=tenant, ttft_ms=52.401804999988144, latency_ms=1234.56789, cost_micros=1_234_567)

    body = admin_client_.get(reverse("admin:metering_usagerecord_changelist")).content.decode()

    assert "52.4 ms" in body and "1,234.6 ms" in body and "$1.234567" in body
    assert "52.401804999988144" not in body and "1234567" not in body
    for header in ("Time to first token", "Latency", "Cost", "Prompt tokens", "Completion tokens"):
        assert header in body
    for raw_header in ("Ttft ms", "Cost micros", "Latency ms"):
        assert raw_header not in body


def test_usage_record_page_formats_its_numbers_too(admin_client_, tenant) -> None:
    record = make_usage(tenant=tenant, ttft_ms=52.401804999988144, cost_micros=2_500_000, prompt_tokens=12345)

    body = admin_client_.get(reverse("admin:metering_usagerecord_change", args=[record.pk])).content.decode()

    assert "52.4 ms" in body and "$2.50" in body and "12,345" in body
    assert "52.401804999988144" not in body and "2500000" not in body


def test_usage_totals_follow_the_filter_and_cost_one_query(admin_client_, tenant) -> None:
    other = tenant_create(slug="globex")
    make_usage(tenant=tenant, prompt_tokens=1000, completion_tokens=500, cost_micros=1_500_000)
    make_usage(tenant=tenant, prompt_tokens=10, completion_tokens=5, cost_micros=15, status_code=500)
    make_usage(tenant=other, prompt_tokens=7, completion_tokens=3, cost_micros=1)
    url = reverse("admin:metering_usagerecord_changelist")

    everything = _totals(admin_client_.get(url).content.decode())
    assert everything == {
        "requests": "3",
        "prompt": "1,017",
        "completion": "508",
        "tokens": "1,525",
        "cost": "$1.500016",
    }
    errors = _totals(admin_client_.get(url, {"status_class": "5xx"}).content.decode())
    assert errors == {"requests": "1", "prompt": "10", "completion": "5", "tokens": "15", "cost": "$0.000015"}
    searched = _totals(admin_client_.get(url, {"q": "globex"}).content.decode())
    assert searched["requests"] == "1" and searched["cost"] == "$0.000001"

    with CaptureQueriesContext(connection) as queries:
        admin_client_.get(url, {"status_class": "2xx"})
    aggregates = [q["sql"] for q in queries.captured_queries if 'SUM("metering_usagerecord"."cost_micros")' in q["sql"]]
    assert len(aggregates) == 1


def test_usage_totals_follow_the_date_drill_down(admin_client_, tenant) -> None:
    make_usage(tenant=tenant, created_at=datetime(2025, 3, 9, 12, tzinfo=UTC), cost_micros=10)
    make_usage(tenant=tenant, created_at=datetime(2025, 4, 9, 12, tzinfo=UTC), cost_micros=20)

    march = admin_client_.get(
        reverse("admin:metering_usagerecord_changelist"), {"created_at__year": "2025", "created_at__month": "3"}
    )

    assert _totals(march.content.decode())["requests"] == "1"
    assert _totals(march.content.decode())["cost"] == "$0.00001"


def test_an_empty_filter_totals_zero(admin_client_, tenant) -> None:
    body = admin_client_.get(reverse("admin:metering_usagerecord_changelist"), {"status_class": "4xx"})
    assert body.status_code == 200
    assert _totals(body.content.decode()) == {
        "requests": "0",
        "prompt": "0",
        "completion": "0",
        "tokens": "0",
        "cost": "$0.00",
    }


def test_a_nonsense_date_drill_down_is_not_a_500(admin_client_, tenant) -> None:
    make_usage(tenant=tenant)
    url = reverse("admin:metering_usagerecord_changelist")
    for query in ({"created_at__year": "0"}, {"created_at__year": "2025", "created_at__month": "13"}):
        assert admin_client_.get(url, query).status_code in {200, 302}
