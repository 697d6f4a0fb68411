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
    """Step ``i`` (token ``i`` of every choice) is generated at ``first_at + i * itl``; ``done``
    resolves after the last one is written.

    Generation never waits for the client, as in vLLM: when the kernel cannot take more bytes
    (the client reads slowly), a step's tokens are held and go out with the next step's, so one
    event then carries several tokens, as vLLM's stream does when its output queue backs up.
    """

    __slots__ = (
        "die_after",
        "done",
        "head",
        "i",
        "itl",
        "last",
        "next_at",
        "on_die",
        "on_step",
        "pacer",
        "render",
        "sent",
        "tail",
        "transport",
    )

    def __init__(
        self,
        *,
        pacer: Pacer,
        transport: asyncio.Transport,
        render: Callable[[int, int], bytes],
        n_steps: int,
        first_at: float,
        itl: float,
        head: bytes,
        tail: bytes,
        die_after: int | None,
        on_step: Callable[[int], None],
        on_die: Callable[[], None],
    ) -> None:
        if pacer.loop is None:
            pacer.loop = asyncio.get_running_loop()
        self.pacer, self.transport, self.render = pacer, transport, render
        self.head, self.tail, self.die_after = head, tail, die_after
        self.on_step, self.on_die = on_step, on_die
        self.i, self.sent, self.last, self.itl, self.next_at = 0, 0, n_steps - 1, itl, first_at
        self.done: asyncio.Future[None] = pacer.loop.create_future()
        pacer.schedule(self, first_at)

    def cancel(self) -> None:
        if not self.done.done():
            self.done.cancel()

    def _write(self, payload: bytes) -> None:
        self.transport.write(b"%x\r\n%b\r\n" % (len(payload), payload))

    def _flush(self, upto: int, extra: bytes = b"") -> None:
        """Write steps [sent, upto) as one event per choice (the role chunks before the first)."""
        payload = self.render(self.sent, upto) if upto > self.sent else b""
        if self.sent == 0 and self.head:
            payload = self.head + payload
            self.head = b""
        payload += extra
        if payload:
            self._write(payload)
        self.sent = upto

    def step(self) -> None:
        if self.done.done():
            return
        transport = self.transport
        try:
            if transport.is_closing():
                self.done.set_exception(ConnectionResetError("the client went away"))
                return
            i = self.i
            if self.die_after is not None and i >= self.die_after:
                self._flush(i)
                self.on_die()
                self.done.set_exception(StreamKilled())
                return
            self.on_step(i)
            if i == self.last:
                self._flush(i + 1, self.tail)
                self.done.set_result(None)
                return
            if transport.get_write_buffer_size() == 0:
                self._flush(i + 1)
            self.i = i + 1
            self.next_at += self.itl
            self.pacer.schedule(self, self.next_at)
        except Exception as exc:  # a callback must not raise into the loop: end this stream instead
            if not self.done.done():
                self.done.set_exception(exc)
