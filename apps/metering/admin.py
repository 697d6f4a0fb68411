"""Usage records in the admin: read-only, and fast on tables with millions of rows."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest, HttpResponse

from apps.core import formatting
from apps.core.paginator import EstimatedCountPaginator
from apps.metering.display import dollars
from apps.metering.models import BudgetAlert, UsageRecord
from apps.metering.selectors import usage_queryset_totals


class StatusClassFilter(admin.SimpleListFilter):
    """Fixed choices: a field filter on status_code would run SELECT DISTINCT over every row."""

    title = "status"
    parameter_name = "status_class"
    _RANGES = {"2xx": (200, 300), "4xx": (400, 500), "5xx": (500, 600)}

    def lookups(self, request: HttpRequest, model_admin: Any) -> list[tuple[str, str]]:
        return [("2xx", "Success (2xx)"), ("4xx", "Client error (4xx)"), ("5xx", "Server error (5xx)")]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        bounds = self._RANGES.get(self.value() or "")
        if bounds is None:
            return queryset
        return queryset.filter(status_code__gte=bounds[0], status_code__lt=bounds[1])


@admin.register(UsageRecord)
class UsageRecordAdmin(admin.ModelAdmin):
    list_display = (
        "created_at",
        "request_id",
        "tenant",
        "api_key",
        "model_name",
        "node",
        "status_code",
        "prompt",
        "completion",
        "streamed",
        "estimated",
        "ttft",
        "latency",
        "cost",
    )
    fields = (
        "request_id",
        "created_at",
        "tenant",
        "api_key",
        "model",
        "model_name",
        "node",
        "endpoint",
        "status_code",
        "prompt",
        "completion",
        "estimated",
        "streamed",
        "ttft",
        "latency",
        "cost",
    )
    readonly_fields = ("prompt", "completion", "ttft", "latency", "cost")
    list_select_related = ("tenant", "api_key", "node")
    # Only filters with fixed choices: a tenant or model sidebar would list every row's value.
    list_filter = (StatusClassFilter, "streamed", "estimated")
    # Exact-match lookups only: a substring search over millions of rows would scan them all.
    # Filter by tenant, key or model by typing its slug, prefix or served name in the search box.
    search_fields = ("=request_id", "=tenant__slug", "=api_key__prefix", "=model_name")
    date_hierarchy = "created_at"
    ordering = ("-created_at",)
    show_full_result_count = False
    paginator = EstimatedCountPaginator
    list_per_page = 100
    # Raw ids: rendering a <select> of every key or node on the detail page would be slow.
    raw_id_fields = ("tenant", "api_key", "model", "node")

    @admin.display(description="Prompt tokens", ordering="prompt_tokens")
    def prompt(self, obj: UsageRecord) -> str:
        return formatting.count(obj.prompt_tokens)

    @admin.display(description="Completion tokens", ordering="completion_tokens")
    def completion(self, obj: UsageRecord) -> str:
        return formatting.count(obj.completion_tokens)

    @admin.display(description="Time to first token", ordering="ttft_ms")
    def ttft(self, obj: UsageRecord) -> str:
        return formatting.milliseconds(obj.ttft_ms)

    @admin.display(description="Latency", ordering="latency_ms")
    def latency(self, obj: UsageRecord) -> str:
        return formatting.milliseconds(obj.latency_ms)

    @admin.display(description="Cost", ordering="cost_micros")
    def cost(self, obj: UsageRecord) -> str:
        return formatting.dollars_from_micros(obj.cost_micros)

    def changelist_view(self, request: HttpRequest, extra_context: dict | None = None) -> HttpResponse:
        response = super().changelist_view(request, extra_context)
        context = getattr(response, "context_data", None)
        if context and "cl" in context:
            # The list's own filtered queryset (filters, search, date drill-down): one aggregate.
            totals = usage_queryset_totals(context["cl"].queryset)
            context["usage_totals"] = {
                "requests": formatting.count(totals["requests"]),
                "prompt_tokens": formatting.count(totals["prompt_tokens"]),
                "completion_tokens": formatting.count(totals["completion_tokens"]),
                "tokens": formatting.count(totals["tokens"]),
                "cost": formatting.dollars_from_micros(totals["cost_micros"]),
            }
        return response

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False  # the gateway writes usage; nobody edits billing history

    def has_change_permission(self, request: HttpRequest, obj: UsageRecord | None = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: UsageRecord | None = None) -> bool:
        return False


@admin.register(BudgetAlert)
class BudgetAlertAdmin(admin.ModelAdmin):
    """Budget alerts as raised by beat (apps.metering.services.budget_alerts_raise): read-only."""

    list_display = ("created_at", "owner", "tenant", "api_key", "month", "level", "spend", "limit", "notified_at")
    list_select_related = ("tenant", "api_key")
    list_filter = ("level", "month")
    search_fields = ("=tenant__slug", "=api_key__prefix", "=owner")
    ordering = ("-created_at",)
    raw_id_fields = ("tenant", "api_key")

    @admin.display(description="spend", ordering="spend_micros")
    def spend(self, alert: BudgetAlert) -> str:
        return dollars(alert.spend_micros)

    @admin.display(description="limit", ordering="limit_micros")
    def limit(self, alert: BudgetAlert) -> str:
        return dollars(alert.limit_micros)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: BudgetAlert | None = None) -> bool:
        return False


# The rollup and Stripe pages live in their own module (registered on import).
from apps.metering import admin_rollups  # noqa: E402, F401
