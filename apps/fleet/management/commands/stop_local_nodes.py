"""Stop every local-launcher node (simulator processes on this machine) and mark it terminated.

`make run` calls this on Ctrl-C: local nodes are detached processes that would otherwise
outlive the development server. Real (SkyPilot) nodes are never touched.
"""

from __future__ import annotations

import contextlib
from typing import Any

from django.core.management.base import BaseCommand

from apps.fleet.lifecycle import teardown_node
from apps.fleet.models import LIVE_STATUSES, WARM_STATUSES, Launcher, Node, NodeStatus
from apps.fleet.services import node_terminate
from apps.fleet.transitions import IllegalTransition


class Command(BaseCommand):
    help = "Terminate all local-launcher nodes now (their processes are stopped); SkyPilot nodes are left alone."

    def handle(self, *args: Any, **options: Any) -> None:
        nodes = Node.objects.filter(
            launcher=Launcher.LOCAL,
            status__in=[*LIVE_STATUSES, *WARM_STATUSES, NodeStatus.TERMINATING, NodeStatus.FAILED],  # paused ones too
        )
        stopped = 0
        for node in nodes:
            if node.status == NodeStatus.FAILED and node.launcher_state.get("torn_down"):
                continue
            if node.status not in {NodeStatus.TERMINATING, NodeStatus.FAILED}:
                with contextlib.suppress(IllegalTransition):
                    node = node_terminate(node=node, actor="stop_local_nodes", reason="development server stopped")
            if node.status != NodeStatus.TERMINATED:
                teardown_node(node.pk)
            stopped += 1
        self.stdout.write(f"stopped {stopped} local node(s)")
