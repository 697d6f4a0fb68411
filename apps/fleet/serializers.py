"""Management API shapes for nodes. Registration digests and node API keys are never exposed."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from drf_spectacular.utils import extend_schema_field
from rest_framework import serializers

from apps.catalog.models import ServedModel
from apps.fleet.models import Launcher, LaunchProfile, Node, NodeEvent, NodeStatus


@extend_schema_field({"anyOf": [{"type": "string", "format": "uri"}, {"type": "string", "enum": [""]}]})
class BlankOrUrlField(serializers.CharField):
    """A read-only URLField that may be blank: a node has no endpoint until it registers, and
    ModelSerializer drops ``allow_blank`` from read-only fields, so the schema said "uri" only."""


class NodeSerializer(serializers.ModelSerializer):
    model: serializers.SlugRelatedField[Any] = serializers.SlugRelatedField(slug_field="name", read_only=True)
    # Most nodes have no launch profile, and cold start is unknown until the node is ready.
    launch_profile: serializers.SlugRelatedField[Any] = serializers.SlugRelatedField(
        slug_field="name", read_only=True, allow_null=True
    )
    cold_start_seconds = serializers.FloatField(read_only=True, allow_null=True)
    warm_start_seconds = serializers.FloatField(read_only=True, allow_null=True)
    endpoint_url = BlankOrUrlField(read_only=True)

    class Meta:
        model = Node
        fields = [
            "id",
            "cluster_name",
            "model",
            "launcher",
            "cloud",
            "region",
            "accelerator",
            "use_spot",
            "launch_profile",
            "hourly_cost",
            "endpoint_url",
            "status",
            "status_reason",
            "status_changed_at",
            "registered_at",
            "requested_at",
            "provisioned_at",
            "weights_loaded_at",
            "ready_at",
            "terminated_at",
            "cold_start_seconds",
            "stopped_at",
            "stopped_hourly_cost",
            "restart_requested_at",
            "warm_starts",
            "warm_start_seconds",
            "last_health_at",
            "consecutive_failures",
            "health_latency_ms",
            "requests_running",
            "requests_waiting",
            "kv_cache_usage",
            "updated_at",
        ]
        read_only_fields = fields


class NodeLaunchSerializer(serializers.Serializer):
    model = serializers.SlugRelatedField(slug_field="name", queryset=ServedModel.objects.all())
    launcher = serializers.ChoiceField(choices=Launcher.choices, required=False, allow_blank=True, default="")
    cloud = serializers.CharField(max_length=32, required=False, allow_blank=True, default="")
    region = serializers.CharField(max_length=64, required=False, allow_blank=True, default="")
    accelerator = serializers.CharField(max_length=32, required=False, allow_blank=True, default="")
    use_spot = serializers.BooleanField(required=False, default=True)
    launch_profile = serializers.SlugRelatedField(
        slug_field="name",
        queryset=LaunchProfile.objects.filter(is_active=True),
        required=False,
        allow_null=True,
        default=None,
    )
    endpoint_url = serializers.URLField(
        max_length=300,
        required=False,
        allow_blank=True,
        default="",
        help_text="Static launcher only: the running vLLM server.",
    )


class NodeEventSerializer(serializers.ModelSerializer):
    # Declared so the schema keeps "" (an action or info event has no transition): ModelSerializer
    # drops allow_blank from read-only fields.
    from_status = serializers.ChoiceField(choices=NodeStatus.choices, allow_blank=True, read_only=True)
    to_status = serializers.ChoiceField(choices=NodeStatus.choices, allow_blank=True, read_only=True)

    class Meta:
        model = NodeEvent
        fields = ["id", "created_at", "kind", "from_status", "to_status", "message", "actor"]
        read_only_fields = fields


@extend_schema_field({"oneOf": [{"type": "string", "format": "date-time"}, {"type": "number"}]})
class FlexibleTimestamp(serializers.Field):
    """ISO 8601 or Unix seconds: a shell script on the node sends ``$(date +%s)``."""

    default_error_messages = {"invalid": "Use an ISO 8601 datetime or Unix seconds."}

    def to_internal_value(self, data: object) -> datetime:
        if isinstance(data, bool):
            self.fail("invalid")
        if isinstance(data, int | float):
            try:
                return datetime.fromtimestamp(float(data), UTC)
            except (OverflowError, OSError, ValueError):
                self.fail("invalid")
        if not isinstance(data, str | datetime):
            self.fail("invalid")
        return serializers.DateTimeField().to_internal_value(data)

    def to_representation(self, value: datetime) -> str:
        return value.isoformat()


class RegistrationSerializer(serializers.Serializer):
    token = serializers.CharField(
        required=False, allow_blank=True, default="", help_text="Or send it as 'Authorization: Bearer clr_…'."
    )
    endpoint_url = serializers.URLField(max_length=300, required=False, allow_blank=True, default="")
    provisioned_at = FlexibleTimestamp(required=False, allow_null=True, default=None)
    weights_loaded_at = FlexibleTimestamp(required=False, allow_null=True, default=None)
    health_ok = serializers.BooleanField(required=False, default=False)
