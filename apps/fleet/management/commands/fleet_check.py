"""``manage.py fleet_check``: can this control plane launch SkyPilot nodes? Exits non-zero if not."""

from __future__ import annotations

from typing import Any

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from apps.fleet import sky
from apps.fleet.launchers.base import LaunchError


class Command(BaseCommand):
    help = "Check the SkyPilot API server, its enabled clouds and the fleet settings nodes depend on."

    def handle(self, *args: Any, **opts: Any) -> None:
        self.stdout.write(f"control plane URL (nodes register here): {settings.CONTROL_PLANE_URL}")
        if not getattr(settings, "R2_ENDPOINT_URL", ""):
            self.stderr.write("warning: R2_ENDPOINT_URL is empty: SkyPilot nodes cannot stream weights")
        try:
            version, clouds = sky.server_report()
        except LaunchError as exc:
            raise CommandError(exc.reason) from exc
        self.stdout.write(f"SkyPilot API server {settings.SKYPILOT_API_SERVER_ENDPOINT}: version {version}")
        if not clouds:
            raise CommandError("no cloud is enabled on the SkyPilot API server: run `sky check` there.")
        self.stdout.write("enabled clouds: " + ", ".join(clouds))
