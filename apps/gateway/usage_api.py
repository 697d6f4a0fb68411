"""GET /v1/usage: a tenant's own usage, aggregated, for keys with the ``usage:read`` scope.

    GET /v1/usage?start=2026-11-01&end=2026-12-01&group_by=model
    GET /v1/usage?start=1796083200&group_by=day,model

``start``/``end``: ISO 8601 dates or date-times (UTC when no offset) or Unix seconds; the range is
whole UTC hours (start floored, end rounded up); default: the last 7 days up to the end of the
current hour; at most 400 days (31 with group_by=hour). ``group_by``: any of model, key, day,
hour (comma-separated or repeated; hour and day exclude each other); none = one row of totals.

The numbers come from apps.metering.summary.usage_summary (hourly rollups; the hours not rolled
up yet from raw records): docs/metering.md. Read in a worker thread with its own connection, as
the usage writer does; nothing here runs per inference request.
"""

from __future__ import annotations

import json
from datetime import timedelta
from typing import Any
from urllib.parse import parse_qs

from asgiref.sync import sync_to_async
from django.db import close_old_connections, connection
from django.utils import timezone

from apps.gateway.auth import KeyEntry
from apps.gateway.errors import GatewayError, bad_request
from apps.metering.summary import parse_group_by, usage_summary, usage_totals_row
from apps.metering.timerange import MAX_HOURLY_ROWS_DAYS, parse_range
from apps.tenancy.models import Scope

PARAMS = ("start", "end", "group_by")
CUSTOMER_DIMENSIONS = ("model", "key", "day", "hour")


def _query(scope: dict) -> dict[str, str]:
    try:
        raw = scope.get("query_string", b"").decode("utf-8")
        parsed = parse_qs(raw, keep_blank_values=True, strict_parsing=False, max_num_fields=20)
    except (UnicodeDecodeError, ValueError):
        raise bad_request("The query string is not valid UTF-8 form encoding.", code="invalid_query") from None
    unknown = sorted(set(parsed) - set(PARAMS))
    if unknown:
        raise bad_request(
            f"Unknown parameter {unknown[0]!r}; this endpoint takes {', '.join(PARAMS)}.",
            param=unknown[0][:64],
            code="unknown_parameter",
        )
    values: dict[str, str] = {}
    for name, items in parsed.items():
        if name != "group_by" and len(items) > 1:
            raise bad_request(f"Give {name} once.", param=name, code="invalid_value")
        values[name] = ",".join(items) if name == "group_by" else items[0]
    return values


def parse(scope: dict) -> tuple[Any, Any, tuple[str, ...]]:
    values = _query(scope)
    try:
        group_by = parse_group_by(values.get("group_by"))
    except ValueError as exc:
        raise bad_request(str(exc), param="group_by", code="invalid_value") from None
    if "tenant" in group_by:
        raise bad_request("group_by: choose from model, key, day, hour", param="group_by", code="invalid_value")
    try:
        start, end = parse_range(start=values.get("start"), end=values.get("end"), now=timezone.now())
    except ValueError as exc:
        param = "end" if str(exc).startswith("end") else "start"
        raise bad_request(str(exc), param=param, code="invalid_value") from None
    if "hour" in group_by and end - start > timedelta(days=MAX_HOURLY_ROWS_DAYS):
        raise bad_request(
            f"group_by=hour spans at most {MAX_HOURLY_ROWS_DAYS} days; use day for longer ranges.",
            param="group_by",
            code="invalid_value",
        )
    return start, end, group_by


def _read(tenant_id: int, start: Any, end: Any, group_by: tuple[str, ...]) -> bytes:
    close_old_connections()
    try:
        rows = usage_summary(tenant=tenant_id, start=start, end=end, group_by=group_by)
    finally:
        connection.close()
    body = {
        "object": "list",
        "start": start.isoformat().replace("+00:00", "Z"),
        "end": end.isoformat().replace("+00:00", "Z"),
        "group_by": list(group_by),
        "data": [row.as_dict(dimensions=group_by) for row in rows],
        "total": usage_totals_row(rows).as_dict(dimensions=()),
    }
    return json.dumps(body).encode()


_aread = sync_to_async(_read, thread_sensitive=False)


async def usage_body(scope: dict, entry: KeyEntry) -> bytes:
    if Scope.USAGE_READ not in entry.scopes:
        raise GatewayError(
            403, "This API key lacks the 'usage:read' scope.", type="permission_error", code="insufficient_scope"
        )
    start, end, group_by = parse(scope)
    return await _aread(entry.tenant_id, start, end, group_by)
