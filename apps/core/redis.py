"""The one place that builds Redis clients, so every part shares settings and pools."""

from __future__ import annotations

import asyncio
import ssl
from collections import deque
from functools import lru_cache
from typing import Any

import hiredis
import redis
import redis.asyncio as aioredis
from django.conf import settings
from redis.connection import parse_url

_TIMEOUTS: dict[str, Any] = {"socket_connect_timeout": 0.5, "socket_timeout": 1.0}


@lru_cache(maxsize=1)
def client() -> redis.Redis | None:
    """A synchronous client, or None when no REDIS_URL is configured (embedded dev mode)."""
    if not settings.REDIS_URL:
        return None
    return redis.Redis.from_url(settings.REDIS_URL, **_TIMEOUTS)


def async_client(**overrides: Any) -> aioredis.Redis | None:
    """A new asyncio client; each event loop needs its own, so the caller keeps it.

    ``overrides`` adjust connection options, e.g. ``socket_timeout=None`` for a pub/sub listener
    that legitimately waits for minutes.
    """
    if not settings.REDIS_URL:
        return None
    return aioredis.Redis.from_url(settings.REDIS_URL, **{**_TIMEOUTS, **overrides})


class RedisReplyError(Exception):
    """Redis answered with an error reply (``str()`` is Redis's message, e.g. ``NOSCRIPT ...``)."""


class _Protocol(asyncio.Protocol):
    def __init__(self) -> None:
        self.reader = hiredis.Reader()
        # Commands awaiting their reply, in the order sent, each with its deadline (loop time).
        self.pending: deque[tuple[asyncio.Future, float]] = deque()
        self.transport: asyncio.Transport | None = None
        # One timer per connection watches every deadline, instead of an asyncio.timeout() (a
        # timer scheduled and cancelled) per command: ~7 µs less per call, two calls per request.
        self._timer: asyncio.TimerHandle | None = None
        self._timer_at = 0.0
        # Commands issued during one pass of the event loop leave in one write (see write()).
        self._outgoing: list[bytes] = []

    def write(self, packed: bytes) -> None:
        """Queue a command; the queue is written at the end of this loop pass, in order.

        Under load many requests issue their script call in the same pass: one write (one
        syscall, one wake-up of Redis) for all of them instead of one each.
        """
        if not self._outgoing:
            asyncio.get_running_loop().call_soon(self._flush)
        self._outgoing.append(packed)

    def expect(self, future: asyncio.Future, deadline: float) -> None:
        self.pending.append((future, deadline))
        if self._timer is None or deadline < self._timer_at:
            self._arm(deadline)

    def _arm(self, when: float) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer_at = when
        self._timer = asyncio.get_running_loop().call_at(when, self._check_deadlines)

    def _check_deadlines(self) -> None:
        self._timer = None
        # A caller that gave up (cancelled) has no deadline any more; its reply is still awaited.
        waiting = [deadline for future, deadline in self.pending if not future.done()]
        if not waiting:
            return
        earliest = min(waiting)
        if earliest <= asyncio.get_running_loop().time():
            # A Redis that does not answer in time is not trusted with what is queued behind.
            self.fail(TimeoutError("Redis did not answer in time"))
        else:
            self._arm(earliest)

    def _flush(self) -> None:
        outgoing, self._outgoing = self._outgoing, []
        if self.transport is not None and outgoing:
            self.transport.write(b"".join(outgoing) if len(outgoing) > 1 else outgoing[0])

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # asyncio passes the Transport it made for create_connection; the base signature says BaseTransport.
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        self.reader.feed(data)
        try:
            while (reply := self.reader.gets()) is not False:
                future, _ = self.pending.popleft()
                if future.done():  # its caller gave up; the reply is dropped, in order
                    continue
                if isinstance(reply, hiredis.ReplyError):
                    future.set_exception(RedisReplyError(str(reply)))
                else:
                    future.set_result(reply)
        except (hiredis.ProtocolError, IndexError) as exc:  # garbage, or a reply nobody asked for
            self.fail(ConnectionError(f"Redis protocol error: {exc}"))

    def connection_lost(self, exc: Exception | None) -> None:
        self.fail(ConnectionError(f"Redis connection lost: {exc or 'closed by the server'}"))

    def fail(self, error: Exception) -> None:
        self._outgoing = []
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.transport is not None:
            self.transport.abort()
            self.transport = None
        while self.pending:
            future, _ = self.pending.popleft()
            if not future.done():
                future.set_exception(error)


