"""Staff: usage aggregates over any tenant, as JSON (``/api/v1/usage/summary/``) or CSV
(``?format=csv``, or ``/api/v1/usage/export.csv``). Same numbers as the customers' /v1/usage
(apps.metering.summary.usage_summary): docs/metering.md."""

from __future__ import annotations

import csv
import io
from datetime import timedelta
from typing import Any

from django.http import Http404
from django.utils import timezone
from drf_spectacular.types import OpenApiTypes
from drf_spectacular.utils import OpenApiParameter, OpenApiResponse, extend_schema
from rest_framework import renderers, serializers
from rest_framework.exceptions import ValidationError
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.views import APIView

from apps.metering.summary import COUNTERS, GROUP_BY_CHOICES, parse_group_by, usage_summary, usage_totals_row
from apps.metering.timerange import MAX_HOURLY_ROWS_DAYS, parse_range
from apps.tenancy.models import Tenant
from apps.tenancy.permissions import IsStaff

_DIMENSION_FIELDS = {"hour": "hour", "day": "day", "tenant": "tenant", "key": "api_key_prefix", "model": "model"}
_PERCENTILE_FIELDS = [f"{metric}_{p}" for metric in ("ttft_ms", "latency_ms") for p in ("p50", "p95", "p99")]


class CSVRenderer(renderers.BaseRenderer):
    """The summary's rows as CSV: the grouped dimensions, the counters, cost in dollars, percentiles."""

    media_type = "text/csv"
    format = "csv"
    charset = "utf-8"

    def render(self, data: Any, accepted_media_type: str | None = None, renderer_context: Any = None) -> bytes:
        out = io.StringIO()
        dimensions = [_DIMENSION_FIELDS[d] for d in data["group_by"]]
        columns = [*dimensions, *COUNTERS, "errors", "total_tokens", "cost_usd", *_PERCENTILE_FIELDS]
        writer = csv.DictWriter(out, fieldnames=columns, extrasaction="ignore", lineterminator="\n")
        writer.writeheader()
        for row in data["data"]:
            writer.writerow(_flatten(row))
        return out.getvalue().encode()


def _flatten(row: dict[str, Any]) -> dict[str, Any]:
    flat = dict(row)
    for metric in ("ttft_ms", "latency_ms"):
        for p, value in (row.get(metric) or {}).items():
            flat[f"{metric}_{p}"] = "" if value is None else value
    return flat


class UsageQuerySerializer(serializers.Serializer):
    start = serializers.CharField(required=False, help_text="ISO 8601 date/date-time (UTC if no offset) or Unix s.")
    end = serializers.CharField(required=False, help_text="Exclusive, rounded up to the hour; default: now.")
    group_by = serializers.CharField(
        required=False, default="", help_text=f"Comma-separated, any of: {', '.join(GROUP_BY_CHOICES)}."
    )
    tenant = serializers.SlugField(required=False, help_text="A tenant's slug; default: every tenant.")


class PercentilesSerializer(serializers.Serializer):
    p50 = serializers.FloatField(allow_null=True)
    p95 = serializers.FloatField(allow_null=True)
    p99 = serializers.FloatField(allow_null=True)


class UsageRowSerializer(serializers.Serializer):
    hour = serializers.DateTimeField(required=False, help_text="group_by=hour")
    day = serializers.DateField(required=False, help_text="group_by=day (UTC)")
    tenant = serializers.CharField(required=False, help_text="group_by=tenant")
    api_key_prefix = serializers.CharField(required=False, help_text='group_by=key ("" = a deleted key)')
    model = serializers.CharField(required=False, help_text="group_by=model")
    requests = serializers.IntegerField()
    errors = serializers.IntegerField(help_text="errors_4xx + errors_429 + errors_5xx")  # type: ignore[assignment]
    errors_4xx = serializers.IntegerField(help_text="4xx other than 429 and 499")
    errors_429 = serializers.IntegerField()
    errors_5xx = serializers.IntegerField()
    cancelled = serializers.IntegerField(help_text="499: the client closed the request")
    prompt_tokens = serializers.IntegerField()
    completion_tokens = serializers.IntegerField()
    total_tokens = serializers.IntegerField()
    estimated_requests = serializers.IntegerField()
    estimated_tokens = serializers.IntegerField()
    cost_micros = serializers.IntegerField(help_text="Millionths of a US dollar (exact).")
    cost_usd = serializers.CharField(help_text="The same, as an exact decimal string.")
    ttft_ms = PercentilesSerializer()
    latency_ms = PercentilesSerializer()


