"""Staff usage summary (/api/v1/usage/summary/) and its CSV export: numbers, groups, errors, access."""

from __future__ import annotations

import csv
import io
from datetime import timedelta

import pytest
from django.contrib.auth.models import User
from django.utils import timezone
from rest_framework.test import APIClient

from apps.metering.rollups import floor_hour, rollups_build
from apps.metering.tests.factories import make_usage
from apps.tenancy.services import api_key_issue, staff_token_issue, tenant_create

pytestmark = pytest.mark.django_db


def _client(raw: str) -> APIClient:
    client = APIClient()
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {raw}")
    return client


@pytest.fixture
def staff_api(db) -> APIClient:
    return _client(staff_token_issue(user=User.objects.create_user("ops", is_staff=True))[1])


@pytest.fixture
def usage(tenant, catalog_model):
    """Two tenants' usage three hours ago (rolled up) and a record of this hour (not yet)."""
    hour = floor_hour(timezone.now()) - timedelta(hours=3)
    other = tenant_create(slug="other")
    make_usage(tenant=tenant, model=catalog_model, created_at=hour, cost_micros=1_500_000, latency_ms=100.0)
    make_usage(tenant=tenant, model_name="other-model", created_at=hour + timedelta(minutes=1), status_code=429)
    make_usage(tenant=other, model=catalog_model, created_at=hour + timedelta(minutes=2), cost_micros=3)
    rollups_build(hour=hour)
    make_usage(tenant=tenant, model=catalog_model, created_at=timezone.now() - timedelta(seconds=5), cost_micros=1)
    return hour


def test_staff_summary_for_one_tenant_grouped_by_model(staff_api, usage, catalog_model) -> None:
    start = str(int((usage - timedelta(days=1)).timestamp()))  # Unix seconds are accepted too
    response = staff_api.get("/api/v1/usage/summary/", {"tenant": "acme", "group_by": "model", "start": start})

    assert response.status_code == 200, response.content
    body = response.json()
    assert body["tenant"] == "acme" and body["group_by"] == ["model"]
    rows = {row["model"]: row for row in body["data"]}
    assert set(rows) == {catalog_model.name, "other-model"}
    assert rows[catalog_model.name]["requests"] == 2  # one rolled up, one from this hour's raw records
    assert rows[catalog_model.name]["cost_micros"] == 1_500_001
    assert rows[catalog_model.name]["cost_usd"] == "1.500001"
    assert rows["other-model"]["errors_429"] == 1 and rows["other-model"]["errors"] == 1
    # Latencies 100, 250, 250 ms: p50 is the upper bound of 250's bucket, p99 too.
    assert body["total"]["requests"] == 3
    assert body["total"]["latency_ms"] == {"p50": 251.189, "p95": 251.189, "p99": 251.189}


def test_staff_summary_over_every_tenant_by_tenant_and_day(staff_api, usage) -> None:
    body = staff_api.get("/api/v1/usage/summary/", {"group_by": "tenant,day", "start": usage.date().isoformat()}).json()
    assert sum(row["requests"] for row in body["data"]) == 4
    assert {row["tenant"] for row in body["data"]} == {"acme", "other"}
    assert all(len(row["day"]) == 10 for row in body["data"])


def test_csv_export_has_one_line_per_group(staff_api, usage, catalog_model) -> None:
    for url, params in [
        ("/api/v1/usage/export.csv", {"group_by": "tenant,model"}),
        ("/api/v1/usage/summary/", {"group_by": "tenant,model", "format": "csv"}),
    ]:
        response = staff_api.get(url, {**params, "start": usage.isoformat()})
        assert response.status_code == 200, response.content
        assert response["Content-Type"].startswith("text/csv")
        assert response["Content-Disposition"].startswith('attachment; filename="usage-all-')
        rows = list(csv.DictReader(io.StringIO(response.content.decode())))
        assert [(r["tenant"], r["model"], r["requests"], r["cost_usd"]) for r in rows] == [
            ("acme", catalog_model.name, "2", "1.500001"),
            ("acme", "other-model", "1", "0.000007"),
            ("other", catalog_model.name, "1", "0.000003"),
        ]
        assert rows[0]["latency_ms_p50"] == "100.0"  # the 100 ms record's bucket, 10^(20/10)


@pytest.mark.parametrize(
    ("params", "field", "message"),
    [
        ({"group_by": "node"}, "group_by", "unknown node"),
        ({"start": "yesterday"}, "start", "not an ISO 8601"),
        ({"start": "2026-11-02", "end": "2026-11-01"}, "end", "end must be after start"),
        ({"start": "2020-01-01", "end": "2026-01-01"}, "start", "at most 400 days"),
        ({"group_by": "hour", "start": "2026-01-01", "end": "2026-03-01"}, "group_by", "at most 31 days"),
        ({"tenant": "nobody"}, "tenant", "No tenant"),
        ({"format": "xml"}, "format", "json or csv"),
    ],
)
def test_bad_parameters_are_json_400s_naming_the_field(staff_api, params, field, message) -> None:
    for url in ("/api/v1/usage/summary/", "/api/v1/usage/export.csv"):
        response = staff_api.get(url, params)
        assert response.status_code == 400
        assert response["Content-Type"] == "application/json"
        error = response.json()["error"]
        assert message in " ".join(error["fields"][field])


def test_customers_and_anonymous_callers_are_refused(tenant) -> None:
    raw = api_key_issue(tenant=tenant, name="usage", scopes=["usage:read"])[1]
    assert _client(raw).get("/api/v1/usage/summary/").status_code == 403
    assert APIClient().get("/api/v1/usage/summary/").status_code == 401
    assert APIClient().get("/api/v1/usage/export.csv").status_code == 401


def test_the_summary_is_in_the_openapi_schema(staff_api) -> None:
    schema = staff_api.get("/api/schema/", {"format": "json"}).json()
    summary = schema["paths"]["/api/v1/usage/summary/"]["get"]
    assert {p["name"] for p in summary["parameters"]} >= {"start", "end", "group_by", "tenant"}
    assert {"200", "400", "401", "403"} <= set(summary["responses"])
    assert "text/csv" in schema["paths"]["/api/v1/usage/export.csv"]["get"]["responses"]["200"]["content"]
