"""Management API for usage records (read-only).

Staff see every tenant's records; a customer key with ``usage:read`` sees only its own
tenant's, so another tenant's record is a 404.
"""

from __future__ import annotations

from typing import Any

import django_filters
from django.db.models import QuerySet
from rest_framework import serializers, viewsets

from apps.core.fields import StrictCharField, StrictModelSerializer
from apps.core.filters import StrictFilterSet
from apps.core.input import UTCIsoDateTimeFilter
from apps.core.paginator import EstimatedCountPagination
from apps.metering.models import UsageRecord
from apps.tenancy.models import Scope
from apps.tenancy.permissions import StaffOrCustomerScope, customer


class UsageRecordSerializer(StrictModelSerializer):
    tenant: serializers.SlugRelatedField[Any] = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    api_key_prefix = StrictCharField(source="api_key.prefix", read_only=True, allow_null=True, default=None)
    total_tokens = serializers.IntegerField(read_only=True)

    class Meta:
        model = UsageRecord
        fields = [
            "id",
            "request_id",
            "tenant",
            "api_key",
            "api_key_prefix",
            "model_name",
            "endpoint",
            "prompt_tokens",
            "completion_tokens",
            "total_tokens",
            "estimated",
            "streamed",
            "status_code",
            "ttft_ms",
            "latency_ms",
            "cost_micros",
            "created_at",
        ]
        read_only_fields = fields


class StaffUsageRecordSerializer(UsageRecordSerializer):
    """Staff also see which node served the request; customers never learn about nodes."""

    class Meta(UsageRecordSerializer.Meta):
        fields = [*UsageRecordSerializer.Meta.fields, "model", "node"]
        read_only_fields = fields


class UsageRecordFilterSet(StrictFilterSet):
    tenant = django_filters.CharFilter(field_name="tenant__slug", label="Tenant slug")
    api_key = django_filters.NumberFilter(field_name="api_key_id", label="API key id")
    key_prefix = django_filters.CharFilter(field_name="api_key__prefix", label="API key prefix")
    model = django_filters.CharFilter(field_name="model_name", label="Served model name")
    node = django_filters.NumberFilter(field_name="node_id", label="Node id")
    created_after = UTCIsoDateTimeFilter(field_name="created_at", lookup_expr="gte")
    created_before = UTCIsoDateTimeFilter(field_name="created_at", lookup_expr="lt")
    status_code = django_filters.NumberFilter()

    class Meta:
        model = UsageRecord
        fields = ["tenant", "api_key", "key_prefix", "model", "node", "status_code", "streamed", "estimated"]


class UsageRecordViewSet(viewsets.ReadOnlyModelViewSet):
    """Usage records, newest first. Filter by tenant, key, model, node and a created_at range."""

    permission_classes = [StaffOrCustomerScope]
    pagination_class = EstimatedCountPagination
    customer_scope = Scope.USAGE_READ
    filterset_class = UsageRecordFilterSet
    search_fields = ["=request_id"]
    ordering_fields = ["created_at", "prompt_tokens", "completion_tokens", "latency_ms", "cost_micros"]
    ordering = ["-created_at"]

    def get_queryset(self) -> QuerySet[UsageRecord]:
        queryset = UsageRecord.objects.select_related("tenant", "api_key")
        principal = customer(self.request)
        if principal is not None:
            queryset = queryset.filter(tenant_id=principal.api_key.tenant_id)
        return queryset

    def get_serializer_class(self) -> type[UsageRecordSerializer]:
        if getattr(self, "swagger_fake_view", False) or customer(self.request) is None:
            return StaffUsageRecordSerializer
        return UsageRecordSerializer
