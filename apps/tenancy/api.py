"""Management API for tenants, API keys and staff tokens.

Tenants and staff tokens are staff-only. API keys are staff-managed, and a customer key with
``keys:manage`` may list, create and revoke its own tenant's keys: its queryset is confined to
its tenant, so another tenant's key is a 404, never a 403.
"""

from __future__ import annotations

from typing import Any

import django_filters
from django.contrib.auth.models import User
from django.core.exceptions import ValidationError
from django.db.models import QuerySet
from drf_spectacular.utils import extend_schema
from rest_framework import mixins, serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.serializers import BaseSerializer

from apps.core.api import Conflict
from apps.core.fields import StrictCharField
from apps.core.filters import StrictFilterSet
from apps.core.input import UTCIsoDateTimeFilter
from apps.tenancy import services
from apps.tenancy.models import ApiKey, Scope, SecretQuerySet, StaffToken, Tenant, TenantStatus
from apps.tenancy.permissions import IsStaff, StaffOrCustomerScope, customer
from apps.tenancy.selectors import with_scope
from apps.tenancy.serializers import (
    KEY_STATUS_CHOICES,
    ApiKeyCreatedSerializer,
    ApiKeyCreateSerializer,
    ApiKeySerializer,
    ApiKeyUpdateSerializer,
    CustomerApiKeyCreateSerializer,
    StaffTokenSerializer,
    TenantSerializer,
    TenantSuspendSerializer,
    WebhookSecretSerializer,
)


def _filter_key_status(queryset: SecretQuerySet, name: str, value: str) -> QuerySet:
    return queryset.with_status(value) if value else queryset


# --- Tenants --------------------------------------------------------------------------------


class TenantFilterSet(StrictFilterSet):
    status = django_filters.ChoiceFilter(choices=TenantStatus.choices)
    slug = django_filters.CharFilter()
    name = django_filters.CharFilter(lookup_expr="icontains")

    class Meta:
        model = Tenant
        fields = ["status", "slug", "name"]


class TenantViewSet(viewsets.ModelViewSet):
    queryset = Tenant.objects.all()
    serializer_class = TenantSerializer
    permission_classes = [IsStaff]
    filterset_class = TenantFilterSet
    lookup_field = "slug"
    search_fields = ["slug", "name", "contact_email"]
    ordering_fields = ["slug", "name", "created_at", "status"]
    ordering = ["slug"]

    def perform_create(self, serializer: BaseSerializer[Tenant]) -> None:
        serializer.instance = services.tenant_create(**serializer.validated_data)

    def perform_update(self, serializer: BaseSerializer[Tenant]) -> None:
        assert serializer.instance is not None  # an update has the object it updates
        serializer.instance = services.tenant_update(tenant=serializer.instance, **serializer.validated_data)

    def perform_destroy(self, instance: Tenant) -> None:
        try:
            services.tenant_delete(tenant=instance)
        except ValidationError as exc:
            raise Conflict(exc.messages[0]) from exc

    @extend_schema(request=TenantSuspendSerializer, responses=TenantSerializer)
    @action(detail=True, methods=["post"])
    def suspend(self, request: Request, slug: str | None = None) -> Response:
        """Suspend the tenant: its keys stop working at once."""
        data = TenantSuspendSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        tenant = services.tenant_suspend(tenant=self.get_object(), reason=data.validated_data["reason"])
        return Response(TenantSerializer(tenant).data)

    @extend_schema(request=None, responses=TenantSerializer)
    @action(detail=True, methods=["post"])
    def reactivate(self, request: Request, slug: str | None = None) -> Response:
        tenant = services.tenant_reactivate(tenant=self.get_object())
        return Response(TenantSerializer(tenant).data)

    @extend_schema(request=None, responses=WebhookSecretSerializer)
    @action(detail=True, methods=["post"], url_path="rotate-webhook-secret")
    def rotate_webhook_secret(self, request: Request, slug: str | None = None) -> Response:
        """A new signing secret for the tenant's budget webhooks; the previous one stops at once.
        The secret is in this answer only: store it where the receiver verifies signatures."""
        tenant = self.get_object()
        raw = services.tenant_webhook_secret_rotate(tenant=tenant)
        data = {
            "budget_webhook_secret": raw,
            "budget_webhook_secret_rotated_at": tenant.budget_webhook_secret_rotated_at,
        }
        return Response(WebhookSecretSerializer(data).data, headers={"Cache-Control": "no-store"})


# --- API keys -------------------------------------------------------------------------------


class ApiKeyFilterSet(StrictFilterSet):
    tenant = django_filters.CharFilter(field_name="tenant__slug", label="Tenant slug")
    prefix = django_filters.CharFilter()
    name = django_filters.CharFilter(lookup_expr="icontains")
    scope = django_filters.ChoiceFilter(choices=Scope.choices, method="filter_scope", label="Holds this scope")
    status = django_filters.ChoiceFilter(choices=KEY_STATUS_CHOICES, method=_filter_key_status)
    created_after = UTCIsoDateTimeFilter(field_name="created_at", lookup_expr="gte")
    created_before = UTCIsoDateTimeFilter(field_name="created_at", lookup_expr="lt")

    class Meta:
        model = ApiKey
        fields = ["tenant", "prefix", "name", "scope", "status"]

    def filter_scope(self, queryset: QuerySet, name: str, value: str) -> QuerySet:
        return with_scope(queryset, value)


