"""Admin pages for the rollups and Stripe billing (imported by apps.metering.admin).

Rollups are read-only (rebuild them with ``manage.py rebuild_usage_rollups``); Stripe customers
are edited here; meter events are read-only but can be queued again."""

from __future__ import annotations

from django.contrib import admin, messages
from django.db.models import QuerySet
from django.http import HttpRequest
from django.utils import timezone

from apps.metering.models import MeterEventStatus, StripeCustomer, StripeMeterEvent, UsageRollup, UsageRollupHour
from apps.metering.summary import micros_to_usd


class _ReadOnly(admin.ModelAdmin):
    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False

    def has_delete_permission(self, request: HttpRequest, obj: object = None) -> bool:
        return False


@admin.register(UsageRollup)
class UsageRollupAdmin(_ReadOnly):
    list_display = (
        "hour",
        "tenant",
        "api_key_prefix",
        "model_name",
        "requests",
        "errors_4xx",
        "errors_429",
        "errors_5xx",
        "prompt_tokens",
        "completion_tokens",
        "cost",
    )
    list_select_related = ("tenant",)
    search_fields = ("=tenant__slug", "=api_key_prefix", "=model_name")
    date_hierarchy = "hour"
    show_full_result_count = False
    raw_id_fields = ("tenant", "api_key", "model")
    exclude = ("ttft_hist", "latency_hist")

    @admin.display(description="Cost (USD)", ordering="cost_micros")
    def cost(self, obj: UsageRollup) -> str:
        return f"${micros_to_usd(obj.cost_micros)}"


@admin.register(UsageRollupHour)
class UsageRollupHourAdmin(_ReadOnly):
    list_display = ("hour", "built_at", "records", "max_record_id", "pruned_at")
    date_hierarchy = "hour"
    show_full_result_count = False


@admin.register(StripeCustomer)
class StripeCustomerAdmin(admin.ModelAdmin):
    list_display = ("tenant", "customer_id", "created_at")
    search_fields = ("=tenant__slug", "=customer_id")
    raw_id_fields = ("tenant",)


@admin.register(StripeMeterEvent)
class StripeMeterEventAdmin(_ReadOnly):
    list_display = ("identifier", "tenant", "hour", "meter", "value", "status", "attempts", "last_error", "sent_at")
    list_filter = ("status", "meter")
    list_select_related = ("tenant",)
    search_fields = ("=identifier", "=tenant__slug", "=customer_id")
    date_hierarchy = "hour"
    show_full_result_count = False
    actions = ["resend_now"]

    @admin.action(description="Resend the selected failed events at the next run")
    def resend_now(self, request: HttpRequest, queryset: QuerySet[StripeMeterEvent]) -> None:
        count = queryset.filter(status=MeterEventStatus.FAILED).update(next_attempt_at=timezone.now())
        self.message_user(request, f"{count} failed event(s) will be resent by the next hourly run.", messages.SUCCESS)
