"""The staff dashboard: a page under the admin, and the JSON it refetches every DASHBOARD_REFRESH_S.

Both are wrapped in ``admin.site.admin_view``: staff only (anyone else goes to the admin login),
never cached by the browser. Ids of the page's elements are listed in docs/economics.md (the
browser test relies on them).
"""

from __future__ import annotations

from django.conf import settings
from django.contrib import admin
from django.http import HttpRequest, HttpResponse, JsonResponse
from django.template.response import TemplateResponse
from django.urls import reverse
from django.views.decorators.cache import never_cache

from apps.metering.dashboard import dashboard_data


@never_cache
def dashboard(request: HttpRequest) -> HttpResponse:
    context = {
        **admin.site.each_context(request),
        "title": "Dashboard",
        "data": dashboard_data(),
        "data_url": reverse("metering-dashboard-data"),
        "refresh_seconds": settings.DASHBOARD_REFRESH_S,
    }
    return TemplateResponse(request, "admin/metering/dashboard.html", context)


@never_cache
def dashboard_json(request: HttpRequest) -> JsonResponse:
    return JsonResponse(dashboard_data())


dashboard_view = admin.site.admin_view(dashboard)
dashboard_data_view = admin.site.admin_view(dashboard_json)
