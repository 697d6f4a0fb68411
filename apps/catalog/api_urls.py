from rest_framework.routers import DefaultRouter

from apps.catalog import api

router = DefaultRouter(trailing_slash=True)
router.include_root_view = False
router.register("models", api.ModelViewSet, basename="model")

urlpatterns = router.urls
