"""OpenAPI schema post-processing: every operation documents the errors it can answer.

drf-spectacular documents only the success responses it can infer, so a client (or schemathesis)
sees a 401, 403, 404 or 409 the schema never mentioned. The errors all share one shape
(apps.core.api.exception_handler), documented once as the ``Error`` component.
"""

from __future__ import annotations

from typing import Any

from rest_framework.permissions import AllowAny
from rest_framework.throttling import BaseThrottle

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "error": {
            "type": "object",
            "properties": {
                "message": {"type": "string"},
                "type": {"type": "string"},
                "fields": {
                    "type": "object",
                    "additionalProperties": {},
                    "description": "Validation errors only: the messages for each field.",
                },
            },
            "required": ["message", "type"],
        }
    },
    "required": ["error"],
}

_DESCRIPTIONS = {
    "400": "Invalid input (a field, a query parameter or the JSON body); `fields` names each problem.",
    "401": "No credentials, or credentials that are unknown, revoked or expired.",
    "403": "The credentials are valid but may not do this (staff only, a missing scope, a suspended tenant).",
    "404": "No such object (or it belongs to another tenant).",
    "409": "The request conflicts with the object's current state.",
    "415": "The body is not JSON (Content-Type: application/json).",
    "429": "Too many attempts; retry later.",
}
_UNSAFE = {"post", "put", "patch", "delete"}
_METHODS = _UNSAFE | {"get", "head", "options", "trace"}


def _views(generator: Any) -> dict[tuple[str, str], Any]:
    """(path, method) → the view class, from the endpoints drf-spectacular walked."""
    views: dict[tuple[str, str], Any] = {}
    for path, _regex, method, callback in getattr(generator, "endpoints", None) or []:
        views[(path, method.lower())] = getattr(callback, "cls", None)
    return views


def _is_open(view: Any) -> bool:
    permissions = getattr(view, "permission_classes", None) or []
    return bool(permissions) and all(issubclass(p, AllowAny) for p in permissions if isinstance(p, type))


def _is_throttled(view: Any) -> bool:
    throttles = getattr(view, "throttle_classes", None) or []
    return any(isinstance(t, type) and issubclass(t, BaseThrottle) for t in throttles)


def error_codes(*, path: str, method: str, operation: dict[str, Any], view: Any) -> list[str]:
    """The error status codes this operation can answer, by what it takes and who may call it."""
    codes: list[str] = []
    takes_query = any(parameter.get("in") == "query" for parameter in operation.get("parameters", []))
    if takes_query or operation.get("requestBody") or method in _UNSAFE:
        codes.append("400")
    # Open views (node registration) check their own token: a bad one is a 401, never a 403.
    codes.append("401")
    if not _is_open(view):
        codes.append("403")
    if "{" in path:
        codes.append("404")
    if method in _UNSAFE:
        codes.append("409")
    if operation.get("requestBody"):
        codes.append("415")
    if _is_throttled(view):
        codes.append("429")
    return codes


def document_error_responses(result: dict[str, Any], generator: Any, **kwargs: Any) -> dict[str, Any]:
    """POSTPROCESSING_HOOKS entry: add the shared Error component and each operation's errors."""
    result.setdefault("components", {}).setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    ref = {"$ref": "#/components/schemas/Error"}
    views = _views(generator)
    for path, item in result.get("paths", {}).items():
        for method, operation in item.items():
            if method not in _METHODS:
                continue
            responses = operation.setdefault("responses", {})
            for code in error_codes(path=path, method=method, operation=operation, view=views.get((path, method))):
                responses.setdefault(
                    code, {"description": _DESCRIPTIONS[code], "content": {"application/json": {"schema": ref}}}
                )
    return result
