"""Usage metering off the request path.

Requests append a plain dict to an in-process buffer; a background task writes batches with
bulk_create. A failed write (database briefly away) keeps the batch and retries with backoff;
``ignore_conflicts`` on the unique request_id makes a retried batch that had in fact landed
harmless. The buffer is bounded; what cannot be kept is logged loudly, never silently lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from decimal import ROUND_HALF_UP, Decimal

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections, connection
from django.utils import timezone

log = logging.getLogger(__name__)


def cost_micros(prompt_tokens: int, completion_tokens: int, price_in: Decimal, price_out: Decimal) -> int:
    """USD per 1M tokens times tokens = micro-dollars, exactly, rounded half-up once at the end."""
    total = Decimal(prompt_tokens) * price_in + Decimal(completion_tokens) * price_out
    return int(total.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def _write(rows: list[dict], touched_keys: dict[int, object]) -> None:
    from apps.metering.models import UsageRecord
    from apps.tenancy.models import ApiKey

    close_old_connections()
    try:
        UsageRecord.objects.bulk_create([UsageRecord(**row) for row in rows], ignore_conflicts=True)
        for key_id, when in touched_keys.items():
            ApiKey.objects.filter(pk=key_id).update(last_used_at=when)
    finally:
        connection.close()


class UsageRecorder:
    def __init__(self) -> None:
        self.buffer: deque[dict] = deque()
        self.dropped = 0
        self._touched: dict[int, object] = {}
        self._last_touch: dict[int, float] = {}
        self._write = sync_to_async(_write, thread_sensitive=False)
        self._wake = asyncio.Event()

    def record(self, row: dict) -> None:
        if len(self.buffer) >= settings.GATEWAY_USAGE_BUFFER_MAX:
            self.dropped += 1
            log.error("usage buffer full (%d records): dropping %s", len(self.buffer), row.get("request_id"))
            return
        row.setdefault("created_at", timezone.now())
        self.buffer.append(row)
        key_id = row.get("api_key_id")
        if key_id is not None:
            loop_now = asyncio.get_running_loop().time()
            if loop_now - self._last_touch.get(key_id, -1e9) >= settings.API_KEY_LAST_USED_RESOLUTION_S:
                self._last_touch[key_id] = loop_now
                self._touched[key_id] = row["created_at"]
        if len(self.buffer) >= settings.GATEWAY_USAGE_BATCH_SIZE:
            self._wake.set()

    async def flush(self) -> int:
        """Write everything buffered now; returns how many records were written."""
        written = 0
        while self.buffer:
            batch = [self.buffer.popleft() for _ in range(min(len(self.buffer), settings.GATEWAY_USAGE_BATCH_SIZE))]
            touched, self._touched = self._touched, {}
            try:
                await self._write(batch, touched)
            except Exception:
                # Put the batch back in front, in order, and let the caller back off.
                self.buffer.extendleft(reversed(batch))
                self._touched.update(touched)
                raise
            written += len(batch)
        return written

    async def run(self) -> None:
        """Background flusher: every interval, or sooner when a batch is full."""
        backoff = settings.GATEWAY_USAGE_FLUSH_INTERVAL_S
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), timeout=backoff)
            self._wake.clear()
            try:
                await self.flush()
                backoff = settings.GATEWAY_USAGE_FLUSH_INTERVAL_S
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                backoff = min(30.0, backoff * 2)
                log.warning("usage flush failed (%s); %d records buffered, retrying in %.1fs",
                            exc, len(self.buffer), backoff)
