"""The HTTP server's edge: limits on what a client may send before the application sees a request.

uvicorn's httptools protocol has no limit on the size of a request's head and no timeout until the
head is complete: a 100 MB header was read into memory before authentication, and an idle or
half-sent connection stayed open for good. `GuardedHttpToolsProtocol` adds both, and answers
malformed or refused requests with a JSON body instead of uvicorn's plain text:

- request line + headers larger than HTTP_MAX_HEADER_BYTES, or more than HTTP_MAX_HEADERS
  headers: 431, connection closed (the bytes read are bounded by the limit plus one read);
- no complete head within HTTP_HEADER_TIMEOUT_S of the connection opening or of the previous
  response ending: 408 (or a silent close if nothing was sent), connection closed;
- idle keep-alive between requests: uvicorn's own `timeout_keep_alive` (HTTP_KEEPALIVE_S).

A slow request *body* is the application's business (the gateway times out its reads).

Used by every server command: `python -m crosslogic.serve` (development, benchmarks) and gunicorn's
`crosslogic.server.UvicornWorker` (production).
"""

from __future__ import annotations

import asyncio
import json
import logging
from typing import Any

from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn_worker import UvicornWorker as _BaseUvicornWorker

logger = logging.getLogger("crosslogic.server")

_REASONS = {
    400: ("Invalid HTTP request.", "invalid_request_error"),
    408: ("The request's headers did not arrive in time.", "invalid_request_error"),
    431: ("The request's headers are too large.", "invalid_request_error"),
}


class _RefusedError(Exception):
    """Raised inside a parser callback: httptools turns it into HttpParserCallbackError."""


def edge_limits() -> tuple[int, int, float, float]:
    """(max head bytes, max header count, head timeout s, keep-alive s) from Django's settings."""
    from django.conf import settings

    return (
        settings.HTTP_MAX_HEADER_BYTES,
        settings.HTTP_MAX_HEADERS,
        settings.HTTP_HEADER_TIMEOUT_S,
        settings.HTTP_KEEPALIVE_S,
    )


def json_error_response(status: int, message: str) -> bytes:
    """A complete HTTP/1.1 response with an OpenAI-shaped JSON error; the connection then closes."""
    body = json.dumps(
        {"error": {"message": message, "type": _REASONS.get(status, _REASONS[400])[1], "param": None, "code": None}}
    ).encode()
    return b"".join(
        [
            STATUS_LINE[status],
            b"content-type: application/json\r\n",
            b"content-length: " + str(len(body)).encode() + b"\r\n",
            b"connection: close\r\n\r\n",
            body,
        ]
    )


