from django.urls import path
from rest_framework.routers import DefaultRouter

from apps.metering import api, summary_api

router = DefaultRouter(trailing_slash=True)
router.include_root_view = False
router.register("usage", api.UsageRecordViewSet, basename="usagerecord")

# Before the router: its usage/<pk>/ (and usage/<pk>.<format>) patterns would take these names.
urlpatterns = [
    path("usage/summary/", summary_api.UsageSummaryView.as_view(), name="usage-summary"),
    path("usage/export.csv", summary_api.UsageExportView.as_view(), name="usage-export"),
    *router.urls,
]