class UsageSummarySerializer(serializers.Serializer):
    start = serializers.DateTimeField()
    end = serializers.DateTimeField()
    tenant = serializers.CharField(allow_null=True)
    group_by = serializers.ListField(child=serializers.ChoiceField(choices=GROUP_BY_CHOICES))
    data = UsageRowSerializer(many=True)  # type: ignore[assignment]  # a schema-only serializer
    total = UsageRowSerializer()


_PARAMETERS = [
    OpenApiParameter("start", OpenApiTypes.STR, description="ISO 8601 date/date-time or Unix seconds; default 7 days"),
    OpenApiParameter("end", OpenApiTypes.STR, description="Exclusive, rounded up to the hour; default: now"),
    OpenApiParameter("group_by", OpenApiTypes.STR, description=f"Comma-separated: {', '.join(GROUP_BY_CHOICES)}"),
    OpenApiParameter("tenant", OpenApiTypes.STR, description="Tenant slug; default: every tenant"),
]


class UsageSummaryView(APIView):
    """Usage totals and TTFT/latency percentiles over [start, end), grouped; staff only."""

    permission_classes = [IsStaff]
    renderer_classes = [renderers.JSONRenderer, renderers.BrowsableAPIRenderer, CSVRenderer]

    def perform_content_negotiation(self, request: Request, force: bool = False) -> Any:
        # DRF answers an unknown ?format= with 404; it is a bad parameter, so a 400 naming it.
        try:
            return super().perform_content_negotiation(request, force)
        except Http404:
            raise ValidationError({"format": ["Choose json or csv."]}) from None

    def handle_exception(self, exc: Exception) -> Response:
        # Errors are JSON whatever format was asked for (the CSV renderer only draws rows).
        response = super().handle_exception(exc)
        self.request.accepted_renderer = renderers.JSONRenderer()
        self.request.accepted_media_type = "application/json"
        return response

    @extend_schema(
        parameters=_PARAMETERS,
        responses={
            200: OpenApiResponse(
                UsageSummarySerializer,
                description="Read from hourly rollups; the hours not rolled up yet from raw records. "
                "`?format=csv` (or /api/v1/usage/export.csv) returns the rows as CSV.",
            )
        },
        filters=False,
    )
    def get(self, request: Request, format: str | None = None) -> Response:
        query = UsageQuerySerializer(data=request.query_params)
        query.is_valid(raise_exception=True)
        params = query.validated_data
        try:
            group_by = parse_group_by(params["group_by"])
        except ValueError as exc:
            raise ValidationError({"group_by": [str(exc)]}) from None
        try:
            start, end = parse_range(start=params.get("start"), end=params.get("end"), now=timezone.now())
        except ValueError as exc:
            field = "end" if str(exc).startswith("end") else "start"
            raise ValidationError({field: [str(exc)]}) from None
        if "hour" in group_by and end - start > timedelta(days=MAX_HOURLY_ROWS_DAYS):
            raise ValidationError({"group_by": [f"group_by=hour spans at most {MAX_HOURLY_ROWS_DAYS} days."]})
        tenant = None
        if params.get("tenant"):
            tenant = Tenant.objects.filter(slug=params["tenant"]).first()
            if tenant is None:
                raise ValidationError({"tenant": [f"No tenant {params['tenant']!r}."]})
        rows = usage_summary(tenant=tenant, start=start, end=end, group_by=group_by)
        body = {
            "start": start,
            "end": end,
            "tenant": tenant.slug if tenant else None,
            "group_by": list(group_by),
            "data": [row.as_dict(dimensions=group_by) for row in rows],
            "total": usage_totals_row(rows).as_dict(dimensions=()),
        }
        response = Response(body)
        if getattr(request, "accepted_renderer", None) and request.accepted_renderer.format == "csv":
            name = f"usage-{tenant.slug if tenant else 'all'}-{start:%Y%m%d%H}-{end:%Y%m%d%H}.csv"
            response["Content-Disposition"] = f'attachment; filename="{name}"'
        return response


class UsageExportView(UsageSummaryView):
    """The summary as CSV (the same query parameters); staff only."""

    renderer_classes = [CSVRenderer]

    @extend_schema(
        parameters=_PARAMETERS,
        responses={(200, "text/csv"): OpenApiResponse(OpenApiTypes.STR, description="One line per group.")},
        filters=False,
    )
    def get(self, request: Request, format: str | None = None) -> Response:
        return super().get(request, format)
