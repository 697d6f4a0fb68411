"""Management API for the model catalog (staff only): CRUD plus upload, cancel-upload and verify.

Customer keys get a 403: the catalog's storage, prices and serving config are operator business
(customers see models through ``GET /v1/models`` on the gateway).
"""

from __future__ import annotations

from typing import Any

import django_filters
from django.core.exceptions import ValidationError
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import APIException
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.serializers import BaseSerializer

from apps.catalog import services, storage, uploads
from apps.catalog.models import Model, UploadStatus
from apps.catalog.verify import verify_model
from apps.core.permissions import IsStaff


class Conflict(APIException):
    status_code = status.HTTP_409_CONFLICT
    default_detail = "The request conflicts with the current state of the model."
    default_code = "conflict"


class StorageUnavailable(APIException):
    status_code = status.HTTP_502_BAD_GATEWAY
    default_detail = "The object store failed."
    default_code = "storage_error"


class ModelSerializer(serializers.ModelSerializer):
    upload_progress = serializers.FloatField(read_only=True)

    class Meta:
        model = Model
        fields = [
            "id", "name", "is_active", "hf_repo", "hf_revision", "storage_uri",
            "accelerator", "dtype", "max_model_len", "context_length", "tensor_parallel_size",
            "gpu_memory_utilization", "extra_vllm_args", "price_input_per_mtok", "price_output_per_mtok",
            "min_replicas", "max_replicas",
            "total_bytes", "manifest", "upload_status", "upload_error", "upload_progress", "upload_bytes_done",
            "upload_bytes_total", "upload_rate_bps", "upload_current_file", "upload_started_at",
            "upload_finished_at", "upload_cancel_requested", "upload_source", "verify_status", "verified_at",
            "verify_report", "created_at", "updated_at",
        ]
        read_only_fields = [
            "total_bytes", "manifest", "upload_status", "upload_error", "upload_bytes_done", "upload_bytes_total",
            "upload_rate_bps", "upload_current_file", "upload_started_at", "upload_finished_at",
            "upload_cancel_requested", "upload_source", "verify_status", "verified_at", "verify_report",
            "created_at", "updated_at",
        ]

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        lo = attrs.get("min_replicas", getattr(self.instance, "min_replicas", 0))
        hi = attrs.get("max_replicas", getattr(self.instance, "max_replicas", 1))
        if hi < lo:
            raise serializers.ValidationError({"max_replicas": "Must be at least min_replicas."})
        return attrs


class UploadInputSerializer(serializers.Serializer):
    hf_repo = serializers.CharField(required=False, allow_blank=True, default="",
                                    help_text="Hugging Face repo id, optionally with @revision.")
    revision = serializers.CharField(required=False, allow_blank=True, default="")
    local_dir = serializers.CharField(required=False, allow_blank=True, default="",
                                      help_text="An absolute folder path on the worker machine.")
    prefix = serializers.CharField(required=False, allow_blank=True, default="",
                                   help_text="Object prefix; default models/<org>--<name>/<revision>.")
    keep_downloads = serializers.BooleanField(required=False, default=False)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if bool(attrs["hf_repo"]) == bool(attrs["local_dir"]):
            raise serializers.ValidationError({"hf_repo": "Give either hf_repo or local_dir (exactly one)."})
        return attrs


class VerifyInputSerializer(serializers.Serializer):
    full = serializers.BooleanField(required=False, default=False,
                                    help_text="Stream every object and recompute its sha256 (slow for big models).")


class VerifyReportSerializer(serializers.Serializer):
    uri = serializers.CharField()
    ok = serializers.BooleanField()
    checked = serializers.IntegerField()
    full = serializers.BooleanField()
    problems = serializers.ListField(child=serializers.CharField())
    summary = serializers.CharField()


class ModelFilterSet(django_filters.FilterSet):
    name = django_filters.CharFilter(lookup_expr="icontains")
    is_active = django_filters.BooleanFilter()
    active = django_filters.BooleanFilter(field_name="is_active")
    upload_status = django_filters.ChoiceFilter(choices=UploadStatus.choices)

    class Meta:
        model = Model
        fields = ["name", "is_active", "upload_status"]


def _upload_error_to_api(exc: uploads.UploadError) -> APIException:
    message = str(exc)
    for field in ("hf_repo", "revision", "local_dir", "prefix"):
        if message.startswith(f"{field}:"):
            return serializers.ValidationError({field: message.split(":", 1)[1].strip()})
    if "already" in message:
        return Conflict(message)
    return serializers.ValidationError({"non_field_errors": message})


class ModelViewSet(viewsets.ModelViewSet):
    queryset = Model.objects.all()
    serializer_class = ModelSerializer
    permission_classes = [IsStaff]
    filterset_class = ModelFilterSet
    search_fields = ["name", "hf_repo", "storage_uri"]
    ordering_fields = ["name", "created_at", "upload_status", "total_bytes"]
    ordering = ["name"]

    def perform_create(self, serializer: BaseSerializer[Model]) -> None:
        serializer.instance = services.model_create(**serializer.validated_data)

    def perform_update(self, serializer: BaseSerializer[Model]) -> None:
        assert serializer.instance is not None  # an update has the object it updates
        serializer.instance = services.model_update(model=serializer.instance, **serializer.validated_data)

    def perform_destroy(self, instance: Model) -> None:
        try:
            services.model_delete(model=instance)
        except ValidationError as exc:
            raise Conflict(exc.messages[0]) from exc

    @extend_schema(request=UploadInputSerializer, responses={202: ModelSerializer})
    @action(detail=True, methods=["post"])
    def upload(self, request: Request, pk: str | None = None) -> Response:
        """Queue an upload of the weights to R2 from a Hugging Face repo or a folder on the worker."""
        data = UploadInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        try:
            model = uploads.upload_request(model=self.get_object(), **data.validated_data)
        except uploads.UploadError as exc:
            raise _upload_error_to_api(exc) from exc
        return Response(ModelSerializer(model).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=None, responses=ModelSerializer)
    @action(detail=True, methods=["post"], url_path="cancel-upload")
    def cancel_upload(self, request: Request, pk: str | None = None) -> Response:
        """Cancel a queued upload, or ask a running one to stop (it stops between parts)."""
        try:
            model = uploads.upload_cancel(model=self.get_object())
        except uploads.UploadError as exc:
            raise Conflict(str(exc)) from exc
        return Response(ModelSerializer(model).data)

    @extend_schema(request=VerifyInputSerializer, responses=VerifyReportSerializer)
    @action(detail=True, methods=["post"])
    def verify(self, request: Request, pk: str | None = None) -> Response:
        """Check every object against the manifest; ``full`` re-hashes the bytes. Runs in the request."""
        data = VerifyInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        model = self.get_object()
        if not model.storage_uri:
            raise Conflict(f"{model.name} has no storage URI: upload its weights first.")
        try:
            report = verify_model(model=model, full=data.validated_data["full"])
        except storage.StorageError as exc:
            raise StorageUnavailable(str(exc)) from exc
        body = {"uri": report.uri, "ok": report.ok, "checked": report.checked, "full": report.full,
                "problems": report.problems, "summary": report.summary()}
        return Response(VerifyReportSerializer(body).data)
