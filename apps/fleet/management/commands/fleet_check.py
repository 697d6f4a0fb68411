"""``manage.py fleet_check``: can this control plane launch SkyPilot nodes? Exits non-zero if not."""

from __future__ import annotations

import ipaddress
from typing import Any
from urllib.parse import urlparse

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from apps.fleet import sky
from apps.fleet.launchers.base import LaunchError
from apps.fleet.launchers.skypilot import node_r2_credentials


def is_loopback(url: str) -> bool:
    host = (urlparse(url).hostname or "").lower()
    if host in {"localhost", "localhost.localdomain"} or host.endswith(".localhost"):
        return True
    try:
        address = ipaddress.ip_address(host)
    except ValueError:
        return False
    return address.is_loopback or address.is_unspecified


def setting_problems() -> tuple[list[str], list[str]]:
    """(problems, warnings): what would break or leak on a real launch, from the settings alone."""
    problems, warnings = [], []
    if is_loopback(settings.CONTROL_PLANE_URL):
        problems.append(
            f"CONTROL_PLANE_URL is {settings.CONTROL_PLANE_URL}, a loopback address: each GPU node "
            "would call itself to register. Set the control plane's public URL."
        )
    endpoint = settings.SKYPILOT_API_SERVER_ENDPOINT
    if endpoint and urlparse(endpoint).scheme == "http" and not is_loopback(endpoint):
        host = urlparse(endpoint).hostname or ""
        message = (
            f"SKYPILOT_API_SERVER_ENDPOINT is {endpoint}: plain http to another host, and every launch "
            "request carries the node's secrets (R2 token, vLLM key). Put the API server behind https."
        )
        if "." in host or ":" in host:
            problems.append(message)
        else:  # a bare service name (docker-compose's "skypilot"): a private network on this host
            warnings.append(message + " (Fine only on a private container network on this host.)")
    try:
        node_r2_credentials()
    except LaunchError as exc:
        problems.append(exc.reason)
    return problems, warnings


class Command(BaseCommand):
    help = "Check the SkyPilot API server, its enabled clouds and the fleet settings nodes depend on."

    def handle(self, *args: Any, **opts: Any) -> None:
        self.stdout.write(f"control plane URL (nodes register here): {settings.CONTROL_PLANE_URL}")
        if not getattr(settings, "R2_ENDPOINT_URL", ""):
            self.stderr.write("warning: R2_ENDPOINT_URL is empty: SkyPilot nodes cannot stream weights")
        if not (settings.SKYPILOT_SERVICE_ACCOUNT_TOKEN or settings.SKYPILOT_USER_ID):
            self.stderr.write(
                "warning: neither SKYPILOT_SERVICE_ACCOUNT_TOKEN nor SKYPILOT_USER_ID is set: each "
                "worker host acts as its own SkyPilot user (docs/fleet.md, 'SkyPilot identity')"
            )
        problems, warnings = setting_problems()
        for warning in warnings:
            self.stderr.write(f"warning: {warning}")
        try:
            version, clouds = sky.server_report()
        except LaunchError as exc:
            raise CommandError("\n".join([exc.reason, *problems])) from exc
        self.stdout.write(f"SkyPilot API server {settings.SKYPILOT_API_SERVER_ENDPOINT}: version {version}")
        if not clouds:
            problems.insert(0, "no cloud is enabled on the SkyPilot API server: run `sky check` there.")
        else:
            self.stdout.write("enabled clouds: " + ", ".join(clouds))
        if problems:
            raise CommandError("\n".join(problems))
