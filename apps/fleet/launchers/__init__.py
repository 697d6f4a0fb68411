"""Launchers by name. ``get_launcher(node.launcher)`` is the one way to reach a backend."""

from __future__ import annotations

from apps.fleet.launchers.base import Launcher


def get_launcher(name: str) -> Launcher:
    if name == "skypilot":
        from apps.fleet.launchers.skypilot import SkyPilotLauncher

        return SkyPilotLauncher()
    if name == "local":
        from apps.fleet.launchers.local import LocalLauncher

        return LocalLauncher()
    if name == "static":
        from apps.fleet.launchers.static import StaticLauncher

        return StaticLauncher()
    raise ValueError(f"unknown launcher {name!r}")
