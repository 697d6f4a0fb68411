"""Launchers by name. ``get_launcher(node.launcher)`` is the one way to reach a backend."""

from __future__ import annotations

from apps.fleet.launchers.base import Launcher
from apps.fleet.launchers.local import LocalLauncher
from apps.fleet.launchers.skypilot import SkyPilotLauncher
from apps.fleet.launchers.static import StaticLauncher

_BY_NAME: dict[str, type[Launcher]] = {"skypilot": SkyPilotLauncher, "local": LocalLauncher, "static": StaticLauncher}


def get_launcher(name: str) -> Launcher:
    if name not in _BY_NAME:
        raise ValueError(f"unknown launcher {name!r}")
    return _BY_NAME[name]()
