"""Management API for the model catalog (staff only): CRUD plus upload, cancel-upload and verify.

Customer keys get a 403: the catalog's storage, prices and serving config are operator business
(customers see models through ``GET /v1/models`` on the gateway).
"""

from __future__ import annotations

from typing import Any

import django_filters
from django.contrib.auth.models import User
from django.core.exceptions import ObjectDoesNotExist, ValidationError
from django.db.models import QuerySet
from drf_spectacular.utils import extend_schema
from rest_framework import serializers, status, viewsets
from rest_framework.decorators import action
from rest_framework.exceptions import APIException
from rest_framework.request import Request
from rest_framework.response import Response
from rest_framework.serializers import BaseSerializer

from apps.catalog import services, storage, uploads
from apps.catalog.enqueue import upload_enqueue
from apps.catalog.models import (
    EDITABLE_FIELDS,
    JobOrigin,
    ServedModel,
    UploadStatus,
    VerifyStatus,
    WeightUpload,
    WeightVerification,
)
from apps.catalog.selectors import with_latest_jobs
from apps.catalog.verify import verify_model
from apps.core.api import Conflict
from apps.core.fields import StrictCharField, StrictModelSerializer
from apps.core.filters import StrictFilterSet
from apps.tenancy.permissions import IsStaff


class StorageUnavailable(APIException):
    status_code = status.HTTP_502_BAD_GATEWAY
    default_detail = "The object store failed."
    default_code = "storage_error"


class WeightUploadSerializer(StrictModelSerializer):
    progress = serializers.FloatField(read_only=True)
    requested_by: serializers.SlugRelatedField[Any] = serializers.SlugRelatedField(
        slug_field="username", read_only=True
    )

    class Meta:
        model = WeightUpload
        fields = [
            "id",
            "status",
            "source",
            "error",
            "progress",
            "bytes_done",
            "bytes_total",
            "rate_bps",
            "current_file",
            "cancel_requested",
            "origin",
            "requested_by",
            "requested_at",
            "started_at",
            "finished_at",
            "updated_at",
        ]
        read_only_fields = fields


class WeightVerificationSerializer(StrictModelSerializer):
    requested_by: serializers.SlugRelatedField[Any] = serializers.SlugRelatedField(
        slug_field="username", read_only=True
    )

    class Meta:
        model = WeightVerification
        fields = [
            "id",
            "status",
            "full",
            "uri",
            "checked",
            "problems",
            "error",
            "origin",
            "requested_by",
            "started_at",
            "finished_at",
        ]
        read_only_fields = fields


class ModelSerializer(StrictModelSerializer):
    upload_status = serializers.SerializerMethodField(help_text="The latest upload's status, or none.")
    verify_status = serializers.SerializerMethodField(help_text="The latest verification's status, or ''.")
    latest_upload = WeightUploadSerializer(
        read_only=True, allow_null=True, help_text="The latest upload attempt (history: GET …/uploads/)."
    )
    autoscale = serializers.SerializerMethodField(
        help_text="The autoscaler's last decision: desired and actual (ready, starting, stopped) nodes, why, when; "
        "null before the first."
    )
    latest_verification = WeightVerificationSerializer(
        read_only=True, allow_null=True, help_text="The latest verification (history: GET …/verifications/)."
    )

    class Meta:
        model = ServedModel
        fields = [
            "id",
            *EDITABLE_FIELDS,
            "autoscale",
            "total_bytes",
            "manifest",
            "upload_status",
            "verify_status",
            "latest_upload",
            "latest_verification",
            "created_at",
            "updated_at",
        ]
        read_only_fields = ["total_bytes", "manifest", "created_at", "updated_at"]

    def get_autoscale(self, obj: ServedModel) -> dict[str, Any] | None:
        try:
            scale = obj.scale
        except ObjectDoesNotExist:
            return None
        return {
            "desired": scale.desired,
            "ready": scale.ready,
            "starting": scale.starting,
            "stopped": scale.stopped,
            "reason": scale.reason,
            "decided_at": scale.decided_at,
        }

    def get_upload_status(self, obj: ServedModel) -> str:
        return obj.latest_upload.status if obj.latest_upload else UploadStatus.NONE.value

    def get_verify_status(self, obj: ServedModel) -> str:
        return obj.latest_verification.status if obj.latest_verification else VerifyStatus.NEVER.value

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        lo = attrs.get("min_replicas", getattr(self.instance, "min_replicas", 0))
        hi = attrs.get("max_replicas", getattr(self.instance, "max_replicas", 1))
        if hi < lo:
            raise serializers.ValidationError({"max_replicas": "Must be at least min_replicas."})
        active = attrs.get("is_active", getattr(self.instance, "is_active", True))
        if hi < 1 and active:
            raise serializers.ValidationError(
                {"max_replicas": "An active model needs at least 1 (set min_replicas 0 to scale to zero)."}
            )
        return attrs


class UploadInputSerializer(serializers.Serializer):
    hf_repo = StrictCharField(
        required=False, allow_blank=True, default="", help_text="Hugging Face repo id, optionally with @revision."
    )
    revision = StrictCharField(required=False, allow_blank=True, default="")
    local_dir = StrictCharField(
        required=False, allow_blank=True, default="", help_text="An absolute folder path on the worker machine."
    )
    prefix = StrictCharField(
        required=False,
        allow_blank=True,
        default="",
        help_text="Object prefix; default models/<org>--<name>/<revision>.",
    )
    keep_downloads = serializers.BooleanField(required=False, default=False)

    def validate(self, attrs: dict[str, Any]) -> dict[str, Any]:
        if bool(attrs["hf_repo"]) == bool(attrs["local_dir"]):
            raise serializers.ValidationError({"hf_repo": "Give either hf_repo or local_dir (exactly one)."})
        return attrs


