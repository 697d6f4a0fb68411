"""Celery tasks: thin wrappers that take ids and call apps.fleet.lifecycle / health / reconcile."""

from __future__ import annotations

import logging

from celery import shared_task
from django.conf import settings

from apps.core import redis as redis_lib
from apps.fleet import health, lifecycle, reconcile
from apps.fleet.models import Node

log = logging.getLogger(__name__)


def _follow(node_id: int, step: lifecycle.Step) -> None:
    if step.again_in is None:
        return
    task = {"launch": node_launch_task, "poll": node_launch_poll_task, "teardown": node_teardown_task}[step.then]
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
def node_check_health_task(node_ids: list[int]) -> None:
    health.run_health_checks(node_ids)


def _single_flight(name: str, ttl_s: int) -> bool:
    """True if this run may proceed: a periodic pass must not overlap the previous one."""
    client = redis_lib.client()
    if client is None:
        return True
    try:
        return bool(client.set(f"crosslogic:fleet:{name}", "1", nx=True, ex=max(1, ttl_s)))
    except Exception:  # Redis down: better to check twice than never
        return True


def _release(name: str) -> None:
    client = redis_lib.client()
    if client is not None:
        try:
            client.delete(f"crosslogic:fleet:{name}")
        except Exception:
            log.warning("could not release the %s lock; it expires by itself", name)


@shared_task(ignore_result=True)
def fleet_health_check() -> None:
    if not _single_flight("health", settings.FLEET_HEALTH_INTERVAL_S * 4):
        return
    try:
        summary = health.run_health_checks()
        log.info("health: %d checked, %d healthy in %.2fs; %s", summary.checked, summary.healthy,
                 summary.seconds, ", ".join(summary.transitions) or "no changes")
    finally:
        _release("health")


@shared_task(ignore_result=True)
def fleet_reconcile() -> None:
    if not _single_flight("reconcile", settings.FLEET_RECONCILE_INTERVAL_S * 4):
        return
    try:
        report = reconcile.reconcile()
        for error in report.errors:
            log.warning("reconcile: %s", error)
    finally:
        _release("reconcile")
