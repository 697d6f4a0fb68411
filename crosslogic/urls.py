from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

urlpatterns = [
    # The staff dashboard (charts, economics) lives under the admin but is not a ModelAdmin.
    path("admin/dashboard/", include("apps.metering.dashboard_urls")),
    path("admin/", admin.site.urls),
    # The management API: each domain app contributes its own api_urls under /api/v1/.
    path("api/v1/", include("apps.tenancy.api_urls")),
    path("api/v1/", include("apps.catalog.api_urls")),
    path("api/v1/", include("apps.fleet.api_urls")),
    path("api/v1/", include("apps.metering.api_urls")),
    path("api/schema/", SpectacularAPIView.as_view(), name="schema"),
    path("api/docs/", SpectacularSwaggerView.as_view(url_name="schema"), name="swagger-ui"),
    path("", include("apps.gateway.urls")),
]

# Errors raised outside a DRF view (unknown URL, oversize body, uncaught exception): JSON under /api/.
handler400 = "apps.core.http_errors.bad_request"
handler403 = "apps.core.http_errors.permission_denied"
handler404 = "apps.core.http_errors.page_not_found"
handler500 = "apps.core.http_errors.server_error"
