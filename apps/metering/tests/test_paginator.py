"""Big unfiltered admin lists use the planner's row estimate; filtered lists count exactly."""

from __future__ import annotations

import pytest
from django.db import connection

from apps.core import paginator as paginator_module
from apps.core.paginator import EstimatedCountPaginator, estimated_row_count
from apps.metering.models import UsageRecord
from apps.metering.tests.factories import make_usage

pytestmark = pytest.mark.django_db
needs_postgres = pytest.mark.skipif(
    connection.vendor != "postgresql", reason="PostgreSQL's planner estimate; on SQLite lists count exactly (below)"
)


@pytest.mark.skipif(connection.vendor == "postgresql", reason="the SQLite fallback")
def test_on_sqlite_every_list_counts_exactly(tenant, monkeypatch) -> None:
    for _ in range(4):
        make_usage(tenant=tenant)
    monkeypatch.setattr(paginator_module, "EXACT_COUNT_BELOW", 2)
    assert estimated_row_count(UsageRecord) is None
    assert EstimatedCountPaginator(UsageRecord.objects.all(), 10).count == 4


@needs_postgres
def test_unfiltered_count_comes_from_the_estimate_once_the_table_is_big(tenant, monkeypatch) -> None:
    for _ in range(5):
        make_usage(tenant=tenant)
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {UsageRecord._meta.db_table}")
    make_usage(tenant=tenant, status_code=500)  # after ANALYZE: the estimate does not know this row
    assert estimated_row_count(UsageRecord) == 5

    monkeypatch.setattr(paginator_module, "EXACT_COUNT_BELOW", 3)
    assert EstimatedCountPaginator(UsageRecord.objects.all(), 10).count == 5
    assert EstimatedCountPaginator(UsageRecord.objects.filter(status_code=500), 10).count == 1

    monkeypatch.setattr(paginator_module, "EXACT_COUNT_BELOW", 50_000)
    assert EstimatedCountPaginator(UsageRecord.objects.all(), 10).count == 6


@needs_postgres
def test_usage_api_count_uses_the_estimate_only_when_unfiltered(tenant, monkeypatch) -> None:
    from django.contrib.auth.models import User
    from rest_framework.test import APIClient

    for _ in range(4):
        make_usage(tenant=tenant)
    with connection.cursor() as cursor:
        cursor.execute(f"ANALYZE {UsageRecord._meta.db_table}")
    make_usage(tenant=tenant)
    monkeypatch.setattr(paginator_module, "EXACT_COUNT_BELOW", 2)
    client = APIClient()
    client.force_authenticate(User.objects.create_user("ops", is_staff=True))
    assert client.get("/api/v1/usage/").json()["count"] == 4
    assert client.get("/api/v1/usage/?tenant=acme").json()["count"] == 5
