"""The gateway's ASGI plumbing: request ids, reading a bounded body in bounded time, and sending
JSON answers and errors. No routing, limits or upstream here (apps/gateway/app.py)."""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import secrets
from typing import Any

from django.conf import settings

from apps.gateway.errors import GatewayError, bad_request

log = logging.getLogger(__name__)

JSON_HEADER = (b"content-type", b"application/json")


# Request ids: a random per-process prefix (64 bits) and a counter, 32 hex digits like a uuid.
# uuid4() is a getrandom() syscall that releases the GIL; under load it cost ~0.4 ms per request
# in a profile of the gateway. Ids need to be unique, not unpredictable.
_ID_PREFIX = secrets.token_hex(8)
_ID_COUNTER = itertools.count(1)


def _reseed_request_ids() -> None:
    # A worker forked after import (gunicorn --preload) must not repeat its parent's ids.
    global _ID_PREFIX, _ID_COUNTER
    _ID_PREFIX = secrets.token_hex(8)
    _ID_COUNTER = itertools.count(1)


os.register_at_fork(after_in_child=_reseed_request_ids)


def new_request_id() -> str:
    return f"req_{_ID_PREFIX}{next(_ID_COUNTER):016x}"


def header(scope: dict, name: bytes) -> str | None:
    for key, value in scope["headers"]:
        if key == name:
            return value.decode("latin-1")
    return None


async def send_json(send: Any, status: int, body: bytes, headers: list[tuple[bytes, bytes]]) -> None:
    await send({"type": "http.response.start", "status": status, "headers": [JSON_HEADER, *headers]})
    await send({"type": "http.response.body", "body": body})


async def send_error(send: Any, err: GatewayError, headers: list[tuple[bytes, bytes]]) -> None:
    extra = [(k.encode(), v.encode()) for k, v in err.headers.items()]
    try:
        await send_json(send, err.status, err.body(), headers + extra)
    except Exception:  # the response had already started: nothing more can be said on it
        log.debug("could not send the error response", exc_info=True)


class ClientGoneError(Exception):
    """The client disconnected before its request body was complete: nothing to answer."""


async def read_body(scope: dict, receive: Any) -> bytes:
    """The whole body within GATEWAY_BODY_TIMEOUT_S (408 after, and the connection is closed)."""
    try:
        async with asyncio.timeout(settings.GATEWAY_BODY_TIMEOUT_S):
            return await receive_body(scope, receive)
    except TimeoutError:
        raise GatewayError(
            408,
            f"The request body did not arrive within {settings.GATEWAY_BODY_TIMEOUT_S:g}s.",
            code="request_timeout",
            headers={"connection": "close"},
        ) from None


async def receive_body(scope: dict, receive: Any) -> bytes:
    limit = settings.GATEWAY_MAX_BODY_BYTES
    declared = header(scope, b"content-length")
    if declared is not None:
        if not declared.isdigit():
            raise bad_request("Invalid Content-Length header.")
        if int(declared) > limit:
            raise GatewayError(413, f"The request body exceeds {limit} bytes.", code="request_too_large")
    chunks: list[bytes] = []
    size = 0
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientGoneError
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > limit:
            raise GatewayError(413, f"The request body exceeds {limit} bytes.", code="request_too_large")
        chunks.append(chunk)
        if not message.get("more_body"):
            return b"".join(chunks)
