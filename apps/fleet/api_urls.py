from django.urls import URLPattern, URLResolver, re_path
from rest_framework.routers import DefaultRouter

from apps.fleet import api

router = DefaultRouter(trailing_slash=True)
router.include_root_view = False
router.register("nodes", api.NodeViewSet, basename="node")

urlpatterns: list[URLPattern | URLResolver] = [
    re_path(r"^nodes/register/?$", api.NodeRegisterView.as_view(), name="node-register"),
    *router.urls,
]
