"""Shared API plumbing: errors as JSON with a clear message, field errors naming the field.

Every error body has the same shape::

    {"error": {"message": "slug: tenant with this slug already exists.",
               "type": "invalid_request", "fields": {"slug": ["…"]}}}

``fields`` is present only for validation errors. Django ValidationErrors raised by services
are turned into the same 400 as serializer errors, so callers see one format.
"""

from __future__ import annotations

import logging
from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from django.db import IntegrityError
from django.db.models import ProtectedError
from rest_framework import exceptions
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler

log = logging.getLogger(__name__)


class Conflict(exceptions.APIException):
    status_code = 409
    default_detail = "The request conflicts with the current state of the resource."
    default_code = "conflict"


_TYPES = {
    400: "invalid_request",
    401: "authentication_error",
    403: "permission_denied",
    404: "not_found",
    405: "method_not_allowed",
    406: "not_acceptable",
    409: "conflict",
    415: "unsupported_media_type",
    429: "rate_limited",
}


def _django_detail(exc: DjangoValidationError) -> dict[str, Any]:
    if hasattr(exc, "error_dict"):
        return {field: messages for field, messages in exc.message_dict.items()}
    return {"non_field_errors": exc.messages}


def _first_message(detail: Any) -> str:
    """The first human message in a (possibly nested) DRF error structure."""
    if isinstance(detail, dict):
        for value in detail.values():
            return _first_message(value)
        return "Invalid input."
    if isinstance(detail, list | tuple):
        return _first_message(detail[0]) if detail else "Invalid input."
    return str(detail)


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, DjangoValidationError):
        exc = exceptions.ValidationError(_django_detail(exc))
    elif isinstance(exc, ProtectedError):
        exc = Conflict("Other records still refer to this one; it cannot be deleted.")
    elif isinstance(exc, IntegrityError):
        # Validation normally catches duplicates first; this is the race between two writers.
        log.warning("integrity error on %s: %s", context.get("request") and context["request"].path, exc)
        exc = Conflict("The change conflicts with existing data (a concurrent duplicate?). Retry.")
    response = drf_exception_handler(exc, context)
    if response is None:
        return None  # an unexpected error: Django's 500 handling (and logging) takes over
    data = response.data
    error_type = _TYPES.get(response.status_code, "error")
    if isinstance(exc, exceptions.ValidationError):
        fields = data if isinstance(data, dict) else {"non_field_errors": data}
        if not fields:
            fields = {"non_field_errors": ["Invalid input."]}
        name = next(iter(fields))
        message = _first_message(fields[name])
        if name not in ("non_field_errors", "detail"):
            message = f"{name}: {message}"
        response.data = {"error": {"message": message, "type": error_type, "fields": fields}}
    else:
        message = data.get("detail", str(exc)) if isinstance(data, dict) else _first_message(data)
        response.data = {"error": {"message": str(message), "type": error_type}}
    return response
