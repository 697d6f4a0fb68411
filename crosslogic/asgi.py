"""ASGI entry point. The gateway mounts its raw ASGI app for /v1/ in front of Django here."""

import os

from django.core.asgi import get_asgi_application

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "crosslogic.settings")
application = get_asgi_application()
