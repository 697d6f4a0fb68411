"""Signed budget webhooks: a real local HTTP server verifies each delivery with the recipe of
docs/metering.md (copied here as a receiver would), using the secret the rotate action showed;
a wrong secret, a changed body or an old timestamp fails; failures are retried with backoff."""

from __future__ import annotations

import hashlib
import hmac
import logging
import socket
import threading
import time
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from django.test import override_settings

from apps.metering import webhooks
from apps.metering.models import BudgetAlert
from apps.metering.notify import WEBHOOK_MAX_ATTEMPTS, budget_webhooks_retry
from apps.metering.services import budget_alerts_raise
from apps.metering.tasks import budget_alert_notify_task
from apps.metering.tests.factories import make_usage
from apps.tenancy.models import Tenant
from apps.tenancy.services import tenant_create, tenant_webhook_secret, tenant_webhook_secret_rotate

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)

# --- the receiver's side: docs/metering.md "Verifying a budget webhook", verbatim -------------

TOLERANCE_S = 300


def verify(secret: str, header: str, body: bytes, now: float | None = None) -> bool:
    try:
        items = [part.split("=", 1) for part in header.split(",")]
        timestamp = int(next(value for key, value in items if key.strip() == "t"))
    except (ValueError, StopIteration):
        return False
    if abs((time.time() if now is None else now) - timestamp) > TOLERANCE_S:
        return False
    expected = hmac.new(secret.encode(), f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return any(hmac.compare_digest(expected, value.strip()) for key, value in items if key.strip() == "v1")


# ---------------------------------------------------------------------------------------------


class _Receiver(BaseHTTPRequestHandler):
    """Keeps each delivery's signature header and raw body; answers with the next queued status."""

    received: list[tuple[str, bytes, str]] = []
    statuses: list[int] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        _Receiver.received.append(
            (self.headers.get("CrossLogic-Signature", ""), body, self.headers.get("x-crosslogic-event-id", ""))
        )
        self.send_response(_Receiver.statuses.pop(0) if _Receiver.statuses else 204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture(autouse=True)
def _receivers_on_loopback(settings):
    # These receivers listen on 127.0.0.1, which production refuses (test_webhook_addresses.py).
    settings.WEBHOOK_ALLOW_PRIVATE_ADDRESSES = True


@pytest.fixture
def receiver() -> Iterator[HTTPServer]:
    server = HTTPServer(("127.0.0.1", 0), _Receiver)
    _Receiver.received, _Receiver.statuses = [], []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()


@pytest.fixture
def acme(db, receiver) -> Tenant:
    tenant = tenant_create(slug="acme", monthly_spend_limit_micros=10_000_000, budget_alert_percent=80)
    tenant.budget_webhook_url = f"http://127.0.0.1:{receiver.server_port}/hooks/budget"
    tenant.save()
    return tenant


def _one_alert(tenant: Tenant) -> BudgetAlert:
    make_usage(tenant=tenant, cost_micros=9_000_000, created_at=NOW)  # 90%: the soft alert only
    [alert] = budget_alerts_raise(now=NOW)
    return alert


@pytest.mark.slow  # listens on a socket
def test_the_receiver_verifies_the_delivery_with_the_secret_it_was_shown(acme):
    secret = tenant_webhook_secret_rotate(tenant=acme)
    alert = _one_alert(acme)

    sent_at = time.time()
    budget_alert_notify_task(alert.pk)

    [(header, body, event_id)] = _Receiver.received
    assert header.startswith("t=") and ",v1=" in header
    assert abs(int(header.split(",")[0][2:]) - sent_at) < 5
    assert verify(secret, header, body)
    assert event_id == f"budget_alert_{alert.pk}" and b'"type":"budget.threshold_reached"' in body
    # What a forger or a sloppy receiver would try: all refused.
    assert not verify("whsec_" + "x" * 43, header, body)  # a wrong secret
    assert not verify(secret, header, body.replace(b"9.000000", b"1.000000"))  # a changed body
    assert not verify(secret, header, body, now=sent_at + TOLERANCE_S + 10)  # replayed later
    assert not verify(secret, "v1=" + header.split("v1=")[1], body)  # no timestamp
    alert.refresh_from_db()
    assert (alert.webhook_result, alert.webhook_attempts, alert.webhook_next_attempt_at) == ("HTTP 204", 1, None)


@pytest.mark.slow  # listens on a socket
def test_after_a_rotation_the_old_secret_no_longer_verifies(acme):
    old = tenant_webhook_secret_rotate(tenant=acme)
    new = tenant_webhook_secret_rotate(tenant=acme)
    budget_alert_notify_task(_one_alert(acme).pk)

    [(header, body, _)] = _Receiver.received
    assert old != new and verify(new, header, body) and not verify(old, header, body)


@pytest.mark.slow  # listens on a socket
def test_a_tenant_without_a_secret_still_gets_a_signed_delivery(acme):
    assert acme.budget_webhook_secret_sealed == ""

    budget_alert_notify_task(_one_alert(acme).pk)

    acme.refresh_from_db()
    [(header, body, _)] = _Receiver.received
    assert acme.budget_webhook_secret_rotated_at is not None
    assert verify(tenant_webhook_secret(tenant=acme), header, body)


@pytest.mark.django_db
def test_the_secret_is_stored_sealed_and_unseals_only_with_the_server_key():
    tenant = tenant_create(slug="acme")
    raw = tenant_webhook_secret_rotate(tenant=tenant)
    tenant.refresh_from_db()

    assert raw.startswith("whsec_") and len(raw) > 40
    assert raw not in tenant.budget_webhook_secret_sealed and raw[6:20] not in tenant.budget_webhook_secret_sealed
    assert tenant_webhook_secret(tenant=tenant) == raw
    with override_settings(WEBHOOK_SECRET_KEY="another-server-secret-0123456789"):
        # The sealed value is useless without the key: a fresh secret is made, never the old one.
        assert tenant_webhook_secret(tenant=tenant) != raw


@pytest.mark.slow  # listens on a socket
def test_a_failing_receiver_is_retried_with_backoff_then_gets_the_same_event(acme):
    secret = tenant_webhook_secret_rotate(tenant=acme)
    _Receiver.statuses = [503, 500]
    alert = _one_alert(acme)

    budget_alert_notify_task(alert.pk)
    alert.refresh_from_db()
    assert alert.webhook_result == f"HTTP 503 (attempt 1 of {WEBHOOK_MAX_ATTEMPTS}, will retry)"
    first_retry = alert.webhook_next_attempt_at
    assert first_retry is not None and first_retry - alert.notified_at >= timedelta(seconds=59)

    assert budget_webhooks_retry(now=first_retry - timedelta(seconds=1)) == 0  # not due yet
    assert budget_webhooks_retry(now=first_retry) == 1
    alert.refresh_from_db()
    assert alert.webhook_attempts == 2 and "HTTP 500" in alert.webhook_result
    assert alert.webhook_next_attempt_at - first_retry == timedelta(minutes=5)  # the wait grows
    assert budget_webhooks_retry(now=first_retry) == 0  # a second pass at the same time sends nothing

    assert budget_webhooks_retry(now=alert.webhook_next_attempt_at) == 1
    alert.refresh_from_db()
    assert (alert.webhook_result, alert.webhook_attempts, alert.webhook_next_attempt_at) == (
        "HTTP 204 (attempt 3)",
        3,
        None,
    )
    assert len(_Receiver.received) == 3
    assert {event_id for _, _, event_id in _Receiver.received} == {f"budget_alert_{alert.pk}"}
    # Each attempt is signed afresh, each verifies (the retries were sent with a past `now`).
    assert all(verify(secret, h, b, now=int(h.split(",")[0][2:])) for h, b, _ in _Receiver.received)


def test_a_receiver_that_never_answers_is_given_up_after_the_last_attempt(db, caplog):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    tenant = tenant_create(slug="acme", monthly_spend_limit_micros=10_000_000)
    # Credentials in the URL: used for the request, never written to a log or the alert row.
    tenant.budget_webhook_url = f"http://hookuser:hunter2-secret@127.0.0.1:{closed}/hook?token=tok-secret"
    tenant.save()
    alert = _one_alert(tenant)

    with caplog.at_level(logging.WARNING, logger="apps.metering.notify"):
        budget_alert_notify_task(alert.pk)
        for _ in range(WEBHOOK_MAX_ATTEMPTS):
            alert.refresh_from_db()
            if alert.webhook_next_attempt_at is None:
                break
            budget_webhooks_retry(now=alert.webhook_next_attempt_at)

    alert.refresh_from_db()
    assert alert.webhook_attempts == WEBHOOK_MAX_ATTEMPTS and alert.webhook_next_attempt_at is None
    assert alert.webhook_result.endswith("gave up)") and "ConnectError" in alert.webhook_result
    assert f"http://127.0.0.1:{closed}/" in caplog.text
    assert "hunter2" not in caplog.text and "tok-secret" not in caplog.text and "hookuser" not in caplog.text
    assert "hunter2" not in alert.webhook_result


def test_a_url_that_is_not_http_is_never_requested():
    delivery = webhooks.post_json(url="ftp://files.acme.test/hook", payload={}, event_id="e", secret="whsec_x")
    assert delivery == webhooks.Delivery(ok=False, result="failed: not an http(s) URL")
    assert not webhooks.post_json(url="http://[::1", payload={}, event_id="e", secret="whsec_x").ok
    assert webhooks.url_for_log("https://u:p@hooks.acme.test:8443/a/b?c=d") == "https://hooks.acme.test:8443/…"
