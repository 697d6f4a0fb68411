"""/api/v1/: each domain app contributes its own api_urls."""

from django.urls import include, path

urlpatterns = [
    path("", include("apps.tenancy.api_urls")),
    path("", include("apps.catalog.api_urls")),
    path("", include("apps.fleet.api_urls")),
    path("", include("apps.metering.api_urls")),
]
