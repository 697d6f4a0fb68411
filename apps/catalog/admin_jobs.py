"""Admin pages for every weight upload and verification across the catalog (read-only)."""

from __future__ import annotations

from typing import Any

from django.contrib import admin
from django.http import HttpRequest

from apps.catalog.admin_parts import upload_source_text
from apps.catalog.models import WeightUpload, WeightVerification


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
        return upload_source_text(obj.source)


@admin.register(WeightVerification)
class WeightVerificationAdmin(_JobAdmin):
    list_display = ("id", "model", "status", "full", "checked", "origin", "requested_by", "started_at", "finished_at")
    list_filter = ("status", "full", "origin", "model")
    search_fields = ("model__name", "uri")
    date_hierarchy = "started_at"