class VerifyInputSerializer(serializers.Serializer):
    full = serializers.BooleanField(
        required=False, default=False, help_text="Stream every object and recompute its sha256 (slow for big models)."
    )


class VerifyReportSerializer(serializers.Serializer):
    uri = StrictCharField()
    ok = serializers.BooleanField()
    checked = serializers.IntegerField()
    full = serializers.BooleanField()
    problems = serializers.ListField(child=StrictCharField())
    summary = StrictCharField()


class ModelFilterSet(StrictFilterSet):
    name = django_filters.CharFilter(lookup_expr="icontains")
    is_active = django_filters.BooleanFilter()
    active = django_filters.BooleanFilter(field_name="is_active")
    # upload_status is the latest attempt's, annotated by selectors.with_latest_jobs
    upload_status = django_filters.ChoiceFilter(choices=UploadStatus.choices, field_name="upload_status")

    class Meta:
        model = ServedModel
        fields = ["name", "is_active"]


def _upload_error_to_api(exc: uploads.UploadError) -> APIException:
    message = str(exc)
    for field in ("hf_repo", "revision", "local_dir", "prefix"):
        if message.startswith(f"{field}:"):
            return serializers.ValidationError({field: message.split(":", 1)[1].strip()})
    if "already" in message:
        return Conflict(message)
    return serializers.ValidationError({"non_field_errors": message})


class ModelViewSet(viewsets.ModelViewSet):
    queryset = with_latest_jobs(ServedModel.objects.select_related("scale"))
    serializer_class = ModelSerializer
    permission_classes = [IsStaff]
    filterset_class = ModelFilterSet
    search_fields = ["name", "hf_repo", "storage_uri"]
    ordering_fields = ["name", "created_at", "upload_status", "total_bytes"]
    ordering = ["name"]

    def perform_create(self, serializer: BaseSerializer[ServedModel]) -> None:
        serializer.instance = services.model_create(**serializer.validated_data)

    def perform_update(self, serializer: BaseSerializer[ServedModel]) -> None:
        assert serializer.instance is not None  # an update has the object it updates
        serializer.instance = services.model_update(model=serializer.instance, **serializer.validated_data)

    def perform_destroy(self, instance: ServedModel) -> None:
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
        model = self.get_object()
        assert isinstance(request.user, User)  # IsStaff let only a signed-in staff user through
        try:
            upload = uploads.upload_request(
                model=model, origin=JobOrigin.API, requested_by=request.user, **data.validated_data
            )
        except uploads.UploadError as exc:
            raise _upload_error_to_api(exc) from exc
        upload_enqueue(upload=upload)
        return Response(ModelSerializer(self._fresh(model)).data, status=status.HTTP_202_ACCEPTED)

    @extend_schema(request=None, responses=ModelSerializer)
    @action(detail=True, methods=["post"], url_path="cancel-upload")
    def cancel_upload(self, request: Request, pk: str | None = None) -> Response:
        """Cancel a queued upload, or ask a running one to stop (it stops between parts)."""
        model = self.get_object()
        try:
            uploads.upload_cancel(model=model)
        except uploads.UploadError as exc:
            raise Conflict(str(exc)) from exc
        return Response(ModelSerializer(self._fresh(model)).data)

    @extend_schema(request=None, responses=WeightUploadSerializer(many=True), filters=False)
    @action(detail=True, methods=["get"], filter_backends=[])
    def uploads(self, request: Request, pk: str | None = None) -> Response:
        """Every upload attempt of this model, newest first (paginated like the lists)."""
        attempts = self.get_object().uploads.select_related("requested_by").order_by("-id")
        return self._page(attempts, WeightUploadSerializer)

    @extend_schema(request=None, responses=WeightVerificationSerializer(many=True), filters=False)
    @action(detail=True, methods=["get"], filter_backends=[])
    def verifications(self, request: Request, pk: str | None = None) -> Response:
        """Every verification of this model, newest first (paginated like the lists)."""
        checks = self.get_object().verifications.select_related("requested_by").order_by("-id")
        return self._page(checks, WeightVerificationSerializer)

    def _page(self, queryset: QuerySet, serializer_class: type[serializers.ModelSerializer]) -> Response:
        page = self.paginate_queryset(queryset)
        if page is None:
            return Response(serializer_class(queryset, many=True).data)
        return self.get_paginated_response(serializer_class(page, many=True).data)

    def _fresh(self, model: ServedModel) -> ServedModel:
        """The model re-read with its latest jobs, after an action changed them."""
        return with_latest_jobs(ServedModel.objects.filter(pk=model.pk)).get()

    @extend_schema(request=VerifyInputSerializer, responses=VerifyReportSerializer)
    @action(detail=True, methods=["post"])
    def verify(self, request: Request, pk: str | None = None) -> Response:
        """Check every object against the manifest; ``full`` re-hashes the bytes. Runs in the request."""
        data = VerifyInputSerializer(data=request.data)
        data.is_valid(raise_exception=True)
        model = self.get_object()
        if not model.storage_uri:
            raise Conflict(f"{model.name} has no storage URI: upload its weights first.")
        assert isinstance(request.user, User)  # IsStaff let only a signed-in staff user through
        try:
            report = verify_model(
                model=model, full=data.validated_data["full"], origin=JobOrigin.API, requested_by=request.user
            )
        except storage.StorageError as exc:
            raise StorageUnavailable(str(exc)) from exc
        body = {
            "uri": report.uri,
            "ok": report.ok,
            "checked": report.checked,
            "full": report.full,
            "problems": report.problems,
            "summary": report.summary(),
        }
        return Response(VerifyReportSerializer(body).data)
