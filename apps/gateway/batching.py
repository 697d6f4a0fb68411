"""Settles batched per pass of the event loop: one Redis script call for every request that
finished in the same pass, instead of one call each (issue #14). The unused parts of lease
slices (apps/gateway/leases.py) go back to Redis in the same calls.

Under load many requests end in the same pass of the loop (their upstream answers arrive in one
read of the selector). Each caller still awaits its own settle, so when ``settle()`` returns the
usage is charged and the concurrency slot free, as before; only the round trip is shared.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

# Entries per script call: bounds the time Redis spends in one script (~20 commands per entry).
MAX_BATCH = 128

Call = Callable[[list[str], list[object]], Awaitable[object]]


def _consume(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()  # retrieved: no "exception was never retrieved" warning


class SettleBatch:
    def __init__(self, call: Call) -> None:
        self._call = call
        self._queue: list[tuple[list[str], list[object], asyncio.Future]] = []
        self._sending: set[asyncio.Task] = set()
        self.calls = 0  # script calls made, for tests and benchmarks
        self.entries = 0

    async def submit(self, keys: list[str], args: list[object]) -> None:
        """Queue one settle (its keys and args as the single-entry script takes them) and wait
        until the batch it rode in has been applied; raises what the call raised."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        if not self._queue:
            loop.call_soon(self._flush)
        self._queue.append((keys, args, future))
        await future

    def post(self, keys: list[str], args: list[object]) -> None:
        """Queue an entry nobody waits for (a lease's unused part going back): it rides in the
        next batch; if that call fails, the entry is lost and the TTLs clean up after it."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        future.add_done_callback(_consume)
        if not self._queue:
            loop.call_soon(self._flush)
        self._queue.append((keys, args, future))

    def _flush(self) -> None:
        queue, self._queue = self._queue, []
        for i in range(0, len(queue), MAX_BATCH):
            # A task of its own: the batch is applied even if every caller in it was cancelled.
            task = asyncio.ensure_future(self._send(queue[i : i + MAX_BATCH]))
            self._sending.add(task)
            task.add_done_callback(self._sending.discard)

    async def drain(self) -> None:
        """Wait until every queued settle has been sent (a worker shutting down)."""
        while self._queue or self._sending:
            if self._queue:
                self._flush()
            await asyncio.gather(*self._sending, return_exceptions=True)

    async def _send(self, batch: list[tuple[list[str], list[object], asyncio.Future]]) -> None:
        keys: list[str] = []
        head: list[object] = [len(batch)]
        tail: list[object] = []
        for entry_keys, entry_args, _ in batch:
            keys += entry_keys
            head += [len(entry_keys), len(entry_args)]
            tail += entry_args
        self.calls += 1
        self.entries += len(batch)
        try:
            await self._call(keys, head + tail)
        except Exception as exc:
            for *_, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        for *_, future in batch:
            if not future.done():
                future.set_result(None)
