"""Input the database cannot hold, refused with a 400 before it reaches a query.

PostgreSQL refuses a NUL character in any text value ("A string literal cannot contain NUL")
and a time-zone offset beyond ±15:59; Python's json module raises RecursionError on deeply
nested documents. Each used to surface as a 500.
"""

from __future__ import annotations

import datetime as dt
from collections.abc import Callable
from typing import Any

import django_filters
from django.http import HttpRequest, HttpResponse, JsonResponse
from rest_framework.exceptions import ParseError
from rest_framework.parsers import JSONParser

NUL = "\x00"


def find_nul(data: Any) -> bool:
    """True if any string (key or value) in a parsed JSON document holds a NUL. Iterative: a
    document json accepted may still be nested deeper than Python's recursion limit allows."""
    stack = [data]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            if NUL in item:
                return True
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
    return False


class SafeJSONParser(JSONParser):
    """DRF's JSON parser, refusing documents nested too deeply to parse and strings with NUL."""

    def parse(self, stream: Any, media_type: str | None = None, parser_context: Any = None) -> Any:
        try:
            data = super().parse(stream, media_type, parser_context)
        except RecursionError as exc:
            raise ParseError("JSON parse error - the document is nested too deeply.") from exc
        if find_nul(data):
            raise ParseError("JSON parse error - strings may not contain the NUL character (\\u0000).")
        return data


class UTCIsoDateTimeFilter(django_filters.IsoDateTimeFilter):
    """An ISO 8601 date-time filter that queries in UTC: an offset PostgreSQL cannot store
    (beyond ±15:59, which Python accepts up to ±23:59) still names a valid instant."""

    def filter(self, qs: Any, value: dt.datetime | None) -> Any:
        if value is not None and value.tzinfo is not None:
            value = value.astimezone(dt.UTC)
        return super().filter(qs, value)


class RejectNulMiddleware:
    """A NUL in the path or a query parameter: 400 with a JSON error, before any view runs."""

    def __init__(self, get_response: Callable[[HttpRequest], HttpResponse]) -> None:
        self.get_response = get_response

    def __call__(self, request: HttpRequest) -> HttpResponse:
        if NUL in request.path or any(
            NUL in key or any(NUL in v for v in values) for key, values in request.GET.lists()
        ):
            return JsonResponse(
                {"error": {"message": "The URL may not contain the NUL character (%00).", "type": "invalid_request"}},
                status=400,
            )
        return self.get_response(request)
