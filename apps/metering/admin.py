"""Usage records in the admin: read-only, and fast on tables with millions of rows."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.db.models import QuerySet
from django.http import HttpRequest

from apps.core.paginator import EstimatedCountPaginator
from apps.metering.display import dollars
from apps.metering.models import BudgetAlert, UsageRecord


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
        "prompt_tokens",
        "completion_tokens",
        "streamed",
        "estimated",
        "ttft_ms",
        "latency_ms",
        "cost_micros",
    )
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
