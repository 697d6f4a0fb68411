"""Usage metering off the request path.

Requests append a plain dict to an in-process buffer; a background task hands batches to
apps.metering.services (one bulk insert each) and the keys' last use to apps.tenancy.services,
thinned on the way in by the rule api_key_touch applies (last_used_due). A failed write
(database briefly away) keeps the batch and retries with backoff; a retried batch that had in
fact landed is harmless (usage_records_create ignores duplicate request ids). The buffer is
bounded; what cannot be kept is logged loudly, never silently lost.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from datetime import datetime

from asgiref.sync import sync_to_async
from django.conf import settings
from django.db import close_old_connections, connection, reset_queries
from django.utils import timezone

from apps.metering import services as metering
from apps.tenancy import services as tenancy

log = logging.getLogger(__name__)


def _write(rows: list[dict], touched_keys: dict[int, datetime]) -> None:
    close_old_connections()
    try:
        metering.usage_records_create(rows=rows)
        tenancy.api_keys_touch(last_used=touched_keys)
    finally:
        connection.close()
        # With DEBUG on, Django logs every statement per connection (up to 9,000) and only its
        # request_started signal clears the log, which /v1/ never sends: the soak saw workers grow
        # 0.65 MiB/min. The usage writes are nearly all of the gateway's statements; the rarer
        # ones (routing, key loads) stay bounded by the log's cap.
        reset_queries()


class UsageRecorder:
    def __init__(self) -> None:
        self.buffer: deque[dict] = deque()
        self.dropped = 0
        self._touched: dict[int, datetime] = {}
        # When this worker last passed each key's use on to be written.
        self._last_touch: dict[int, datetime] = {}
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
            when = row["created_at"]
            if tenancy.last_used_due(last_used_at=self._last_touch.get(key_id), now=when):
                self._last_touch[key_id] = when
                self._touched[key_id] = when
        if len(self.buffer) >= settings.GATEWAY_USAGE_BATCH_SIZE:
            self._wake.set()

    def pending(self, *, owner: str, month: str, unit: str) -> int:
        """What buffered records (not yet written) of ``owner`` ("tenant:<id>" / "key:<id>") used in
        ``month`` ("YYYY-MM"): cost in micro-dollars for unit "micros", else tokens. Read only when a
        budget counter is seeded, so a scan of the buffer is fine."""
        kind, _, ident = owner.partition(":")
        field = "tenant_id" if kind == "tenant" else "api_key_id"
        wanted = int(ident)
        total = 0
        for row in self.buffer:
            if row.get(field) == wanted and row["created_at"].strftime("%Y-%m") == month:
                total += row["cost_micros"] if unit == "micros" else row["prompt_tokens"] + row["completion_tokens"]
        return total

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
                log.warning(
                    "usage flush failed (%s); %d records buffered, retrying in %.1fs", exc, len(self.buffer), backoff
                )
