"""Staff cockpit for the GPU fleet: launch (with a preview of what will run), watch, act, tear down.

Every write goes through apps.fleet.services; node rows are read-only here. Registration digests
and node API keys are never rendered.
"""

from __future__ import annotations

import json
from typing import Any

from django import forms
from django.contrib import admin, messages
from django.contrib.admin.utils import flatten_fieldsets
from django.core.exceptions import ValidationError
from django.db import transaction
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html

from apps.catalog.models import ServedModel
from apps.core.paginator import EstimatedCountPaginator
from apps.fleet import services
from apps.fleet.health import run_health_checks
from apps.fleet.launchers import get_launcher
from apps.fleet.launchers.base import LaunchError
from apps.fleet.models import LIVE_STATUSES, Launcher, LaunchProfile, Node, NodeEvent, NodeStatus, ScaleDecision
from apps.fleet.placement import Placement
from apps.fleet.transitions import IllegalTransition

STATUS_COLORS: dict[str, str] = {
    NodeStatus.PENDING: "#6c757d",
    NodeStatus.PROVISIONING: "#0d6efd",
    NodeStatus.LOADING: "#6610f2",
    NodeStatus.READY: "#198754",
    NodeStatus.UNHEALTHY: "#fd7e14",
    NodeStatus.DRAINING: "#b58900",
    NodeStatus.STOPPING: "#20c997",
    NodeStatus.STOPPED: "#0dcaf0",
    NodeStatus.TERMINATING: "#6c757d",
    NodeStatus.TERMINATED: "#adb5bd",
    NodeStatus.FAILED: "#dc3545",
}
EVENTS_SHOWN = 50
_SECRET_WORDS = ("key", "token", "secret", "password")


def redact(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: "<redacted>" if any(w in str(k).lower() for w in _SECRET_WORDS) else redact(v) for k, v in value.items()
        }
    if isinstance(value, list):
        return [redact(v) for v in value]
    return value


def _actor(request: HttpRequest) -> str:
    return f"staff:{request.user.get_username()}"


@admin.register(LaunchProfile)
class LaunchProfileAdmin(admin.ModelAdmin):
    list_display = ["name", "placements_display", "accelerator", "use_spot", "disk_size_gb", "is_active"]
    list_filter = ["is_active", "use_spot"]
    search_fields = ["name", "description"]

    @admin.display(description="placements (in order)")
    def placements_display(self, obj: LaunchProfile) -> str:
        return " → ".join(
            "/".join(p.get(k, "") for k in ("cloud", "region", "zone") if p.get(k))
            for p in obj.placements
            if isinstance(p, dict)
        )


_EVENT_FIELDS = ("created_at", "kind", "from_status", "to_status", "message", "actor")


class NodeEventInline(admin.TabularInline):
    model = NodeEvent
    fields = _EVENT_FIELDS
    readonly_fields = _EVENT_FIELDS
    extra = 0
    can_delete = False
    show_change_link = False
    verbose_name_plural = f"events (newest {EVENTS_SHOWN})"

    def get_queryset(self, request: HttpRequest) -> QuerySet[NodeEvent]:
        qs = super().get_queryset(request)
        object_id = request.resolver_match.kwargs.get("object_id") if request.resolver_match else None
        if object_id and str(object_id).isdigit():
            newest = list(qs.filter(node_id=int(object_id)).values_list("id", flat=True)[:EVENTS_SHOWN])
            qs = qs.filter(id__in=newest)
        return qs

    def has_add_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


class LiveFilter(admin.SimpleListFilter):
    title = "lifecycle"
    parameter_name = "live"

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("yes", "Live (has or will have a machine)"), ("no", "Ended (terminating, terminated, failed)")]

    def queryset(self, request: HttpRequest, queryset: QuerySet[Node]) -> QuerySet[Node]:
        if self.value() == "yes":
            return queryset.filter(status__in=LIVE_STATUSES)
        if self.value() == "no":
            return queryset.exclude(status__in=LIVE_STATUSES)
        return queryset


class LaunchForm(forms.Form):
    model = forms.ModelChoiceField(queryset=ServedModel.objects.filter(is_active=True))
    launcher = forms.ChoiceField(choices=Launcher.choices)
    launch_profile = forms.ModelChoiceField(
        queryset=LaunchProfile.objects.filter(is_active=True),
        required=False,
        help_text="SkyPilot: an ordered cloud/region failover list; overrides cloud and region.",
    )
    cloud = forms.CharField(max_length=32, required=False, help_text="SkyPilot: aws, gcp, azure… empty = any.")
    region = forms.CharField(max_length=64, required=False)
    accelerator = forms.CharField(max_length=32, required=False, help_text="Empty: the model's recommendation.")
    use_spot = forms.BooleanField(required=False, initial=True, label="spot")
    count = forms.IntegerField(min_value=1, max_value=100, initial=1)
    endpoint_url = forms.URLField(required=False, assume_scheme="http", help_text="Static launcher only.")

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        from django.conf import settings

        self.fields["launcher"].initial = settings.FLEET_DEFAULT_LAUNCHER


