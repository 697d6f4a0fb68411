"""Staff cockpit for the model catalog: serving config, prices, and the weights pipeline to R2.

Every write goes through apps.catalog.services / uploads / verify. Upload progress is shown as
a bar that refreshes itself from a small JSON endpoint (``upload-status/``) under this admin.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from django import forms
from django.contrib import admin, messages
from django.contrib.auth.models import User
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse
from django.shortcuts import get_object_or_404
from django.template.response import TemplateResponse
from django.urls import NoReverseMatch, URLPattern, path, reverse
from django.utils.html import format_html, format_html_join
from django.views.decorators.http import require_POST

from apps.catalog import storage, uploads
from apps.catalog.display import human_bytes
from apps.catalog.enqueue import upload_enqueue
from apps.catalog.models import JobOrigin, ServedModel, UploadStatus, VerifyStatus, WeightUpload, WeightVerification
from apps.catalog.selectors import models_with_counts, storage_browser, with_latest_jobs
from apps.catalog.services import model_update
from apps.catalog.verify import verify_model

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


def _progress_html(model: ServedModel) -> str:
    data = upload_payload(model)
    return format_html(
        '<div class="cl-upload" data-model-id="{}" data-status="{}" data-active="{}">'
        '<progress max="100" value="{}"></progress> <span class="cl-upload-text">{}</span></div>',
        model.pk,
        data["status"],
        "1" if data["active"] else "0",
        data["percent"],
        _progress_text(data),
    )


def _progress_text(data: dict[str, Any]) -> str:
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
        fields = (
            "name",
            "is_active",
            "hf_repo",
            "hf_revision",
            "storage_uri",
            "accelerator",
            "dtype",
            "max_model_len",
            "context_length",
            "tensor_parallel_size",
            "gpu_memory_utilization",
            "tool_call_parser",
            "reasoning_parser",
            "extra_vllm_args",
            "price_input_per_mtok",
            "price_output_per_mtok",
            "min_replicas",
            "max_replicas",
            "target_ongoing_requests",
            "target_kv_cache_usage",
            "target_queue_wait_s",
            "scale_up_window_s",
            "scale_down_window_s",
            "idle_to_zero_s",
            "spot_fallback",
            "spot_fallback_preemptions",
            "spot_fallback_window_s",
            "warm_pool",
        )
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


def _field_for(message: str) -> str | None:
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


def _who(origin: str, user: Any) -> str:
    return f"{origin} ({user.get_username()})" if user is not None else origin


def _change_url(obj: WeightUpload | WeightVerification) -> str:
    return reverse(f"admin:catalog_{obj._meta.model_name}_change", args=[obj.pk])


def _changelist_url(job_model: type[WeightUpload | WeightVerification], model: ServedModel) -> str:
    return reverse(f"admin:catalog_{job_model._meta.model_name}_changelist") + f"?model__id__exact={model.pk}"


def _history_table(headers: tuple[str, ...], rows: str, *, more: bool, url: str) -> str:
    if not rows:
        return "None yet."
    head = format_html_join("", "<th>{}</th>", ((h,) for h in headers))
    link = format_html('<p><a href="{}">All of them</a></p>', url) if more else ""
    return format_html("<table><thead><tr>{}</tr></thead><tbody>{}</tbody></table>{}", head, rows, link)


def _source_text(source: dict) -> str:
    if source.get("kind") == "hf":
        return f"{source.get('repo')}@{source.get('revision')} -> {source.get('prefix')}"
    if source.get("kind") == "dir":
        return f"{source.get('path')} -> {source.get('prefix')}"
    return "-"


@admin.register(ServedModel)
class ModelAdmin(admin.ModelAdmin):
    form = ModelAdminForm
    list_display = ("name", "is_active", "upload_column", "replicas", "prices", "nodes_column", "accelerator")
    list_display_links = ("name",)
    list_filter = ("is_active", LatestUploadFilter, LatestVerificationFilter, "accelerator")
    search_fields = ("name", "hf_repo", "storage_uri")
    ordering = ("name",)
    list_per_page = 100
    actions = ("upload_weights", "cancel_upload", "verify_weights")
    change_list_template = "admin/catalog/servedmodel/change_list.html"
    change_form_template = "admin/catalog/servedmodel/change_form.html"
    readonly_fields = (
        "upload_panel",
        "manifest_pretty",
        "total_bytes",
        "verify_panel",
        "cold_start",
        "autoscaler",
        "upload_history",
        "verification_history",
        "created_at",
        "updated_at",
    )
    fieldsets = (
        ("Identity", {"fields": ("name", "is_active", "hf_repo", "hf_revision")}),
        ("Storage", {"fields": ("storage_uri", "total_bytes", "upload_panel", "verify_panel", "manifest_pretty")}),
        (
            "Serving config",
            {
                "fields": (
                    "accelerator",
                    "dtype",
                    "max_model_len",
                    "context_length",
                    "tensor_parallel_size",
                    "gpu_memory_utilization",
                    "tool_call_parser",
                    "reasoning_parser",
                    "extra_vllm_args",
                    "cold_start",
                )
            },
        ),
        ("Pricing", {"fields": ("price_input_per_mtok", "price_output_per_mtok")}),
        ("Replicas", {"fields": ("min_replicas", "max_replicas", "autoscaler")}),
        (
            "Autoscaling",
            {
                "description": "How the autoscaler follows demand (docs/fleet.md, “Autoscaling”).",
                "fields": (
                    ("target_ongoing_requests", "target_kv_cache_usage", "target_queue_wait_s"),
                    ("scale_up_window_s", "scale_down_window_s", "idle_to_zero_s"),
                    ("spot_fallback", "spot_fallback_preemptions", "spot_fallback_window_s"),
                    "warm_pool",
                ),
            },
        ),
        ("Weights history", {"classes": ("collapse",), "fields": ("upload_history", "verification_history")}),
        ("History", {"classes": ("collapse",), "fields": ("created_at", "updated_at")}),
    )

    # --- changelist ------------------------------------------------------------------------------
    def get_queryset(self, request: HttpRequest) -> QuerySet[ServedModel]:
        return models_with_counts()

    @admin.display(description="weights", ordering="upload_status")
    def upload_column(self, obj: ServedModel) -> str:
        return _progress_html(obj)

    @admin.display(description="replicas: desired / ready (min–max)")
    def replicas(self, obj: ServedModel) -> str:
        scale = _scale_of(obj)
        bounds = f"({obj.min_replicas}–{obj.max_replicas})"
        if scale is None:
            return f"– {bounds}"
        return format_html('<span title="{}">{} / {} {}</span>', scale.reason, scale.desired, scale.ready, bounds)

    @admin.display(description="$ / 1M in · out", ordering="price_input_per_mtok")
    def prices(self, obj: ServedModel) -> str:
        return f"{obj.price_input_per_mtok.normalize():f} · {obj.price_output_per_mtok.normalize():f}"

    @admin.display(description="nodes ready / live / all", ordering="live_nodes")
    def nodes_column(self, obj: WithAnnotations[ServedModel, _Annotated]) -> str:
        counts = f"{obj.ready_nodes} / {obj.live_nodes} / {obj.total_nodes}"
        try:
            url = reverse("admin:fleet_node_changelist") + f"?model__id__exact={obj.pk}"
        except NoReverseMatch:  # the fleet admin is not registered (e.g. a trimmed-down deployment)
            return counts
        return format_html('<a href="{}">{}</a>', url, counts)

    # --- change page -----------------------------------------------------------------------------
    @admin.display(description="upload")
    def upload_panel(self, obj: ServedModel) -> str:
        if obj.pk is None:
            return "Save the model first, then upload its weights."
        return _progress_html(obj)

    @admin.display(description="last verify")
    def verify_panel(self, obj: ServedModel) -> str:
        check = obj.latest_verification if obj.pk is not None else None
        if check is None:
            return "Never verified."
        problems = format_html_join("", "<li>{}</li>", ((p,) for p in [*check.problems[:20], check.error] if p))
        return format_html(
            "{} at {}<ul>{}</ul>", check.get_status_display(), check.finished_at or check.started_at, problems
        )

    @admin.display(description="uploads")
    def upload_history(self, obj: ServedModel) -> str:
        if obj.pk is None:
            return "-"
        attempts = list(obj.uploads.select_related("requested_by").order_by("-id")[: HISTORY_ROWS + 1])
        rows = format_html_join(
            "",
            "<tr><td><a href='{}'>#{}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (
                    _change_url(u),
                    u.pk,
                    u.get_status_display(),
                    _source_text(u.source),
                    human_bytes(u.bytes_total),
                    _who(u.get_origin_display(), u.requested_by),
                    u.requested_at,
                    u.error[:200],
                )
                for u in attempts[:HISTORY_ROWS]
            ),
        )
        return _history_table(
            ("attempt", "status", "source", "size", "started by", "requested", "error"),
            rows,
            more=len(attempts) > HISTORY_ROWS,
            url=_changelist_url(WeightUpload, obj),
        )

    @admin.display(description="verifications")
    def verification_history(self, obj: ServedModel) -> str:
        if obj.pk is None:
            return "-"
        checks = list(obj.verifications.select_related("requested_by").order_by("-id")[: HISTORY_ROWS + 1])
        rows = format_html_join(
            "",
            "<tr><td><a href='{}'>#{}</a></td><td>{}</td><td>{}</td><td>{}</td><td>{}</td><td>{}</td></tr>",
            (
                (
                    _change_url(c),
                    c.pk,
                    c.get_status_display(),
                    "full" if c.full else "quick",
                    f"{len(c.problems)} of {c.checked}",
                    _who(c.get_origin_display(), c.requested_by),
                    c.started_at,
                )
                for c in checks[:HISTORY_ROWS]
            ),
        )
        return _history_table(
            ("check", "status", "depth", "problems", "started by", "at"),
            rows,
            more=len(checks) > HISTORY_ROWS,
            url=_changelist_url(WeightVerification, obj),
        )

    @admin.display(description="manifest")
    def manifest_pretty(self, obj: ServedModel) -> str:
        if not obj.manifest:
            return "No manifest yet (upload the weights)."
        rows = format_html_join(
            "",
            "<tr><td><code>{}</code></td><td style='text-align:right'>{}</td><td><code>{}</code></td></tr>",
            (
                (e.get("path", "?"), human_bytes(int(e.get("size", 0))), str(e.get("sha256", ""))[:16] + "…")
                for e in obj.manifest
            ),
        )
        raw = json.dumps(obj.manifest, indent=2)
        return format_html(
            "<table><thead><tr><th>file</th><th>size</th><th>sha256</th></tr></thead><tbody>{}</tbody></table>"
            "<details><summary>JSON</summary><pre>{}</pre></details>",
            rows,
            raw,
        )

    @admin.display(description="autoscaler")
    def autoscaler(self, obj: ServedModel) -> str:
        if obj.pk is None:
            return "-"
        from apps.fleet.selectors import model_scale_history

        scale = _scale_of(obj)
        if scale is None:
            return "No decision yet (the autoscaler runs every few seconds once the model is active)."
        head = format_html(
            "<b>desired {}</b> · ready {} · starting {} · stopped (warm) {} — decided {}<br>{}",
            scale.desired,
            scale.ready,
            scale.starting,
            scale.stopped,
            scale.decided_at,
            scale.reason,
        )
        history = format_html_join(
            "",
            "<li>{}: {} → {} — {}</li>",
            ((d.created_at, d.previous, d.desired, d.reason) for d in model_scale_history(model_id=obj.pk)),
        )
        return format_html("{}<ul>{}</ul>", head, history) if history else head

    @admin.display(description="cold start (median)")
    def cold_start(self, obj: ServedModel) -> str:
        if obj.pk is None:
            return "-"
        from apps.fleet.selectors import model_cold_start_medians

        rows = model_cold_start_medians(model_id=obj.pk)
        if not rows:
            return "No node has become ready yet."
        return format_html_join(
            "<br>",
            "{}: {} s (over {} node(s))",
            ((r["accelerator"], r["median_seconds"], r["samples"]) for r in rows),
        )

    def save_model(self, request: HttpRequest, obj: ServedModel, form: forms.ModelForm, change: bool) -> None:
        # Only the edited columns: an upload running meanwhile keeps its progress and status.
        changed = {name: getattr(obj, name) for name in form.changed_data} if change else {}
        if change and not changed:
            return
        model_update(model=obj, **changed)  # full_clean, save, and tell the gateways the catalog changed

    # --- actions ---------------------------------------------------------------------------------
    @admin.action(description="Upload weights to R2 (one: choose the source; several: same source again)")
    def upload_weights(self, request: HttpRequest, queryset: QuerySet[ServedModel]) -> HttpResponse | None:
        models = list(queryset)
        if len(models) == 1:
            return HttpResponseRedirect(reverse("admin:catalog_servedmodel_upload", args=[models[0].pk]))
        assert isinstance(request.user, User)  # the admin lets only a signed-in staff user through
        for model in models:
            source = model.latest_upload.source if model.latest_upload else {}
            try:
                upload = uploads.upload_request(
                    model=model,
                    hf_repo=str(source.get("repo") or ("" if source else model.hf_repo)),
                    revision=str(source.get("revision") or model.hf_revision),
                    local_dir=str(source.get("path", "")),
                    prefix=uploads.requested_prefix(source),
                    keep_downloads=bool(source.get("keep")),
                    origin=JobOrigin.ADMIN,
                    requested_by=request.user,
                )
            except uploads.UploadError as exc:
                self.message_user(request, f"{model.name}: {exc}", messages.ERROR)
            else:
                upload_enqueue(upload=upload)
                self.message_user(request, f"{model.name}: upload queued.", messages.SUCCESS)
        return None

    @admin.action(description="Cancel upload")
    def cancel_upload(self, request: HttpRequest, queryset: QuerySet[ServedModel]) -> None:
        for model in queryset:
            try:
                uploads.upload_cancel(model=model)
            except uploads.UploadError as exc:
                self.message_user(request, str(exc), messages.WARNING)
            else:
                self.message_user(request, f"{model.name}: cancel requested.", messages.SUCCESS)

    @admin.action(description="Verify weights in R2 (size + stored checksum)")
    def verify_weights(self, request: HttpRequest, queryset: QuerySet[ServedModel]) -> None:
        for model in queryset:
            self._verify_one(request, model)

    def _verify_one(self, request: HttpRequest, model: ServedModel) -> None:
        assert isinstance(request.user, User)  # the admin lets only a signed-in staff user through
        try:
            report = verify_model(model=model, origin=JobOrigin.ADMIN, requested_by=request.user)
        except storage.StorageError as exc:
            self.message_user(request, f"{model.name}: cannot verify: {exc}", messages.ERROR)
            return
        self.message_user(
            request, f"{model.name}: {report.summary()}", messages.SUCCESS if report.ok else messages.ERROR
        )

    # --- extra views -----------------------------------------------------------------------------
    def get_urls(self) -> list[URLPattern]:
        view = self.admin_site.admin_view
        return [
            path("storage/", view(self.storage_view), name="catalog_servedmodel_storage"),
            path(
                "storage/verify/",
                view(require_POST(self.storage_verify_view)),
                name="catalog_servedmodel_storage_verify",
            ),
            path("upload-status/", view(self.upload_status_view), name="catalog_servedmodel_upload_status"),
            path("<int:model_id>/upload/", view(self.upload_view), name="catalog_servedmodel_upload"),
            *super().get_urls(),
        ]

    def upload_status_view(self, request: HttpRequest) -> JsonResponse:
        ids = [int(i) for i in request.GET.getlist("id") if i.isdigit()][:200]
        if not self.has_view_permission(request):
            return JsonResponse({"error": "forbidden"}, status=403)
        models = with_latest_jobs(ServedModel.objects.filter(pk__in=ids).only("id"))
        return JsonResponse(
            {"models": [upload_payload(m) | {"text": _progress_text(upload_payload(m))} for m in models]}
        )

    def upload_view(self, request: HttpRequest, model_id: int) -> HttpResponse:
        model = get_object_or_404(ServedModel, pk=model_id)
        if not self.has_change_permission(request, model):
            return HttpResponse(status=403)
        latest = model.latest_upload
        source = latest.source if latest else {}
        initial = {
            "source": source.get("kind", "hf" if model.hf_repo or not source else "dir"),
            "hf_repo": f"{source.get('repo') or model.hf_repo}@{source.get('revision') or model.hf_revision}"
            if (source.get("repo") or model.hf_repo)
            else "",
            "local_dir": source.get("path", ""),
            "prefix": uploads.requested_prefix(source),
            "keep_downloads": bool(source.get("keep")),
        }
        form = UploadForm(request.POST or None, initial=initial)
        if request.method == "POST" and form.is_valid():
            data = form.cleaned_data
            assert isinstance(request.user, User)  # the admin lets only a signed-in staff user through
            try:
                upload = uploads.upload_request(
                    model=model,
                    hf_repo=data["hf_repo"] if data["source"] == "hf" else "",
                    local_dir=data["local_dir"] if data["source"] == "dir" else "",
                    prefix=data["prefix"],
                    keep_downloads=data["keep_downloads"],
                    origin=JobOrigin.ADMIN,
                    requested_by=request.user,
                )
            except uploads.UploadError as exc:
                form.add_error(_field_for(str(exc)), str(exc))
            else:
                upload_enqueue(upload=upload)
                self.message_user(request, f"{model.name}: upload queued; progress shows below.", messages.SUCCESS)
                return HttpResponseRedirect(reverse("admin:catalog_servedmodel_change", args=[model.pk]))
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "original": model,
            "form": form,
            "title": f"Upload weights for {model.name}",
            "latest_upload": latest,
            "busy": latest is not None and latest.status in uploads.BUSY_STATUSES and not uploads.is_stale(latest),
            "bucket": storage.default_bucket() if _configured() else "",
        }
        return TemplateResponse(request, "admin/catalog/servedmodel/upload_form.html", context)

    def storage_view(self, request: HttpRequest) -> HttpResponse:
        rows, error = [], ""
        try:
            rows = storage_browser()
        except storage.StorageError as exc:
            error = str(exc)
        context = {
            **self.admin_site.each_context(request),
            "opts": self.opts,
            "title": "Model weights in R2",
            "rows": [{"row": r, "size": human_bytes(r.total_bytes)} for r in rows],
            "error": error,
            "bucket": storage.default_bucket() if _configured() else "",
        }
        return TemplateResponse(request, "admin/catalog/servedmodel/storage_browser.html", context)

    def storage_verify_view(self, request: HttpRequest) -> HttpResponse:
        model = get_object_or_404(ServedModel, pk=request.POST.get("model_id", "0"))
        if not self.has_change_permission(request, model):
            return HttpResponse(status=403)
        self._verify_one(request, model)
        return HttpResponseRedirect(reverse("admin:catalog_servedmodel_storage"))


class _JobAdmin(admin.ModelAdmin):
    """Every attempt across the catalog, for "what failed today"; written by the services only."""

    list_select_related = ("model", "requested_by")
    list_per_page = 100

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(WeightUpload)
class WeightUploadAdmin(_JobAdmin):
    list_display = (
        "id",
        "model",
        "status",
        "source_text",
        "bytes_total",
        "origin",
        "requested_by",
        "requested_at",
        "finished_at",
    )
    list_filter = ("status", "origin", "model")
    search_fields = ("model__name", "error")
    date_hierarchy = "requested_at"

    @admin.display(description="source")
    def source_text(self, obj: WeightUpload) -> str:
        return _source_text(obj.source)


@admin.register(WeightVerification)
class WeightVerificationAdmin(_JobAdmin):
    list_display = ("id", "model", "status", "full", "checked", "origin", "requested_by", "started_at", "finished_at")
    list_filter = ("status", "full", "origin", "model")
    search_fields = ("model__name", "uri")
    date_hierarchy = "started_at"


def _scale_of(obj: ServedModel) -> Any:
    """The model's autoscaler row (a reverse one-to-one: absent until the first decision)."""
    from django.core.exceptions import ObjectDoesNotExist

    try:
        return obj.scale
    except ObjectDoesNotExist:
        return None


def _configured() -> bool:
    try:
        storage.check_configured()
    except storage.StorageError:
        return False
    return True
