"""The management API answers what its OpenAPI schema says (issue #11, finding 5).

Responses are validated against the schema served at /api/schema/, turned from OpenAPI 3.0
(``nullable``) into JSON Schema, so a field the schema calls a string cannot come back null.
"""

from __future__ import annotations

from typing import Any

import jsonschema  # type: ignore[import-untyped]  # no stubs in the pinned set
import pytest
from django.contrib.auth.models import User
from rest_framework.test import APIClient

from apps.core.paginator import MAX_LIMIT
from apps.fleet.services import node_create
from apps.tenancy.services import staff_token_issue

pytestmark = pytest.mark.django_db


@pytest.fixture
def staff() -> APIClient:
    user = User.objects.create_user("ops", password="pw-ops-1", is_staff=True, is_superuser=True)
    client = APIClient(raise_request_exception=False)
    client.credentials(HTTP_AUTHORIZATION=f"Bearer {staff_token_issue(user=user, name='t')[1]}")
    return client


@pytest.fixture
def openapi(staff) -> dict[str, Any]:
    response = staff.get("/api/schema/", HTTP_ACCEPT="application/vnd.oai.openapi+json")
    assert response.status_code == 200, response.content[:300]
    return response.json()


def _json_schema(node: Any) -> Any:
    """OpenAPI 3.0 → JSON Schema 2020-12: ``nullable: true`` means "or null"."""
    if isinstance(node, list):
        return [_json_schema(item) for item in node]
    if not isinstance(node, dict):
        return node
    converted = {key: _json_schema(value) for key, value in node.items() if key != "nullable"}
    if node.get("nullable"):
        return {"anyOf": [converted, {"type": "null"}]}
    return converted


def _validate(openapi: dict[str, Any], component: str, instance: Any) -> None:
    root = {"components": _json_schema(openapi["components"])}
    schema = {**root, "$ref": f"#/components/schemas/{component}"}
    jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker()).validate(instance)


def test_a_new_node_without_profile_endpoint_or_cold_start_matches_the_node_schema(staff, openapi, catalog_model):
    node = node_create(model=catalog_model, launcher="static")
    body = staff.get(f"/api/v1/nodes/{node.pk}/").json()
    assert (body["launch_profile"], body["cold_start_seconds"], body["endpoint_url"]) == (None, None, "")
    _validate(openapi, "Node", body)


def test_the_node_schema_still_refuses_a_wrong_endpoint_or_a_null_status(staff, openapi, catalog_model):
    """The fix allows "" and null where the data has them, not anything anywhere."""
    body = staff.get(f"/api/v1/nodes/{node_create(model=catalog_model, launcher='static').pk}/").json()
    _validate(openapi, "Node", {**body, "endpoint_url": "http://127.0.0.1:8000"})
    for wrong in ({"endpoint_url": 42}, {"endpoint_url": None}, {"status": None}, {"status": ""}):
        with pytest.raises(jsonschema.ValidationError):
            _validate(openapi, "Node", {**body, **wrong})


def test_a_node_event_without_from_status_matches_the_event_schema(staff, openapi, catalog_model):
    node = node_create(model=catalog_model, launcher="static")
    events = staff.get(f"/api/v1/nodes/{node.pk}/events/").json()["results"]
    assert events and events[-1]["from_status"] == ""  # the "requested" event has no previous status
    for event in events:
        _validate(openapi, "NodeEvent", event)


@pytest.mark.parametrize(
    "query",
    ["limit=abc", "limit=-1", "limit=0", f"limit={MAX_LIMIT + 1}", "limit=", "offset=-5", "offset=x", "offset=1e3"],
)
@pytest.mark.parametrize("url", ["/api/v1/nodes/", "/api/v1/usage/", "/api/v1/tenants/"])
def test_a_limit_or_offset_typo_is_a_json_400_naming_the_parameter(staff, url, query):
    response = staff.get(f"{url}?{query}")
    assert response.status_code == 400, (response.status_code, response.content[:200])
    error = response.json()["error"]
    name = query.split("=")[0]
    assert error["message"].startswith(f"{name}: ") and name in error["fields"]


def test_valid_limit_and_offset_still_page(staff, catalog_model):
    nodes = [node_create(model=catalog_model, launcher="static") for _ in range(3)]
    body = staff.get("/api/v1/nodes/?limit=1&offset=1").json()
    assert body["count"] == 3
    assert [n["id"] for n in body["results"]] == [nodes[1].pk]  # newest first
    assert staff.get(f"/api/v1/nodes/?limit={MAX_LIMIT}&offset=0").status_code == 200


def test_limit_and_offset_bounds_are_in_the_schema(openapi):
    parameters = {p["name"]: p["schema"] for p in openapi["paths"]["/api/v1/nodes/"]["get"]["parameters"]}
    assert parameters["limit"] == {"type": "integer", "minimum": 1, "maximum": MAX_LIMIT}
    assert parameters["offset"]["minimum"] == 0


def test_every_operation_documents_its_errors_in_the_one_error_shape(openapi):
    error_ref = {"$ref": "#/components/schemas/Error"}
    for path, item in openapi["paths"].items():
        for method, operation in item.items():
            responses = operation["responses"]
            assert "401" in responses, (method, path)
            if "{" in path:
                assert "404" in responses, (method, path)
            if method in ("post", "put", "patch", "delete"):
                assert {"400", "409"} <= responses.keys(), (method, path)
            for code, response in responses.items():
                if code.startswith("4"):
                    assert response["content"]["application/json"]["schema"] == error_ref, (method, path, code)
    assert "403" in openapi["paths"]["/api/v1/nodes/"]["get"]["responses"]
    registration = openapi["paths"]["/api/v1/nodes/register/"]["post"]["responses"]
    assert "429" in registration and "403" not in registration  # open, throttled, token-checked


def test_documented_errors_have_the_error_shape(staff, openapi):
    for response in (
        staff.get("/api/v1/nodes/999999/"),
        APIClient().get("/api/v1/nodes/"),
        staff.get("/api/v1/nodes/?limit=abc"),
    ):
        _validate(openapi, "Error", response.json())


@pytest.mark.parametrize("path", ["/api/v1/nodes/0.5/drain/", "/api/v1/no-such-thing/", "/api/v1/models/a.b/"])
def test_an_api_url_no_route_matches_is_a_json_404(staff, openapi, path):
    response = staff.post(path)
    assert response.status_code == 404
    assert response["Content-Type"].startswith("application/json")
    _validate(openapi, "Error", response.json())


def test_a_non_api_url_no_route_matches_keeps_the_html_404(staff):
    response = staff.get("/no-such-page/")
    assert response.status_code == 404 and response["Content-Type"].startswith("text/html")


def test_request_bodies_are_documented_as_json_only(openapi):
    for item in openapi["paths"].values():
        for operation in item.values():
            if "requestBody" in operation:
                assert list(operation["requestBody"]["content"]) == ["application/json"]