@admin.register(Node)
class NodeAdmin(admin.ModelAdmin):
    list_display = [
        "cluster_name",
        "model",
        "launcher",
        "placement",
        "accelerator",
        "use_spot",
        "status_badge",
        "load",
        "last_health_at",
        "hourly_cost",
    ]
    list_filter = [LiveFilter, "status", "launcher", "model", "cloud", "use_spot"]
    search_fields = ["cluster_name", "endpoint_url", "model__name"]
    list_select_related = ["model"]
    show_full_result_count = False
    paginator = EstimatedCountPaginator
    list_per_page = 100
    ordering = ["-id"]
    inlines = [NodeEventInline]
    actions = ["terminate_nodes", "drain_nodes", "relaunch_nodes", "check_health_now", "force_terminated"]
    change_list_template = "admin/fleet/node/change_list.html"
    change_form_template = "admin/fleet/node/change_form.html"
    fieldsets = [
        (None, {"fields": ["cluster_name", "model", "status", "status_reason", "status_changed_at"]}),
        (
            "Placement",
            {
                "fields": [
                    "launcher",
                    "launch_profile",
                    "cloud",
                    "region",
                    "accelerator",
                    "use_spot",
                    "hourly_cost",
                    "endpoint_url",
                ]
            },
        ),
        (
            "Health",
            {
                "fields": [
                    "last_health_at",
                    "consecutive_failures",
                    "health_latency_ms",
                    "requests_running",
                    "requests_waiting",
                    "kv_cache_usage",
                ]
            },
        ),
        (
            "Lifecycle",
            {
                "fields": [
                    "requested_at",
                    "registered_at",
                    "provisioned_at",
                    "weights_loaded_at",
                    "ready_at",
                    "terminated_at",
                    "stopped_at",
                    "restart_requested_at",
                    "warm_starts",
                    "stopped_hourly_cost",
                    "launcher_bookkeeping",
                ]
            },
        ),
    ]

    def get_readonly_fields(self, request: HttpRequest, obj: Node | None = None) -> list[str]:
        return list(flatten_fieldsets(self.fieldsets))

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # nodes are launched through the "Launch nodes" form

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False  # the event log and usage records refer to nodes: terminate instead

    @admin.display(description="launcher state")
    def launcher_bookkeeping(self, obj: Node) -> str:
        # launcher_state may hold a static node's API key (gateway add_node): never render secrets.
        return json.dumps(redact(obj.launcher_state), indent=1, sort_keys=True, default=str)

    @admin.display(description="cloud/region")
    def placement(self, obj: Node) -> str:
        return "/".join(p for p in (obj.cloud, obj.region) if p) or "—"

    @admin.display(description="status", ordering="status")
    def status_badge(self, obj: Node) -> str:
        return format_html(
            '<b style="color:{}" title="{}">{}</b>',
            STATUS_COLORS.get(obj.status, "#000"),
            obj.status_reason[:300],
            obj.get_status_display(),
        )

    @admin.display(description="load (run/wait/kv)")
    def load(self, obj: Node) -> str:
        if obj.last_health_at is None:
            return "—"
        kv = f"{obj.kv_cache_usage:.0%}" if obj.kv_cache_usage is not None else "?"
        return f"{obj.requests_running}/{obj.requests_waiting}/{kv}"

    # --- actions ------------------------------------------------------------------------------

    def _each(self, request: HttpRequest, queryset: QuerySet[Node], fn, verb: str) -> None:
        done, refused = 0, []
        for node in queryset.select_related("model", "launch_profile"):
            try:
                with transaction.atomic():
                    fn(node=node, actor=_actor(request))
                done += 1
            except (IllegalTransition, ValidationError) as exc:
                refused.append(f"{node}: {getattr(exc, 'messages', [exc])[0]}")
        if done:
            self.message_user(request, f"{verb} {done} node(s).", messages.SUCCESS)
        if refused:
            self.message_user(request, "Refused: " + "; ".join(refused[:10]), messages.WARNING)

    @admin.action(description="Terminate selected nodes now")
    def terminate_nodes(self, request: HttpRequest, queryset: QuerySet[Node]) -> None:
        self._each(request, queryset, services.node_terminate, "Terminating")

    @admin.action(description="Force stuck nodes to terminated (teardown keeps retrying)")
    def force_terminated(self, request: HttpRequest, queryset: QuerySet[Node]) -> None:
        self._each(request, queryset, services.node_force_terminated, "Forced to terminated:")

    @admin.action(description="Drain selected nodes (finish in-flight requests, then terminate)")
    def drain_nodes(self, request: HttpRequest, queryset: QuerySet[Node]) -> None:
        self._each(request, queryset, services.node_drain, "Draining")

    @admin.action(description="Relaunch selected nodes (replace with fresh ones)")
    def relaunch_nodes(self, request: HttpRequest, queryset: QuerySet[Node]) -> None:
        self._each(request, queryset, services.node_relaunch, "Relaunched")

    @admin.action(description="Check health now")
    def check_health_now(self, request: HttpRequest, queryset: QuerySet[Node]) -> None:
        summary = run_health_checks(list(queryset.values_list("pk", flat=True)[:1000]))
        changes = "; ".join(summary.transitions) or "no status changes"
        self.message_user(
            request,
            f"Checked {summary.checked} node(s) with an endpoint in {summary.seconds:.1f}s: "
            f"{summary.healthy} healthy; {changes}.",
        )

    # --- launch form and node page -------------------------------------------------------------

    def get_urls(self) -> list:
        custom = [path("launch/", self.admin_site.admin_view(self.launch_view), name="fleet_node_launch")]
        return custom + super().get_urls()

    def launch_view(self, request: HttpRequest) -> HttpResponse:
        if not self.has_view_or_change_permission(request) or not request.user.has_perm("fleet.change_node"):
            return HttpResponseRedirect(reverse("admin:index"))
        form = LaunchForm(request.POST or None)
        preview = ""
        if request.method == "POST" and form.is_valid():
            data = dict(form.cleaned_data)
            if "confirm" in request.POST:
                try:
                    nodes = services.node_request_launch(
                        model=data["model"], placement=_placement(data), count=data["count"], actor=_actor(request)
                    )
                except ValidationError as exc:
                    for field, errors in exc.message_dict.items():
                        form.add_error(field if field in form.fields else None, errors)
                else:
                    self.message_user(request, f"Launching {', '.join(str(n) for n in nodes)}.", messages.SUCCESS)
                    return HttpResponseRedirect(reverse("admin:fleet_node_changelist"))
            if form.is_valid():
                preview = _preview(data, form)
        context = {
            **self.admin_site.each_context(request),
            "title": "Launch nodes",
            "form": form,
            "preview": preview,
            "opts": self.model._meta,
            "media": self.media + form.media,
        }
        return TemplateResponse(request, "admin/fleet/node/launch.html", context)

    def change_view(
        self, request: HttpRequest, object_id: str, form_url: str = "", extra_context: dict | None = None
    ) -> HttpResponse:
        node = self.get_object(request, object_id)
        extra = dict(extra_context or {})
        if node is not None:
            extra["cold_start"] = cold_start_phases(node)
        return super().change_view(request, object_id, form_url, extra)


