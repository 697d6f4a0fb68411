"""The launcher interface: one per backend (skypilot, local, static), chosen by Node.launcher.

A launcher only talks to its backend and keeps its bookkeeping in ``node.launcher_state``; status
changes stay in apps.fleet.lifecycle / apps.fleet.transitions, so every backend walks the same
state machine: pending → provisioning → (registration) loading → (health check) ready.
"""

from __future__ import annotations

import enum
from abc import ABC, abstractmethod
from dataclasses import dataclass, field

from apps.fleet.models import Node


class LaunchError(Exception):
    """The launch cannot succeed; ``reason`` becomes the node's status reason."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class RetryableLaunchError(LaunchError):
    """A transient problem (API server unreachable): try again later, then give up."""


class Progress(enum.Enum):
    WAITING = "waiting"  # the backend is still working: poll again later
    LAUNCHED = "launched"  # the machine runs our job; registration follows from the node
    GONE = "gone"  # the backend has no trace of it (cluster vanished, process exited)


@dataclass
class PollResult:
    progress: Progress
    state: dict[str, object] = field(default_factory=dict)  # merged into launcher_state
    endpoint_url: str = ""
    message: str = ""
    placement: dict[str, str] = field(default_factory=dict)  # cloud/region/accelerator actually chosen


@dataclass
class Secrets:
    """What a node needs and nobody else may see: passed to the backend, never stored."""

    registration_token: str
    vllm_api_key: str


class Launcher(ABC):
    name: str
    # True when launch() returns before the machine is up and poll() must be called.
    asynchronous: bool = False
    # True when the node calls POST /api/v1/nodes/register itself once vLLM answers.
    self_registers: bool = True

    @abstractmethod
    def preview(self, node: Node) -> str:
        """What will run, as text for staff, with every secret redacted."""

    @abstractmethod
    def launch(self, node: Node, secrets: Secrets) -> dict[str, object]:
        """Start the node; return bookkeeping to store in launcher_state."""

    def poll(self, node: Node) -> PollResult:
        return PollResult(Progress.LAUNCHED)

    @abstractmethod
    def terminate(self, node: Node) -> bool:
        """Tear down (idempotent). True when it is gone; False when teardown is still running."""

    @abstractmethod
    def exists(self, node: Node) -> bool | None:
        """Whether the machine/process still exists; None when it cannot be known right now."""

    # Warm pool (apps.fleet.warm). True when a stopped node resumes as it was (same process,
    # endpoint and registration); False when the restart goes through the launch step again.
    restarts_in_place: bool = False

    def can_stop(self, node: Node) -> bool:
        """Whether the node's machine can be stopped (disk kept) instead of torn down."""
        return False

    def stop(self, node: Node) -> bool:
        """Stop the machine, keeping its disk (idempotent). True when stopped; False while stopping."""
        raise LaunchError(f"the {self.name} launcher cannot stop a node")

    def resume(self, node: Node) -> None:
        """Restart a stopped node in place (only when ``restarts_in_place``)."""
        raise LaunchError(f"the {self.name} launcher cannot resume a node in place")
