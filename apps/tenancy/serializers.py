"""Management-API shapes for tenants and API keys. Writes go through apps.tenancy.services."""

from __future__ import annotations

from typing import Any

from django.utils import timezone
from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from apps.core.fields import StrictCharField, StrictModelSerializer
from apps.tenancy.models import ApiKey, Scope, SecretStatus, StaffToken, Tenant

_LIMIT_KWARGS: dict[str, Any] = {"required": False, "allow_null": True, "min_value": 1}
# Computed status of keys and staff tokens (named KeyStatusEnum in the OpenAPI schema).
KEY_STATUS_CHOICES = SecretStatus.choices


class TenantSerializer(StrictModelSerializer):
    class Meta:
        model = Tenant
        fields = [
            "id",
            "slug",
            "name",
            "contact_email",
            "status",
            "status_reason",
            "requests_per_minute",
            "tokens_per_minute",
            "max_concurrent_requests",
            "monthly_token_budget",
            "monthly_spend_limit_micros",
            "budget_alert_percent",
            "budget_webhook_url",
            "budget_webhook_secret_rotated_at",
            "created_at",
            "updated_at",
        ]
        # Status changes only through the suspend/reactivate actions, which are logged and
        # invalidate the gateway's caches. The webhook secret only through its rotate action.
        read_only_fields = ["status", "status_reason", "budget_webhook_secret_rotated_at", "created_at", "updated_at"]
        extra_kwargs = {"name": {"required": False, "allow_blank": True}}


class WebhookSecretSerializer(serializers.Serializer):
    """The new signing secret, returned once by the rotate action: it is never shown again."""

    budget_webhook_secret = serializers.CharField(read_only=True)
    budget_webhook_secret_rotated_at = serializers.DateTimeField(read_only=True)


class TenantSuspendSerializer(serializers.Serializer):
    reason = StrictCharField(max_length=500, required=False, allow_blank=True, default="")


class ApiKeySerializer(StrictModelSerializer):
    """A key as anyone may see it again: the prefix identifies it; the secret is gone."""

    tenant: serializers.SlugRelatedField[Any] = serializers.SlugRelatedField(slug_field="slug", read_only=True)
    status = serializers.SerializerMethodField()

    class Meta:
        model = ApiKey
        fields = [
            "id",
            "tenant",
            "name",
            "prefix",
            "status",
            "scopes",
            "allowed_models",
            "requests_per_minute",
            "tokens_per_minute",
            "max_concurrent_requests",
            "monthly_spend_limit_micros",
            "expires_at",
            "revoked_at",
            "last_used_at",
            "created_at",
        ]
        read_only_fields = fields

    @extend_schema_field(serializers.ChoiceField(choices=KEY_STATUS_CHOICES))
    def get_status(self, key: ApiKey) -> str:
        return key.status


class ApiKeyCreatedSerializer(ApiKeySerializer):
    key = StrictCharField(read_only=True, help_text="The raw key. Shown only in this response; store it now.")

    class Meta(ApiKeySerializer.Meta):
        fields = [*ApiKeySerializer.Meta.fields, "key"]
        read_only_fields = fields


class _KeyFieldsMixin(serializers.Serializer):
    name = StrictCharField(max_length=100, required=False, allow_blank=True)
    scopes = serializers.ListField(
        child=serializers.ChoiceField(choices=Scope.choices),
        required=False,
        allow_empty=False,
        help_text=f"Any of: {', '.join(Scope.values)}. Default: inference.",
    )
    allowed_models = serializers.ListField(
        child=StrictCharField(max_length=128),
        required=False,
        help_text="Served model names this key may call; empty means all.",
    )
    requests_per_minute = serializers.IntegerField(**_LIMIT_KWARGS)
    tokens_per_minute = serializers.IntegerField(**_LIMIT_KWARGS)
    max_concurrent_requests = serializers.IntegerField(**_LIMIT_KWARGS)
    expires_at = serializers.DateTimeField(required=False, allow_null=True)

    def validate_expires_at(self, value: Any) -> Any:
        if value is not None and value <= timezone.now():
            raise serializers.ValidationError("Expiry must be in the future.")
        return value


_SPEND_LIMIT_KWARGS: dict[str, Any] = {
    "required": False,
    "allow_null": True,
    "min_value": 0,
    "help_text": "This key's own US$ per calendar month, in millionths (25000000 = $25); null: none.",
}


class ApiKeyCreateSerializer(_KeyFieldsMixin):
    """Staff: any tenant."""

    monthly_spend_limit_micros = serializers.IntegerField(**_SPEND_LIMIT_KWARGS)

    tenant = serializers.SlugRelatedField(slug_field="slug", queryset=Tenant.objects.all())


class CustomerApiKeyCreateSerializer(_KeyFieldsMixin):
    """A customer key creating a key: always for its own tenant."""

    tenant = StrictCharField(required=False, help_text="Optional; if given it must be the calling key's own tenant.")

    def validate_tenant(self, value: str) -> str:
        own = self.context["request"].user.tenant.slug
        if value != own:
            raise serializers.ValidationError("An API key can only create keys for its own tenant.")
        return value


class ApiKeyUpdateSerializer(_KeyFieldsMixin):
    """Staff: change what a key may do. Tenant, prefix and secret never change."""

    monthly_spend_limit_micros = serializers.IntegerField(**_SPEND_LIMIT_KWARGS)


class StaffTokenSerializer(StrictModelSerializer):
    user: serializers.SlugRelatedField[Any] = serializers.SlugRelatedField(slug_field="username", read_only=True)
    status = serializers.SerializerMethodField()

    class Meta:
        model = StaffToken
        fields = ["id", "user", "name", "prefix", "status", "expires_at", "revoked_at", "last_used_at", "created_at"]
        read_only_fields = fields

    @extend_schema_field(serializers.ChoiceField(choices=KEY_STATUS_CHOICES))
    def get_status(self, token: StaffToken) -> str:
        return token.status
