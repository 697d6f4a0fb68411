"""The catalog admin's forms, list filters and display helpers (apps/catalog/admin.py)."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from django import forms
from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest
from django.urls import reverse
from django.utils.html import format_html, format_html_join

from apps.catalog import storage, uploads
from apps.catalog.display import human_bytes
from apps.catalog.models import (
    EDITABLE_FIELDS,
    ServedModel,
    UploadStatus,
    VerifyStatus,
    WeightUpload,
    WeightVerification,
)

if TYPE_CHECKING:
    from typing import TypedDict

    from django_stubs_ext import WithAnnotations  # a dev dependency: for the checker only

    class _Annotated(TypedDict):  # what selectors.models_with_counts adds to each row
        upload_status: str
        verify_status: str
        live_nodes: int
        ready_nodes: int
        total_nodes: int


def upload_payload(model: ServedModel) -> dict[str, Any]:
    """What the progress bar shows for the model's latest upload attempt; also the JSON the bar polls."""
    upload = model.latest_upload or WeightUpload(model=model, status=UploadStatus.NONE)
    eta = None
    if upload.status == UploadStatus.UPLOADING and upload.rate_bps:
        eta = int(max(0, upload.bytes_total - upload.bytes_done) / upload.rate_bps)
    return {
        "id": model.pk,
        "upload_id": upload.pk,
        "status": upload.status,
        "status_label": upload.get_status_display(),
        "percent": round(100 * upload.progress, 1),
        "done": human_bytes(upload.bytes_done),
        "total": human_bytes(upload.bytes_total),
        "rate": human_bytes(upload.rate_bps) + "/s" if upload.rate_bps else "",
        "eta_seconds": eta,
        "file": upload.current_file,
        "error": upload.error if upload.status == UploadStatus.FAILED else "",
        "cancel_requested": upload.cancel_requested,
        "active": upload.status in uploads.BUSY_STATUSES,
    }


def progress_html(model: ServedModel) -> str:
    data = upload_payload(model)
    return format_html(
        '<div class="cl-upload" data-model-id="{}" data-status="{}" data-active="{}">'
        '<progress max="100" value="{}"></progress> <span class="cl-upload-text">{}</span></div>',
        model.pk,
        data["status"],
        "1" if data["active"] else "0",
        data["percent"],
        progress_text(data),
    )


def progress_text(data: dict[str, Any]) -> str:
    if data["status"] == UploadStatus.UPLOADING:
        parts = [f"{data['percent']}%", f"{data['done']} / {data['total']}", data["rate"]]
        if data["eta_seconds"] is not None:
            parts.append(f"ETA {data['eta_seconds']}s")
        return " · ".join(p for p in parts if p) + (f" · {data['file']}" if data["file"] else "")
    if data["status"] == UploadStatus.FAILED:
        return f"Failed: {data['error'][:200]}"
    return str(data["status_label"])


class ModelAdminForm(forms.ModelForm):
    class Meta:
        model = ServedModel
        fields = EDITABLE_FIELDS
        widgets = {"extra_vllm_args": forms.Textarea(attrs={"rows": 2, "cols": 60})}


class UploadForm(forms.Form):
    SOURCES = [("hf", "Hugging Face repo"), ("dir", "Folder on the worker machine")]

    source = forms.ChoiceField(choices=SOURCES, widget=forms.RadioSelect, initial="hf")
    hf_repo = forms.CharField(
        label="Repo[@revision]",
        required=False,
        help_text="e.g. Qwen/Qwen2.5-7B-Instruct@main. HF_ENDPOINT/HF_TOKEN apply.",
    )
    local_dir = forms.CharField(label="Folder", required=False, help_text="An absolute path on the worker machine.")
    # A form field, not BaseForm.prefix: the form metaclass moves declared fields into base_fields.
    prefix = forms.CharField(  # type: ignore[assignment]
        required=False, help_text="Leave empty for models/<org>--<name>/<revision>."
    )
    keep_downloads = forms.BooleanField(required=False, help_text="Keep the files downloaded from the hub.")

    def clean(self) -> dict[str, Any]:
        data = super().clean() or {}  # BaseForm.clean returns cleaned_data; typed Optional
        if data.get("source") == "hf" and not data.get("hf_repo"):
            self.add_error("hf_repo", "Give the Hugging Face repo, e.g. org/name@main.")
        if data.get("source") == "dir" and not data.get("local_dir"):
            self.add_error("local_dir", "Give the folder holding config.json and the *.safetensors files.")
        return data


def field_for_message(message: str) -> str | None:
    for name in ("hf_repo", "revision", "local_dir", "prefix"):
        if message.startswith(f"{name}:"):
            return "hf_repo" if name == "revision" else name
    return None


class LatestUploadFilter(admin.SimpleListFilter):
    title = "weights (latest upload)"
    parameter_name = "upload_status"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return list(UploadStatus.choices)

    def queryset(
        self, request: HttpRequest, queryset: QuerySet[WithAnnotations[ServedModel, _Annotated]]
    ) -> QuerySet[WithAnnotations[ServedModel, _Annotated]]:
        # upload_status is annotated by selectors.with_latest_jobs (the changelist's queryset)
        value = self.value()
        return queryset.filter(upload_status=value) if value else queryset


class LatestVerificationFilter(admin.SimpleListFilter):
    title = "last verify"
    parameter_name = "verify_status"

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        return [("never" if value == "" else value, label) for value, label in VerifyStatus.choices]

    def queryset(
        self, request: HttpRequest, queryset: QuerySet[WithAnnotations[ServedModel, _Annotated]]
    ) -> QuerySet[WithAnnotations[ServedModel, _Annotated]]:
        value = self.value()
        if value is None:
            return queryset
        return queryset.filter(verify_status="" if value == "never" else value)


HISTORY_ROWS = 20


def requested_by_text(origin: str, user: Any) -> str:
    return f"{origin} ({user.get_username()})" if user is not None else origin


def job_change_url(obj: WeightUpload | WeightVerification) -> str:
    return reverse(f"admin:catalog_{obj._meta.model_name}_change", args=[obj.pk])


def job_changelist_url(job_model: type[WeightUpload | WeightVerification], model: ServedModel) -> str:
    return reverse(f"admin:catalog_{job_model._meta.model_name}_changelist") + f"?model__id__exact={model.pk}"


def history_table(headers: tuple[str, ...], rows: str, *, more: bool, url: str) -> str:
    if not rows:
        return "None yet."
    head = format_html_join("", "<th>{}</th>", ((h,) for h in headers))
    link = format_html('<p><a href="{}">All of them</a></p>', url) if more else ""
    return format_html("<table><thead><tr>{}</tr></thead><tbody>{}</tbody></table>{}", head, rows, link)


def upload_source_text(source: dict) -> str:
    if source.get("kind") == "hf":
        return f"{source.get('repo')}@{source.get('revision')} -> {source.get('prefix')}"
    if source.get("kind") == "dir":
        return f"{source.get('path')} -> {source.get('prefix')}"
    return "-"


def scale_of(obj: ServedModel) -> Any:
    """The model's autoscaler row (a reverse one-to-one: absent until the first decision)."""
    from django.core.exceptions import ObjectDoesNotExist

    try:
        return obj.scale
    except ObjectDoesNotExist:
        return None


def storage_configured() -> bool:
    try:
        storage.check_configured()
    except storage.StorageError:
        return False
    return True
