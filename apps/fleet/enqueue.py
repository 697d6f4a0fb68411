"""The one place fleet work is queued. Each function imports its task itself (a renamed task fails
at import, not when a node is launched) and sends it once the caller's transaction commits, so
the worker never reads a node row that is not there yet or was rolled back."""

from __future__ import annotations

from django.db import transaction

from apps.fleet.tasks import (
    node_check_health_task,
    node_launch_poll_task,
    node_launch_task,
    node_stop_task,
    node_teardown_task,
)


def enqueue_node_launch(*, node_id: int) -> None:
    transaction.on_commit(lambda: node_launch_task.delay(node_id))


def enqueue_node_poll(*, node_id: int) -> None:
    """Follow an asynchronous launch again (the reconciler resumes a poll chain that was lost)."""
    transaction.on_commit(lambda: node_launch_poll_task.delay(node_id))


def enqueue_node_teardown(*, node_id: int) -> None:
    transaction.on_commit(lambda: node_teardown_task.delay(node_id))


def enqueue_node_stop(*, node_id: int) -> None:
    """Stop a drained node's machine for the warm pool (apps.fleet.warm)."""
    transaction.on_commit(lambda: node_stop_task.delay(node_id))


def enqueue_health_check(*, node_ids: list[int]) -> None:
    transaction.on_commit(lambda: node_check_health_task.delay(list(node_ids)))
