from rest_framework.routers import DefaultRouter

from apps.metering import api

router = DefaultRouter(trailing_slash=True)
router.include_root_view = False
router.register("usage", api.UsageRecordViewSet, basename="usagerecord")

urlpatterns = router.urls
