"""Celery tasks for one node: thin wrappers that take ids and call apps.fleet.lifecycle / health.

Each lifecycle step claims its move with a conditional UPDATE and records a failure on the node,
so a task delivered twice does nothing the second time. Enqueue them through apps.fleet.enqueue.
The fleet-wide passes that beat runs are in apps.fleet.periodic: they reach services, which enqueue
these, so they cannot live here without an import cycle.
"""

from __future__ import annotations

import logging

from celery import shared_task

from apps.fleet import health, lifecycle
from apps.fleet.models import Node

log = logging.getLogger(__name__)


def _follow(node_id: int, step: lifecycle.Step) -> None:
    if step.again_in is None:
        return
    task = {
        "launch": node_launch_task,
        "poll": node_launch_poll_task,
        "teardown": node_teardown_task,
        "stop": node_stop_task,
    }[step.then]
    task.apply_async(args=[node_id], countdown=step.again_in)


@shared_task(ignore_result=True)
def node_launch_task(node_id: int) -> None:
    try:
        _follow(node_id, lifecycle.launch_node(node_id))
    except Node.DoesNotExist:
        log.info("node %s vanished before its launch", node_id)


@shared_task(ignore_result=True)
def node_launch_poll_task(node_id: int) -> None:
    try:
        _follow(node_id, lifecycle.poll_launch(node_id))
    except Node.DoesNotExist:
        return


@shared_task(ignore_result=True)
def node_teardown_task(node_id: int) -> None:
    try:
        _follow(node_id, lifecycle.teardown_node(node_id))
    except Node.DoesNotExist:
        return


@shared_task(ignore_result=True)
def node_stop_task(node_id: int) -> None:
    try:
        _follow(node_id, lifecycle.stop_node(node_id))
    except Node.DoesNotExist:
        return


@shared_task(ignore_result=True)
def node_check_health_task(node_ids: list[int]) -> None:
    health.run_health_checks(node_ids)