@extend_schema(description="Staff: every tenant's keys. A customer key with `keys:manage`: its own tenant's keys.")
class ApiKeyViewSet(
    mixins.ListModelMixin,
    mixins.RetrieveModelMixin,
    mixins.CreateModelMixin,
    mixins.UpdateModelMixin,
    viewsets.GenericViewSet,
):
    serializer_class = ApiKeySerializer
    permission_classes = [StaffOrCustomerScope]
    customer_scope = Scope.KEYS_MANAGE
    customer_actions = {"list", "retrieve", "create", "revoke"}
    filterset_class = ApiKeyFilterSet
    search_fields = ["prefix", "name", "tenant__slug"]
    ordering_fields = ["created_at", "name", "last_used_at", "expires_at"]
    ordering = ["-created_at"]

    def get_queryset(self) -> QuerySet[ApiKey]:
        queryset = ApiKey.objects.select_related("tenant")
        principal = customer(self.request)
        if principal is not None:
            queryset = queryset.filter(tenant_id=principal.api_key.tenant_id)
        return queryset

    def get_serializer_class(self) -> type[serializers.BaseSerializer]:
        if self.action == "create":
            return CustomerApiKeyCreateSerializer if customer(self.request) else ApiKeyCreateSerializer
        if self.action in ("update", "partial_update"):
            return ApiKeyUpdateSerializer
        return ApiKeySerializer

    @extend_schema(request=ApiKeyCreateSerializer, responses={201: ApiKeyCreatedSerializer})
    def create(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        """Issue a key. The response holds the raw key as `key`, the only time it is ever shown."""
        data = self.get_serializer(data=request.data)
        data.is_valid(raise_exception=True)
        params = dict(data.validated_data)
        principal = customer(request)
        if principal is not None:
            params.pop("tenant", None)
            key, raw = services.api_key_issue_delegated(issuer=principal.api_key, **params)
        else:
            key, raw = services.api_key_issue(**params)
        body = ApiKeyCreatedSerializer(key).data
        body["key"] = raw
        return Response(body, status=status.HTTP_201_CREATED)

    @extend_schema(request=ApiKeyUpdateSerializer, responses=ApiKeySerializer)
    def update(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        """Staff only: change a key's name, scopes, models, limits or expiry."""
        key = self.get_object()
        data = ApiKeyUpdateSerializer(data=request.data, partial=kwargs.get("partial", False))
        data.is_valid(raise_exception=True)
        key = services.api_key_update(key=key, **data.validated_data)
        return Response(ApiKeySerializer(key).data)

    @extend_schema(request=ApiKeyUpdateSerializer, responses=ApiKeySerializer)
    def partial_update(self, request: Request, *args: Any, **kwargs: Any) -> Response:
        return self.update(request, *args, partial=True, **kwargs)

    @extend_schema(request=None, responses=ApiKeySerializer)
    @action(detail=True, methods=["post"])
    def revoke(self, request: Request, pk: str | None = None) -> Response:
        """Revoke the key; the gateway refuses it within a second. Revoking twice is harmless."""
        key = services.api_key_revoke(key=self.get_object())
        return Response(ApiKeySerializer(key).data)


# --- Staff tokens ---------------------------------------------------------------------------


class StaffTokenCreateSerializer(serializers.Serializer):
    name = StrictCharField(max_length=100, required=False, allow_blank=True, default="")
    expires_at = serializers.DateTimeField(required=False, allow_null=True, default=None)


class StaffTokenCreatedSerializer(StaffTokenSerializer):
    key = StrictCharField(read_only=True, help_text="The raw token. Shown only in this response.")

    class Meta(StaffTokenSerializer.Meta):
        fields = [*StaffTokenSerializer.Meta.fields, "key"]
        read_only_fields = fields


@extend_schema(description="Staff tokens: your own (a superuser sees everyone's).")
class StaffTokenViewSet(mixins.ListModelMixin, mixins.RetrieveModelMixin, viewsets.GenericViewSet):
    serializer_class = StaffTokenSerializer
    permission_classes = [IsStaff]
    filterset_fields = ["name", "prefix"]
    ordering_fields = ["created_at", "last_used_at"]
    ordering = ["-created_at"]

    def get_queryset(self) -> QuerySet[StaffToken]:
        queryset = StaffToken.objects.select_related("user")
        if getattr(self, "swagger_fake_view", False) or self.request.user.is_superuser:
            return queryset
        return queryset.filter(user=self.request.user)  # type: ignore[misc]  # staff only: never AnonymousUser

    @extend_schema(request=StaffTokenCreateSerializer, responses={201: StaffTokenCreatedSerializer})
    def create(self, request: Request) -> Response:
        """Issue a token for yourself. The response holds the raw token as `key`, once."""
        data = StaffTokenCreateSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        assert isinstance(request.user, User)  # IsStaff let only a signed-in staff user through
        token, raw = services.staff_token_issue(user=request.user, **data.validated_data)
        body = StaffTokenCreatedSerializer(token).data
        body["key"] = raw
        return Response(body, status=status.HTTP_201_CREATED)

    @extend_schema(request=None, responses=StaffTokenSerializer)
    @action(detail=True, methods=["post"])
    def revoke(self, request: Request, pk: str | None = None) -> Response:
        token = services.staff_token_revoke(token=self.get_object())
        return Response(StaffTokenSerializer(token).data)
