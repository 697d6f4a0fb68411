from django.contrib import admin
from django.http import HttpResponseRedirect
from django.templatetags.static import static
from django.urls import include, path
from django.views.generic import RedirectView
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

# The staff cockpit names the product (Django's defaults say "Django administration").
admin.site.site_header = "CrossLogic"
admin.site.site_title = "CrossLogic admin"
admin.site.index_title = "Control plane"

urlpatterns = [
    # Nothing is served at the root: people who open the bare host are staff looking for the admin.
    path("", RedirectView.as_view(pattern_name="admin:index", permanent=False), name="root"),
    # Browsers ask for /favicon.ico on pages that name no icon (the API docs, error pages).
    path("favicon.ico", lambda request: HttpResponseRedirect(static("favicon.svg")), name="favicon"),
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