class GuardedHttpToolsProtocol(HttpToolsProtocol):
    _limits: tuple[int, int, float, float] | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)  # loads the app, so Django's settings are ready after this
        if GuardedHttpToolsProtocol._limits is None:
            GuardedHttpToolsProtocol._limits = edge_limits()
        self._max_head, self._max_headers, self._head_timeout, _ = GuardedHttpToolsProtocol._limits
        self._in_head = True
        self._head_bytes = 0
        self._header_count = 0
        self._any_bytes = False
        self._refusal = 400
        # The head in progress must be complete by this loop time (None: no head in progress).
        # One timer per connection checks it, re-armed lazily when it fires, so a request on a
        # kept-alive connection sets a number instead of scheduling and cancelling a timer.
        self._head_deadline: float | None = None
        self._head_timer: asyncio.TimerHandle | None = None

    # -- connection --
    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]  # uvicorn narrows BaseTransport
        super().connection_made(transport)
        self._arm_head_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm_head_timer()
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._any_bytes = True
        in_head_before = self._in_head
        super().data_received(data)
        # Counted after feeding, so a head and body that arrive in one read are never refused for
        # the body's bytes; a head still incomplete after this read has used `data` of its budget.
        if self.transport.is_closing():
            return
        if in_head_before and self._in_head:
            self._head_bytes += len(data)
            if self._head_bytes > self._max_head:
                self._refuse(431)
        elif self._head_deadline is None and self.timeout_keep_alive_task is None and self._idle():
            # Bytes that began no request (stray CRLFs) cancelled the keep-alive timer: keep a deadline.
            self._arm_head_timer()

    def _idle(self) -> bool:
        return self.cycle is None or self.cycle.response_complete

    # -- parser callbacks --
    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_head = True
        self._head_bytes = 0
        self._header_count = 0
        self._arm_head_timer()

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        if self._header_count > self._max_headers:
            self._refusal = 431
            raise _RefusedError
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._in_head = False
        self._disarm_head_timer()
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        # The next request's head gets its own deadline once its first byte arrives
        # (on_message_begin); until then uvicorn's keep-alive timer closes an idle connection.
        self._any_bytes = False

    # -- refusals --
    def send_400_response(self, msg: str) -> None:
        status, self._refusal = self._refusal, 400
        self._write_refusal(status)

    def _refuse(self, status: int) -> None:
        self._write_refusal(status)

    def _write_refusal(self, status: int) -> None:
        self._disarm_head_timer()
        if self.transport.is_closing():
            return
        client = f"{self.client[0]}:{self.client[1]}" if self.client else "?"
        logger.info("refused a request from %s: %d %s", client, status, _REASONS[status][0])
        self.transport.write(json_error_response(status, _REASONS[status][0]))
        self.transport.close()

    def _arm_head_timer(self) -> None:
        if self._head_deadline is None:
            self._head_deadline = self.loop.time() + self._head_timeout
            if self._head_timer is None:
                self._head_timer = self.loop.call_at(self._head_deadline, self._head_timer_fired)

    def _disarm_head_timer(self) -> None:
        # The timer stays scheduled; when it fires with no deadline it simply stops.
        self._head_deadline = None

    def _head_timer_fired(self) -> None:
        self._head_timer = None
        deadline = self._head_deadline
        if deadline is None:
            return
        if self.loop.time() < deadline:  # a later head's deadline: wait for it
            self._head_timer = self.loop.call_at(deadline, self._head_timer_fired)
            return
        self._head_deadline = None
        self._head_timed_out()

    def _head_timed_out(self) -> None:
        if self.transport.is_closing():
            return
        if not self._idle():
            # A pipelined head waits behind a response still being written: its clock restarts.
            self._arm_head_timer()
        elif self._any_bytes:
            self._write_refusal(408)
        else:
            self.transport.close()


def uvicorn_config_kwargs() -> dict[str, Any]:
    """What every server command passes to uvicorn: uvloop, the guarded protocol, the keep-alive."""
    return {
        "loop": "uvloop",
        "http": GuardedHttpToolsProtocol,
        "server_header": False,
    }


class UvicornWorker(_BaseUvicornWorker):
    """gunicorn worker class: uvicorn with the guarded protocol. gunicorn's own `--limit-request-*`
    options do not reach uvicorn's parser, which is why the limits live in the protocol."""

    CONFIG_KWARGS = uvicorn_config_kwargs()


class LogBodyDisconnects:
    """ASGI wrapper for Django's application: one INFO line when a client leaves mid-upload.

    Django's ASGIHandler drops such a request silently (RequestAborted in read_body); an operator
    looking at a failed upload should see that the client went away, without a traceback. Only
    the Django side is wrapped (crosslogic/asgi.py): the gateway reads its own bodies.
    """

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        received = 0
        complete = False

        async def receive_and_watch() -> dict:
            nonlocal received, complete
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                complete = not message.get("more_body", False)
            elif message["type"] == "http.disconnect" and not complete:
                complete = True  # one line per request, however often the app asks again
                client = scope.get("client")
                logger.info(
                    "client %s disconnected while sending the body of %s %s (%d bytes received); request dropped",
                    f"{client[0]}:{client[1]}" if client else "?",
                    scope.get("method", "?"),
                    scope.get("path", "?"),
                    received,
                )
            return message

        await self.app(scope, receive_and_watch, send)
