"""The one module that calls tenants' own HTTP endpoints (budget alert webhooks): httpx, a short
timeout from settings, no redirects followed, and never an exception to the caller.

Every delivery is signed the way Stripe signs its webhooks (docs/metering.md has the receiver's
recipe): ``CrossLogic-Signature: t=<unix seconds>,v1=<hex HMAC-SHA256 of "<t>.<raw body>">``, keyed
with the tenant's signing secret. The timestamp is inside the signed text, so a receiver that
refuses old timestamps also refuses a captured delivery replayed later.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

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


def post_json(*, url: str, payload: dict[str, Any], event_id: str, secret: str, now: float | None = None) -> Delivery:
    """POST ``payload`` as JSON, signed with ``secret``; never raises."""
    try:
        scheme = urlsplit(url).scheme.lower()
    except ValueError:
        return Delivery(ok=False, result="failed: invalid URL")
    if scheme not in SCHEMES:  # the model refuses others; a row saved before it did may not
        return Delivery(ok=False, result="failed: not an http(s) URL")
    body = json.dumps(payload, separators=(",", ":")).encode()
    timestamp = int(time.time() if now is None else now)
    try:
        response = httpx.post(
            url,
            content=body,
            headers={
                "content-type": "application/json",
                "user-agent": "CrossLogic-Webhooks/1",
                SIGNATURE_HEADER: signature_header(secret=secret, timestamp=timestamp, body=body),
                "x-crosslogic-event": str(payload.get("type", "")),
                "x-crosslogic-event-id": event_id,  # the same id on a retry: receivers can de-duplicate
            },
            timeout=settings.BUDGET_WEBHOOK_TIMEOUT_S,
            follow_redirects=False,
        )
    except httpx.HTTPError as exc:
        return Delivery(ok=False, result=f"failed: {type(exc).__name__}"[:200])
    except (httpx.InvalidURL, ValueError):  # a URL httpx cannot parse (a bad port, a stray character)
        return Delivery(ok=False, result="failed: invalid URL")
    return Delivery(ok=200 <= response.status_code < 300, result=f"HTTP {response.status_code}")
