"""Paced token streams for the simulator without a task switch per token.

At 256 streams x 50 tokens/s, waking one coroutine per token (sleep, resume, aiohttp's write)
cost the simulator half a core. Here every stream due in the same millisecond is written by one
timer callback, straight to its transport in HTTP/1.1 chunked framing; the request's handler
only awaits the end. (uvloop's timers have millisecond resolution anyway.)
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

# A reader this far behind is paused, like a stalled TCP window, instead of buffering forever.
MAX_BUFFERED = 1 << 20


class Pacer:
    """One per event loop: millisecond slots → the streams due then."""

    def __init__(self) -> None:
        self.loop: asyncio.AbstractEventLoop | None = None
        self.slots: dict[int, list[PacedStream]] = {}

    def schedule(self, stream: PacedStream, when: float) -> None:
        key = math.ceil(when * 1000)
        bucket = self.slots.get(key)
        if bucket is None:
            self.slots[key] = [stream]
            self.loop.call_at(key / 1000, self._fire, key)  # type: ignore[union-attr]  # set by start(), first
        else:
            bucket.append(stream)

    def _fire(self, key: int) -> None:
        for stream in self.slots.pop(key, ()):
            stream.step()


class StreamKilled(Exception):  # noqa: N818 - the simulated death, not an error
    pass


class PacedStream:
    """Token ``i`` goes out at ``first_at + i * itl``; ``done`` resolves after the last one."""

    __slots__ = ("die_after", "done", "head", "i", "itl", "last", "next_at", "on_die", "on_token", "pacer",
                 "render", "tail", "transport")

    def __init__(self, *, pacer: Pacer, transport: asyncio.Transport, render: Callable[[int], bytes], n_tokens: int,
                 first_at: float, itl: float, head: bytes, tail: bytes, die_after: int | None,
                 on_token: Callable[[], None], on_die: Callable[[], None]) -> None:
        if pacer.loop is None:
            pacer.loop = asyncio.get_running_loop()
        self.pacer, self.transport, self.render = pacer, transport, render
        self.head, self.tail, self.die_after = head, tail, die_after
        self.on_token, self.on_die = on_token, on_die
        self.i, self.last, self.itl, self.next_at = 0, n_tokens - 1, itl, first_at
        self.done: asyncio.Future[None] = pacer.loop.create_future()
        pacer.schedule(self, first_at)

    def cancel(self) -> None:
        if not self.done.done():
            self.done.cancel()

    def _write(self, payload: bytes) -> None:
        self.transport.write(b"%x\r\n%b\r\n" % (len(payload), payload))

    def step(self) -> None:
        if self.done.done():
            return
        transport = self.transport
        try:
            if transport.is_closing():
                self.done.set_exception(ConnectionResetError("the client went away"))
                return
            if transport.get_write_buffer_size() > MAX_BUFFERED:
                self.pacer.schedule(self, self.pacer.loop.time() + max(self.itl, 0.001))  # type: ignore[union-attr]  # see __init__
                return
            i = self.i
            if self.die_after is not None and i >= self.die_after:
                if i == 0 and self.head:
                    self._write(self.head)
                self.on_die()
                self.done.set_exception(StreamKilled())
                return
            payload = self.render(i)
            if i == 0 and self.head:
                payload = self.head + payload
            if i == self.last:
                payload += self.tail
            self._write(payload)
            self.on_token()
            if i == self.last:
                self.done.set_result(None)
                return
            self.i = i + 1
            self.next_at += self.itl
            self.pacer.schedule(self, self.next_at)
        except Exception as exc:  # a callback must not raise into the loop: end this stream instead
            if not self.done.done():
                self.done.set_exception(exc)