class Multiplexed:
    """One Redis connection shared by every coroutine of a process, for the gateway's hot path.

    Each command is written as soon as it is issued and its reply matched in order (Redis answers
    a connection's commands in the order they came), so concurrent requests pipeline on one socket
    with no pool to wait for and no reader task: replies are parsed (by hiredis) in the protocol's
    callback. Measured against redis-py's pooled client here: about half the time per script call.
    A failure (connection lost, timeout) fails the commands in flight and the next command
    reconnects. Not for blocking commands or pub/sub.
    """

    def __init__(self, url: str, *, connect_timeout_s: float = 0.5) -> None:
        try:
            options = parse_url(url)  # redis-py's own reading of the URL, so every client agrees
        except ValueError:
            scheme = url.partition("://")[0]
            raise ValueError(f"Unsupported Redis URL scheme {scheme!r}; use redis://, rediss:// or unix://.") from None
        self.socket_path: str | None = options.get("path")
        self.host = options.get("host") or "127.0.0.1"
        self.port = int(options.get("port") or 6379)
        self.db = int(options.get("db") or 0)
        self.username: str | None = options.get("username")
        self.password: str | None = options.get("password")
        self.tls = options.get("connection_class") is redis.connection.SSLConnection
        self.connect_timeout_s = connect_timeout_s
        self._protocol: _Protocol | None = None
        self._connecting: asyncio.Lock | None = None

    async def _connection(self) -> _Protocol:
        protocol = self._protocol
        if protocol is not None and protocol.transport is not None:
            return protocol
        if self._connecting is None:
            self._connecting = asyncio.Lock()
        async with self._connecting:
            if self._protocol is not None and self._protocol.transport is not None:
                return self._protocol
            loop = asyncio.get_running_loop()
            async with asyncio.timeout(self.connect_timeout_s):
                if self.socket_path:
                    _, protocol = await loop.create_unix_connection(_Protocol, self.socket_path)
                else:
                    _, protocol = await loop.create_connection(
                        _Protocol, self.host, self.port, ssl=ssl.create_default_context() if self.tls else None
                    )
                setup: list[tuple[object, ...]] = []
                if self.password is not None:
                    setup.append(("AUTH", self.username, self.password) if self.username else ("AUTH", self.password))
                if self.db:
                    setup.append(("SELECT", self.db))
                try:
                    for command in setup:
                        await self._send(protocol, command, self.connect_timeout_s)
                except BaseException:
                    protocol.fail(ConnectionError("Redis connection set-up failed"))
                    raise
            self._protocol = protocol
            return protocol

    @staticmethod
    def _send(protocol: _Protocol, command: tuple[object, ...], timeout_s: float) -> asyncio.Future:
        if protocol.transport is None:
            raise ConnectionError("Redis connection lost")
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        protocol.expect(future, loop.time() + timeout_s)
        # hiredis's stub types the command as a 1-tuple; pack_command takes any number of parts.
        protocol.write(hiredis.pack_command(command))  # type: ignore[arg-type]
        return future

    async def execute(self, *command: object, timeout_s: float) -> object:
        """Send one command and return its reply; raises ConnectionError, TimeoutError or RedisReplyError.

        No reply within ``timeout_s`` fails this command and every other in flight on the connection
        with TimeoutError (the next command reconnects)."""
        protocol = await self._connection()
        return await self._send(protocol, command, timeout_s)

    async def aclose(self) -> None:
        if self._protocol is not None:
            self._protocol.fail(ConnectionError("Redis connection closed"))
            self._protocol = None


def multiplexed() -> Multiplexed | None:
    """A shared-connection client on REDIS_URL for the gateway's hot path, or None without Redis."""
    if not settings.REDIS_URL:
        return None
    return Multiplexed(settings.REDIS_URL, connect_timeout_s=_TIMEOUTS["socket_connect_timeout"])
