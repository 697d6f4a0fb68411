"""Run the autoscaler now: the gateway's entry point when it starts holding requests for a model.

Its own module rather than apps.fleet.enqueue: the autoscaler's task sits above the services it
scales through (periodic → autoscale → replicas → services → enqueue), so enqueue, which every
service imports, cannot import it without a cycle. Nothing in the fleet imports this module.
"""

from __future__ import annotations

from django.db import transaction

from apps.core import redis as redis_lib
from apps.fleet import demand
from apps.fleet.periodic import fleet_autoscale


def enqueue_autoscale(*, model_id: int | None = None) -> bool:
    """Run the autoscaler now (for ``model_id``, or every model) instead of at its next beat tick.

    Deduplicated through Redis: at most one run per model per demand.TRIGGER_TTL_S (2 s), so a
    burst of held requests queues one task. Returns whether a run was queued. Synchronous (Redis
    and the broker): from async code call it through ``asyncio.to_thread`` or ``sync_to_async``.
    Outside a transaction the task is sent at once; inside one, when it commits.
    """
    if not demand.claim_trigger(redis_lib.client(), model_id=model_id):
        return False
    transaction.on_commit(lambda: fleet_autoscale.delay(model_id))
    return True
