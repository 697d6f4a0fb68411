"""The one module that calls tenants' own HTTP endpoints (budget alert webhooks): httpx, a short
timeout from settings, no redirects followed, and never an exception to the caller.

Every delivery is signed the way Stripe signs its webhooks (docs/metering.md has the receiver's
recipe): ``CrossLogic-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">``, keyed
with the tenant's signing secret. The timestamp is inside the signed text, so a receiver that
refuses old timestamps also refuses a captured delivery replayed later.

The tenant picks the URL, so it is resolved here and every address it resolves to must be public
(unless WEBHOOK_ALLOW_PRIVATE_ADDRESSES): no loopback, private network, link-local (the clouds'
metadata service at 169.254.169.254) or reserved range. The request then goes to the address that
was checked (Host header and TLS server name kept), so a DNS answer that changes between the check
and the connect (rebinding) cannot redirect it.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import json
import socket
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import httpx
from django.conf import settings

SIGNATURE_HEADER = "CrossLogic-Signature"
SCHEMES = ("http", "https")


def signature(*, secret: str, timestamp: int, body: bytes) -> str:
    """The hex v1 signature of ``body`` sent at ``timestamp``."""
    signed = str(timestamp).encode() + b"." + body
    return hmac.new(secret.encode(), signed, hashlib.sha256).hexdigest()


def signature_header(*, secret: str, timestamp: int, body: bytes) -> str:
    return f"t={timestamp},v1={signature(secret=secret, timestamp=timestamp, body=body)}"


def url_for_log(url: str) -> str:
    """Scheme, host and port only: a URL may carry credentials (user:password@, a token in the
    path or query) that must not reach logs or the alert row staff read."""
    try:
        parts = urlsplit(url)
        host = parts.hostname or "?"
        port = f":{parts.port}" if parts.port else ""
    except ValueError:
        return "(unparseable URL)"
    return f"{parts.scheme}://{host}{port}/…"


@dataclass(frozen=True)
class Delivery:
    ok: bool  # a 2xx answer
    result: str  # in a few words: "HTTP 204", "failed: ConnectTimeout"


class URLRefusedError(Exception):
    """The URL may not be requested; the message says why in a few words."""


def _public(address: str) -> bool:
    ip = ipaddress.ip_address(address.split("%", 1)[0])
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_global and not ip.is_multicast


def pinned_target(url: str) -> tuple[str, dict[str, str], dict[str, Any]]:
    """(URL with the checked address as its host, extra headers, httpx extensions) for ``url``.

    Raises URLRefusedError for a URL that is not http(s), has no host, does not resolve, or resolves to an
    address that is not public while WEBHOOK_ALLOW_PRIVATE_ADDRESSES is off."""
    try:
        parts = urlsplit(url)
        scheme, host, port = parts.scheme.lower(), parts.hostname, parts.port
    except ValueError:
        raise URLRefusedError("invalid URL") from None
    if scheme not in SCHEMES:  # the model refuses others; a row saved before it did may not
        raise URLRefusedError("not an http(s) URL")
    if not host:
        raise URLRefusedError("invalid URL")
    port = port or (443 if scheme == "https" else 80)
    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except (OSError, UnicodeError):
        raise URLRefusedError("the host does not resolve") from None
    addresses = list(dict.fromkeys(str(info[4][0]) for info in infos))
    if not addresses:
        raise URLRefusedError("the host does not resolve")
    if not settings.WEBHOOK_ALLOW_PRIVATE_ADDRESSES and not all(_public(a) for a in addresses):
        raise URLRefusedError("the host is not a public address")
    address = addresses[0]
    netloc_host = f"[{address}]" if ":" in address else address
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = (userinfo + "@" if userinfo else "") + f"{netloc_host}:{port}"
    pinned = urlunsplit((scheme, netloc, parts.path or "/", parts.query, ""))
    host_header = host if parts.port is None else f"{host}:{parts.port}"
    if ":" in host and not host.startswith("["):
        host_header = f"[{host}]" if parts.port is None else f"[{host}]:{parts.port}"
    extensions: dict[str, Any] = {"sni_hostname": host} if scheme == "https" else {}
    return pinned, {"host": host_header}, extensions


def post_json(*, url: str, payload: dict[str, Any], event_id: str, secret: str, now: float | None = None) -> Delivery:
    """POST ``payload`` as JSON, signed with ``secret``; never raises."""
    try:
        target, pin_headers, extensions = pinned_target(url)
    except URLRefusedError as exc:
        return Delivery(ok=False, result=f"failed: {exc}")
    body = json.dumps(payload, separators=(",", ":")).encode()
    timestamp = int(time.time() if now is None else now)
    try:
        with httpx.Client(timeout=settings.BUDGET_WEBHOOK_TIMEOUT_S, follow_redirects=False) as client:
            response = client.post(
                target,
                content=body,
                extensions=extensions,
                headers={
                    **pin_headers,
                    "content-type": "application/json",
                    "user-agent": "CrossLogic-Webhooks/1",
                    SIGNATURE_HEADER: signature_header(secret=secret, timestamp=timestamp, body=body),
                    "x-crosslogic-event": str(payload.get("type", "")),
                    "x-crosslogic-event-id": event_id,  # the same id on a retry: receivers can de-duplicate
                },
            )
    except httpx.HTTPError as exc:
        return Delivery(ok=False, result=f"failed: {type(exc).__name__}"[:200])
    except (httpx.InvalidURL, ValueError):  # a URL httpx cannot parse (a bad port, a stray character)
        return Delivery(ok=False, result="failed: invalid URL")
    return Delivery(ok=200 <= response.status_code < 300, result=f"HTTP {response.status_code}")
