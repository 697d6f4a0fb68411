"""GET /v1/usage through the real gateway: a usage:read key sees its own tenant's aggregates."""

from __future__ import annotations

from datetime import timedelta

import httpx
import pytest
from django.utils import timezone

from apps.gateway.errors import GatewayError
from apps.gateway.usage_api import parse
from apps.metering.rollups import floor_hour, rollups_build
from apps.metering.tests.factories import make_usage
from apps.tenancy.services import api_key_issue, tenant_create


def _scope(query: str) -> dict:
    return {"query_string": query.encode()}


@pytest.mark.parametrize(
    ("query", "param", "message"),
    [
        ("group_by=node", "group_by", "unknown node"),
        ("group_by=tenant", "group_by", "choose from model, key, day, hour"),
        ("group_by=hour,day", "group_by", "hour and day"),
        ("start=last+week", "start", "not an ISO 8601"),
        ("start=2026-11-02&end=2026-11-01", "end", "end must be after start"),
        ("start=2020-01-01&end=2026-01-01", "start", "at most 400 days"),
        ("group_by=hour&start=2026-01-01&end=2026-03-01", "group_by", "at most 31 days"),
        ("start=1&start=2", "start", "once"),
        ("limit=5", "limit", "Unknown parameter 'limit'"),
        ("start=%ff", "start", "not an ISO 8601"),
    ],
)
def test_bad_parameters_are_openai_shaped_400s(query, param, message) -> None:
    with pytest.raises(GatewayError) as caught:
        parse(_scope(query))
    assert caught.value.status == 400 and caught.value.param == param
    assert message in caught.value.message and caught.value.type == "invalid_request_error"


def test_parameters_are_read_as_whole_utc_hours() -> None:
    start, end, group_by = parse(_scope("start=2026-11-30T10:30:00%2B02:00&end=1796032801&group_by=model&group_by=day"))
    assert (start.isoformat(), end.isoformat(), group_by) == (
        "2026-11-30T08:00:00+00:00",
        "2026-11-30T11:00:00+00:00",
        ("model", "day"),
    )


@pytest.mark.slow
def test_usage_endpoint_returns_own_tenant_totals_only(gateway, tenant, catalog_model) -> None:
    hour = floor_hour(timezone.now()) - timedelta(hours=2)
    reader, raw = api_key_issue(tenant=tenant, name="usage", scopes=["usage:read"])
    make_usage(tenant=tenant, api_key=reader, model=catalog_model, created_at=hour, cost_micros=10)
    make_usage(
        tenant=tenant, api_key=reader, model=catalog_model, created_at=hour + timedelta(minutes=9), cost_micros=5
    )
    other = tenant_create(slug="other")
    make_usage(tenant=other, model=catalog_model, created_at=hour, cost_micros=1000)
    rollups_build(hour=hour)
    make_usage(tenant=tenant, model_name="fresh-model", created_at=timezone.now() - timedelta(seconds=2))  # live hour
    headers = {"Authorization": f"Bearer {raw}"}

    response = httpx.get(f"{gateway.base_url}/usage", params={"group_by": "model"}, headers=headers)

    assert response.status_code == 200, response.text
    body = response.json()
    assert body["object"] == "list" and body["group_by"] == ["model"]
    assert [(row["model"], row["requests"], row["cost_micros"]) for row in body["data"]] == [
        ("fresh-model", 1, 7),
        (catalog_model.name, 2, 15),
    ]
    assert body["total"]["requests"] == 3 and body["total"]["cost_usd"] == "0.000022"
    by_key = httpx.get(f"{gateway.base_url}/usage", params={"group_by": "key"}, headers=headers).json()
    assert {row["api_key_prefix"] for row in by_key["data"]} == {reader.prefix, ""}

    bad = httpx.get(f"{gateway.base_url}/usage", params={"group_by": "node"}, headers=headers)
    assert bad.status_code == 400 and bad.json()["error"]["param"] == "group_by"
    post = httpx.post(f"{gateway.base_url}/usage", headers=headers)
    assert post.status_code == 405 and post.headers["allow"] == "GET"


@pytest.mark.slow
def test_usage_endpoint_needs_the_usage_read_scope(gateway, tenant) -> None:
    raw = api_key_issue(tenant=tenant, name="inference only", scopes=["inference"])[1]
    response = httpx.get(f"{gateway.base_url}/usage", headers={"Authorization": f"Bearer {raw}"})
    assert response.status_code == 403
    assert response.json()["error"] == {
        "message": "This API key lacks the 'usage:read' scope.",
        "type": "permission_error",
        "param": None,
        "code": "insufficient_scope",
    }
    assert httpx.get(f"{gateway.base_url}/usage").status_code == 401
