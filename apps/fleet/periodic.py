"""Celery beat's fleet-wide passes (scheduled in django-celery-beat's tables, see migrations 0003
and 0005): health checks of every node and the reconciler. Each runs alone: a pass that outlasts
its interval is not overlapped by the next one.

They live apart from apps.fleet.tasks because the reconciler launches nodes through services,
which enqueue the node tasks: tasks → reconcile → services → enqueue → tasks would be a cycle.
"""

from __future__ import annotations

import logging

from celery import shared_task
from django.conf import settings

from apps.core import redis as redis_lib
from apps.fleet import autoscale, health, reconcile

log = logging.getLogger(__name__)


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
        log.info(
            "health: %d checked, %d healthy in %.2fs; %s",
            summary.checked,
            summary.healthy,
            summary.seconds,
            ", ".join(summary.transitions) or "no changes",
        )
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


@shared_task(ignore_result=True)
def fleet_autoscale(model_id: int | None = None, attempt: int = 0) -> None:
    """One autoscaler pass (beat: every FLEET_AUTOSCALE_INTERVAL_S; the gateway: enqueue_autoscale).
    The pass holds its own single-flight lock (autoscale.autoscale_run). A pass the gateway asked
    for that found another one running (it may have read the load before the request was held) is
    tried again a second later, a few times, rather than left to the next beat tick."""
    decisions = autoscale.autoscale_run(model_id=model_id)
    if model_id is not None and not decisions and attempt < 3:
        fleet_autoscale.apply_async(args=[model_id, attempt + 1], countdown=1)
    for decision in decisions:
        if decision.error:
            log.warning("autoscale: %s: %s", decision.model_name, decision.error)
