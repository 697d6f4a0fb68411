from rest_framework.routers import DefaultRouter

from apps.tenancy import api

router = DefaultRouter(trailing_slash=True)
router.include_root_view = False
router.register("tenants", api.TenantViewSet, basename="tenant")
router.register("keys", api.ApiKeyViewSet, basename="apikey")
router.register("staff-tokens", api.StaffTokenViewSet, basename="stafftoken")

urlpatterns = router.urls
