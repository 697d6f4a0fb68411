"""Mounted at /admin/dashboard/ by crosslogic/urls.py, ahead of the admin's own catch-all."""

from django.urls import path

from apps.metering.views import dashboard_data_view, dashboard_view

urlpatterns = [
    path("", dashboard_view, name="metering-dashboard"),
    path("data.json", dashboard_data_view, name="metering-dashboard-data"),
]
