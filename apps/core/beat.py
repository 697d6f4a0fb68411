"""Celery beat's scheduler: django-celery-beat's DatabaseScheduler (schedules editable in the
admin) that sends only while it holds a lease in Redis, so a second beat started by mistake (a
rolling deploy, a copy-pasted service, an operator's shell) stands by instead of doubling every
periodic pass (health checks twice as often mark nodes unhealthy in half the time; reconcile
passes back to back).

The lease is one key, ``crosslogic:beat:leader``, holding the beat's own random id with a TTL of
BEAT_LEASE_S; the holder refreshes it on every tick (ticks are at most BEAT_LEASE_S / 3 apart), a
standby tries to take it on every tick. If the holder dies, a standby takes over within
BEAT_LEASE_S. Without Redis (embedded development mode) or while Redis cannot be reached, the
beat sends as a plain DatabaseScheduler would: the broker is Redis too, so nothing would be
sent twice in that case anyway, and the passes guard against overlap themselves (fleet/periodic.py).
"""

from __future__ import annotations

import logging
import os
import secrets
import socket
from typing import Any

from django.conf import settings
from django_celery_beat.schedulers import DatabaseScheduler

from apps.core import redis as redis_lib

log = logging.getLogger(__name__)

LEASE_KEY = "crosslogic:beat:leader"
# Take the lease if free, or refresh it if it is ours; 1 when we hold it afterwards.
_HOLD = """
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return 1 end
if redis.call('GET', KEYS[1]) == ARGV[1] then redis.call('PEXPIRE', KEYS[1], ARGV[2]) return 1 end
return 0
"""
_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class SingleBeatScheduler(DatabaseScheduler):
    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.beat_id = f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(4)}"
        self.leading: bool | None = None  # unknown until the first tick
        super().__init__(*args, **kwargs)

    def _hold_lease(self) -> bool:
        client = redis_lib.client()
        if client is None:
            return True
        try:
            held = bool(client.eval(_HOLD, 1, LEASE_KEY, self.beat_id, int(settings.BEAT_LEASE_S * 1000)))
        except Exception as exc:  # Redis away: behave as a plain DatabaseScheduler (see the module doc)
            if self.leading is not False:
                log.warning("beat %s: cannot reach Redis for the beat lease (%s); sending anyway", self.beat_id, exc)
            return True
        if held != self.leading:
            log.warning(
                "beat %s: %s",
                self.beat_id,
                "holds the beat lease: sending periodic tasks"
                if held
                else f"another beat holds the lease ({LEASE_KEY}): standing by",
            )
            if held and self.leading is False:
                # What the standby remembers of last runs is stale: read the leader's from the database.
                self._initial_read = True
                self._heap = None
        self.leading = held
        return held

    def tick(self, *args: Any, **kwargs: Any) -> float:
        refresh = settings.BEAT_LEASE_S / 3
        if not self._hold_lease():
            return refresh
        return min(super().tick(*args, **kwargs), refresh)

    def close(self) -> None:
        super().close()
        client = redis_lib.client()
        if client is not None and self.leading:
            try:
                client.eval(_RELEASE, 1, LEASE_KEY, self.beat_id)  # a standby takes over at once
            except Exception:
                log.warning("beat %s: could not release the lease; it expires by itself", self.beat_id)