def _placement(data: dict[str, Any]) -> Placement:
    return Placement(
        launcher=data["launcher"],
        cloud=data["cloud"],
        region=data["region"],
        accelerator=data["accelerator"],
        use_spot=data["use_spot"],
        launch_profile=data["launch_profile"],
        endpoint_url=data["endpoint_url"],
    )


def _preview(data: dict[str, Any], form: LaunchForm) -> str:
    placement = _placement(data)
    node = Node(
        model=data["model"],
        **{**placement.as_kwargs(), "accelerator": placement.accelerator or data["model"].accelerator},
    )
    try:
        text = get_launcher(node.launcher).preview(node)
    except LaunchError as exc:
        form.add_error(None, exc.reason)
        return ""
    return text.replace("crosslogic-None", "<cluster name: prefix-node id>")


def cold_start_phases(node: Node) -> list[dict[str, object]]:
    """requested → provisioned → weights loaded → ready, with seconds per phase."""
    marks = [
        ("requested", node.requested_at),
        ("provisioned", node.provisioned_at),
        ("weights loaded", node.weights_loaded_at),
        ("ready", node.ready_at),
    ]
    phases: list[dict[str, object]] = []
    for (label, at), (_, previous) in zip(marks, [(None, None), *marks[:-1]], strict=True):
        seconds = (at - previous).total_seconds() if at and previous else None
        phases.append({"label": label, "at": at, "seconds": round(seconds, 1) if seconds is not None else None})
    return phases


@admin.register(NodeEvent)
class NodeEventAdmin(admin.ModelAdmin):
    """Append-only: nobody adds, edits or deletes history."""

    list_display = ["created_at", "node", "kind", "from_status", "to_status", "short_message", "actor"]
    list_filter = ["kind", "to_status"]
    search_fields = ["node__cluster_name", "message", "actor"]
    list_select_related = ["node"]
    show_full_result_count = False
    paginator = EstimatedCountPaginator
    raw_id_fields = ["node"]

    @admin.display(description="message")
    def short_message(self, obj: NodeEvent) -> str:
        return obj.message[:120]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(ScaleDecision)
class ScaleDecisionAdmin(admin.ModelAdmin):
    """The autoscaler's changes of desired replicas, with their inputs. Append-only."""

    list_display = ["created_at", "model", "previous", "desired", "short_reason"]
    list_filter = ["model"]
    search_fields = ["model__name", "reason"]
    list_select_related = ["model"]
    date_hierarchy = "created_at"

    @admin.display(description="reason")
    def short_reason(self, obj: ScaleDecision) -> str:
        return obj.reason[:160]

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
