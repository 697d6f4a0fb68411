"""ASGI entry point: the gateway serves /v1/*, /health and /ready; Django serves the rest."""

import os

from django.core.asgi import get_asgi_application

from crosslogic.server import LogBodyDisconnects

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "crosslogic.settings")
django_application = LogBodyDisconnects(get_asgi_application())

from apps.gateway.app import Gateway  # noqa: E402 - needs the app registry that get_asgi_application() set up

application = Gateway(django_application)
