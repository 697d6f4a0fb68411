"""Static launcher: a vLLM server someone else runs. We only health-check and route to it."""

from __future__ import annotations

from apps.fleet.launchers.base import Launcher, LaunchError, Secrets
from apps.fleet.models import Node


class StaticLauncher(Launcher):
    name = "static"
    self_registers = False

    def preview(self, node: Node) -> str:
        return f"# no machine is started: the node is the existing endpoint\n{node.endpoint_url or '<endpoint URL>'}\n"

    def launch(self, node: Node, secrets: Secrets) -> dict[str, object]:
        if not node.endpoint_url:
            raise LaunchError("a static node needs an endpoint URL")
        return {}

    def terminate(self, node: Node) -> bool:
        return True  # not ours to stop: we just stop routing to it

    def exists(self, node: Node) -> bool | None:
        return True

    def log_tail(self, node: Node, *, lines: int = 40) -> str:
        return "Not available: a static node's vLLM runs elsewhere, and its log stays there."
