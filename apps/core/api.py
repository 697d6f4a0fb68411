"""Shared API plumbing: errors as JSON with a clear message, field errors naming the field."""

from __future__ import annotations

from typing import Any

from django.core.exceptions import ValidationError as DjangoValidationError
from rest_framework import exceptions
from rest_framework.response import Response
from rest_framework.views import exception_handler as drf_exception_handler


def exception_handler(exc: Exception, context: dict[str, Any]) -> Response | None:
    if isinstance(exc, DjangoValidationError):
        detail = exc.message_dict if hasattr(exc, "error_dict") else {"non_field_errors": exc.messages}
        exc = exceptions.ValidationError(detail)
    response = drf_exception_handler(exc, context)
    if response is None:
        return None
    data = response.data
    if isinstance(exc, exceptions.ValidationError):
        fields = data if isinstance(data, dict) else {"non_field_errors": data}
        first = next(iter(fields.items()), ("non_field_errors", ["Invalid input."]))
        message = f"{first[0]}: {first[1][0] if isinstance(first[1], list) else first[1]}"
        response.data = {"error": {"message": message, "type": "invalid_request", "fields": fields}}
    else:
        message = data.get("detail", str(exc)) if isinstance(data, dict) else str(data)
        response.data = {"error": {"message": str(message), "type": getattr(exc, "default_code", "error")}}
    return response
