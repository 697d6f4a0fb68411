"""A local stand-in for Stripe's HTTP API, just the part we call: POST /v1/billing/meter_events.

stripe-mock is a Go binary that no package registry here ships, so this recorder takes its
place. It refuses what Stripe refuses, with Stripe's error shape ({"error": {"type", "message",
"param", "code"}}) and status codes, so the real ``stripe`` library raises its real exceptions:

- no or wrong ``Authorization: Bearer`` key: 401 (stripe.AuthenticationError);
- not form-encoded, unknown path or method: 400 / 404 (stripe.InvalidRequestError);
- a missing ``event_name``, ``payload[stripe_customer_id]`` or ``payload[value]``: 400
  ``parameter_missing`` naming the param; a value that is not a number, an identifier or event
  name over 100 characters, a timestamp more than 35 days old or 5 minutes ahead: 400
  (Stripe's documented limits, stripe/params/billing/_meter_event_create_params.py);
- an ``Idempotency-Key`` seen before with other parameters: 400 ``idempotency_error``
  (stripe.IdempotencyError); with the same parameters: the first answer again, with
  ``Idempotent-Replayed: true``, and nothing recorded twice;
- an ``identifier`` already recorded under another Idempotency-Key: 400 (our reading of
  "Stripe enforces uniqueness within a rolling period of at least 24 hours"; the exact code
  Stripe sends is not documented, so the sender must not depend on it).

``fail_next`` queues answers to give instead (e.g. a 500 or 429) to test resending.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qsl

API_KEY = "sk_test_crosslogic_stub_0123456789"


@dataclass
class Recorded:
    method: str
    path: str
    headers: dict[str, str]
    form: dict[str, str]


@dataclass
class StripeStub:
    api_key: str = API_KEY
    requests: list[Recorded] = field(default_factory=list)  # every request, refused ones included
    events: dict[str, dict[str, Any]] = field(default_factory=dict)  # accepted, by identifier
    fail_next: list[tuple[int, dict[str, Any]]] = field(default_factory=list)
    _idempotency: dict[str, tuple[dict[str, str], int, dict[str, Any]]] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    server: ThreadingHTTPServer | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def start(self) -> StripeStub:
        stub = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                stub._handle(self)

            def do_GET(self) -> None:
                stub._handle(self)

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True, name="stripe-stub").start()
        return self

    def stop(self) -> None:
        if self.server is not None:
            self.server.shutdown()
            self.server.server_close()

    # --- the API -------------------------------------------------------------------------
    def _handle(self, handler: BaseHTTPRequestHandler) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length).decode() if length else ""
        headers = {k.lower(): v for k, v in handler.headers.items()}
        form = dict(parse_qsl(raw, keep_blank_values=True))
        with self._lock:
            self.requests.append(Recorded(handler.command, handler.path, headers, form))
            status, body, extra = self._answer(handler.command, handler.path, headers, form)
        payload = json.dumps(body).encode()
        handler.send_response(status)
        handler.send_header("Content-Type", "application/json")
        handler.send_header("Content-Length", str(len(payload)))
        handler.send_header("Request-Id", f"req_stub{len(self.requests)}")
        for name, value in extra.items():
            handler.send_header(name, value)
        handler.end_headers()
        handler.wfile.write(payload)

    def _answer(
        self, method: str, path: str, headers: dict[str, str], form: dict[str, str]
    ) -> tuple[int, dict[str, Any], dict[str, str]]:
        auth = headers.get("authorization", "")
        if not auth.startswith("Bearer "):
            return _error(401, "You did not provide an API key.")
        if auth != f"Bearer {self.api_key}":
            return _error(401, f"Invalid API Key provided: {auth[7:15]}****")
        if (method, path) != ("POST", "/v1/billing/meter_events"):
            return _error(404, f"Unrecognized request URL ({method}: {path}).")
        if headers.get("content-type", "").split(";")[0] != "application/x-www-form-urlencoded":
            return _error(400, "Invalid request: the body must be form-encoded.")
        if not headers.get("stripe-version"):
            return _error(400, "Stripe-Version header missing (the library always sends one).")
        key = headers.get("idempotency-key")
        if key and key in self._idempotency:
            first_form, status, body = self._idempotency[key]
            if first_form != form:
                return _error(
                    400,
                    "Keys for idempotent requests can only be used with the same parameters they were first "
                    f"used with. Try using a key other than '{key}' if you meant to execute a different request.",
                    type="idempotency_error",
                )
            return status, body, {"Idempotent-Replayed": "true", "Idempotency-Key": key}
        if self.fail_next:
            status, error = self.fail_next.pop(0)
            return status, {"error": error}, {}
        status, body, extra = self._create(form)
        if key and status < 500:
            self._idempotency[key] = (form, status, body)
        return status, body, extra

    def _create(self, form: dict[str, str]) -> tuple[int, dict[str, Any], dict[str, str]]:
        for param in ("event_name", "payload[stripe_customer_id]", "payload[value]"):
            if not form.get(param):
                return _error(400, f"Missing required param: {param}.", param=param, code="parameter_missing")
        unknown = sorted(
            set(form) - {"event_name", "identifier", "timestamp"} - {p for p in form if p.startswith("payload[")}
        )
        if unknown:
            return _error(400, f"Received unknown parameter: {unknown[0]}", param=unknown[0], code="parameter_unknown")
        if len(form["event_name"]) > 100 or len(form.get("identifier", "")) > 100:
            return _error(400, "event_name and identifier are at most 100 characters.", code="string_too_long")
        try:
            float(form["payload[value]"])
        except ValueError:
            return _error(400, "payload[value] must be a number.", param="payload[value]", code="parameter_invalid")
        now = int(time.time())
        timestamp = int(form.get("timestamp") or now)
        if not now - 35 * 86400 <= timestamp <= now + 300:
            return _error(
                400, "timestamp must be within the past 35 days and at most 5 minutes in the future.", param="timestamp"
            )
        identifier = form.get("identifier") or f"stub_{len(self.events) + 1}"
        if identifier in self.events:
            return _error(400, f"An event with identifier {identifier} already exists.", param="identifier")
        event = {
            "object": "billing.meter_event",
            "created": now,
            "event_name": form["event_name"],
            "identifier": identifier,
            "livemode": False,
            "payload": {k[len("payload[") : -1]: v for k, v in form.items() if k.startswith("payload[")},
            "timestamp": timestamp,
        }
        self.events[identifier] = event
        return 200, event, {}


def _error(
    status: int, message: str, *, type: str = "invalid_request_error", param: str | None = None, code: str | None = None
) -> tuple[int, dict[str, Any], dict[str, str]]:
    error: dict[str, Any] = {"type": type, "message": message}
    if param:
        error["param"] = param
    if code:
        error["code"] = code
    return status, {"error": error}, {}
