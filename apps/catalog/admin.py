"""Staff cockpit for the model catalog: serving config, prices, and the weights pipeline to R2.

Every write goes through apps.catalog.services / uploads / verify. Upload progress is shown as
a bar that refreshes itself from a small JSON endpoint (``upload-status/``) under this admin.
"""

from __future__ import annotations

import json
from typing import TYPE_CHECKING

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

from apps.catalog import (
    admin_jobs,  # noqa: F401  (registers the job pages)
    storage,
    uploads,
)
from apps.catalog.admin_parts import (
    HISTORY_ROWS,
    LatestUploadFilter,
    LatestVerificationFilter,
    ModelAdminForm,
    UploadForm,
    field_for_message,
    history_table,
    job_change_url,
    job_changelist_url,
    progress_html,
    progress_text,
    requested_by_text,
    scale_of,
    storage_configured,
    upload_payload,
    upload_source_text,
)
from apps.catalog.display import human_bytes
from apps.catalog.enqueue import upload_enqueue
from apps.catalog.models import JobOrigin, ServedModel, WeightUpload, WeightVerification
from apps.catalog.selectors import models_with_counts, storage_browser, with_latest_jobs
from apps.catalog.services import model_update
from apps.catalog.verify import verify_model
from apps.metering.admin_panels import ECONOMICS_PANEL_DAYS, model_economics_panel

if TYPE_CHECKING:
    from django_stubs_ext import WithAnnotations  # a dev dependency: for the checker only

    from apps.catalog.admin_parts import _Annotated


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
        "economics",
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
        (f"Economics, last {ECONOMICS_PANEL_DAYS} days (UTC)", {"fields": ("economics",)}),
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
        return progress_html(obj)

    @admin.display(description="replicas: desired / ready (min–max)")
    def replicas(self, obj: ServedModel) -> str:
        scale = scale_of(obj)
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
        return progress_html(obj)

    @admin.display(description="revenue, GPU cost, margin")
    def economics(self, obj: ServedModel) -> str:
        return model_economics_panel(obj) if obj.pk is not None else "Save the model first."

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
                    job_change_url(u),
                    u.pk,
                    u.get_status_display(),
                    upload_source_text(u.source),
                    human_bytes(u.bytes_total),
                    requested_by_text(u.get_origin_display(), u.requested_by),
                    u.requested_at,
                    u.error[:200],
                )
                for u in attempts[:HISTORY_ROWS]
            ),
        )
        return history_table(
            ("attempt", "status", "source", "size", "started by", "requested", "error"),
            rows,
            more=len(attempts) > HISTORY_ROWS,
            url=job_changelist_url(WeightUpload, obj),
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
                    job_change_url(c),
                    c.pk,
                    c.get_status_display(),
                    "full" if c.full else "quick",
                    f"{len(c.problems)} of {c.checked}",
                    requested_by_text(c.get_origin_display(), c.requested_by),
                    c.started_at,
                )
                for c in checks[:HISTORY_ROWS]
            ),
        )
        return history_table(
            ("check", "status", "depth", "problems", "started by", "at"),
            rows,
            more=len(checks) > HISTORY_ROWS,
            url=job_changelist_url(WeightVerification, obj),
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

        scale = scale_of(obj)
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
            {"models": [upload_payload(m) | {"text": progress_text(upload_payload(m))} for m in models]}
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
                form.add_error(field_for_message(str(exc)), str(exc))
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
            "bucket": storage.default_bucket() if storage_configured() else "",
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
            "bucket": storage.default_bucket() if storage_configured() else "",
        }
        return TemplateResponse(request, "admin/catalog/servedmodel/storage_browser.html", context)

    def storage_verify_view(self, request: HttpRequest) -> HttpResponse:
        model = get_object_or_404(ServedModel, pk=request.POST.get("model_id", "0"))
        if not self.has_change_permission(request, model):
            return HttpResponse(status=403)
        self._verify_one(request, model)
        return HttpResponseRedirect(reverse("admin:catalog_servedmodel_storage"))
