"""Usage records in the admin: read-only, and fast on tables with millions of rows."""

from __future__ import annotations

from django.contrib import admin
from django.http import HttpRequest

from apps.core.paginator import EstimatedCountPaginator
from apps.metering.models import UsageRecord


@admin.register(UsageRecord)
class UsageRecordAdmin(admin.ModelAdmin):
    list_display = (
        "created_at", "request_id", "tenant", "api_key", "model_name", "node", "status_code",
        "prompt_tokens", "completion_tokens", "streamed", "estimated", "ttft_ms", "latency_ms", "cost_micros",
    )
    list_select_related = ("tenant", "api_key", "node")
    list_filter = ("status_code", "streamed", "estimated", "endpoint", "tenant")
    # Exact-match lookups only: a substring search over millions of rows would scan them all.
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
