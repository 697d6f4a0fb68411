from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView, SpectacularSwaggerView

# A URL under /api/ that matches no route answers JSON like every other API error.
handler404 = "apps.core.api.not_found"

urlpatterns = [
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
