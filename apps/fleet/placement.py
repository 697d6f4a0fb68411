"""Placement: what a launch asks for (which launcher, where, on what), as one value.

The launch API, the admin form, a relaunch and the reconciler's replacements all pass one of these
to services.node_request_launch instead of writing the arguments out each time.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any

from apps.fleet.models import Launcher, LaunchProfile, Node


@dataclass(frozen=True)
class Placement:
    launcher: str = ""  # empty: settings.FLEET_DEFAULT_LAUNCHER
    cloud: str = ""  # empty: any (SkyPilot chooses)
    region: str = ""
    accelerator: str = ""  # empty: the model's recommendation
    use_spot: bool = True
    launch_profile: LaunchProfile | None = None  # SkyPilot: an ordered failover list; overrides cloud/region
    endpoint_url: str = ""  # static launcher only: the running vLLM server

    @classmethod
    def of(cls, node: Node) -> Placement:
        """The placement a replacement of ``node`` gets. Only a static node keeps its endpoint:
        a launched node's endpoint belonged to the machine that is going away."""
        return cls(
            launcher=node.launcher,
            cloud=node.cloud,
            region=node.region,
            accelerator=node.accelerator,
            use_spot=node.use_spot,
            launch_profile=node.launch_profile,
            endpoint_url=node.endpoint_url if node.launcher == Launcher.STATIC else "",
        )

    def as_kwargs(self) -> dict[str, Any]:
        """The fields by name (dataclasses.asdict would deep-copy the launch profile row)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}
