"""Dollar budget alerts: raised once a month per owner and level, then the tenant is told by
webhook (a real local HTTP server) and email; a failing webhook never breaks anything."""

from __future__ import annotations

import json
import socket
import threading
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest
from django.core import mail

from apps.metering.models import BudgetAlert, BudgetAlertLevel
from apps.metering.services import budget_alerts_raise
from apps.metering.tasks import budget_alert_notify_task
from apps.metering.tests.factories import make_usage
from apps.tenancy.services import api_key_issue, tenant_create

NOW = datetime(2026, 11, 20, 12, 0, tzinfo=UTC)


@pytest.fixture(autouse=True)
def _receivers_on_loopback(settings):
    # These receivers listen on 127.0.0.1, which production refuses (test_webhook_addresses.py).
    settings.WEBHOOK_ALLOW_PRIVATE_ADDRESSES = True


@pytest.fixture
def tenant(db):
    return tenant_create(
        slug="acme", contact_email="billing@acme.test", monthly_spend_limit_micros=10_000_000, budget_alert_percent=80
    )


def spend(tenant, micros: int, *, when: datetime = NOW, api_key=None) -> None:
    make_usage(tenant=tenant, api_key=api_key, cost_micros=micros, created_at=when)


def test_crossing_the_soft_threshold_raises_one_alert_a_month(tenant, django_capture_on_commit_callbacks):
    spend(tenant, 7_000_000)
    spend(tenant, 900_000, when=datetime(2026, 10, 31, 23, 59, tzinfo=UTC))  # last month: not counted
    assert budget_alerts_raise(now=NOW) == []  # $7 of $10: under 80%

    spend(tenant, 1_500_000)  # $8.50
    with django_capture_on_commit_callbacks() as queued:
        [alert] = budget_alerts_raise(now=NOW)
        again = budget_alerts_raise(now=NOW)

    assert again == [] and len(queued) == 1  # one notification, however often beat runs
    assert (alert.owner, alert.level, alert.threshold_percent) == (f"tenant:{tenant.pk}", BudgetAlertLevel.SOFT, 80)
    assert (alert.spend_micros, alert.limit_micros, alert.month.isoformat()) == (8_500_000, 10_000_000, "2026-11-01")
    next_month = budget_alerts_raise(now=datetime(2026, 12, 1, 0, 5, tzinfo=UTC))
    assert next_month == []  # December has no spend yet


def test_a_key_over_its_own_limit_raises_soft_and_hard(tenant):
    key, _ = api_key_issue(tenant=tenant, name="batch", monthly_spend_limit_micros=1_000_000)
    spend(tenant, 1_200_000, api_key=key)

    alerts = budget_alerts_raise(now=NOW)

    assert {(a.owner, a.level) for a in alerts} == {
        (f"key:{key.pk}", BudgetAlertLevel.SOFT),
        (f"key:{key.pk}", BudgetAlertLevel.HARD),
    }
    assert all(a.api_key_id == key.pk and a.tenant_id == tenant.pk for a in alerts)


class _Recorder(BaseHTTPRequestHandler):
    received: list[tuple[dict, dict]] = []

    def do_POST(self) -> None:
        body = self.rfile.read(int(self.headers["content-length"]))
        _Recorder.received.append(({k.lower(): v for k, v in self.headers.items()}, json.loads(body)))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


@pytest.mark.slow  # listens on a socket
def test_the_tenant_gets_a_webhook_and_an_email(tenant):
    server = HTTPServer(("127.0.0.1", 0), _Recorder)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    _Recorder.received = []
    try:
        tenant.budget_webhook_url = f"http://127.0.0.1:{server.server_port}/hooks/budget"
        tenant.save()
        spend(tenant, 10_000_001)
        alerts = budget_alerts_raise(now=NOW)
        for alert in alerts:
            budget_alert_notify_task(alert.pk)
            budget_alert_notify_task(alert.pk)  # delivered twice: notified once
    finally:
        server.shutdown()
        server.server_close()

    assert len(_Recorder.received) == 2 and len(mail.outbox) == 2
    payloads = {p["type"]: (h, p) for h, p in _Recorder.received}
    headers, hard = payloads["budget.limit_reached"]
    assert hard["tenant"] == "acme" and hard["spend_usd"] == "10.000001" and hard["limit_usd"] == "10.000000"
    assert headers["x-crosslogic-event-id"] == hard["id"] and hard["api_key"] is None
    assert "budget.threshold_reached" in payloads
    assert {m.to[0] for m in mail.outbox} == {"billing@acme.test"}
    assert any("spend limit reached" in m.subject and "$10.00" in m.body for m in mail.outbox)
    rows = BudgetAlert.objects.all()
    assert all(r.notified_at is not None and r.webhook_result == "HTTP 204" and r.email_result == "sent" for r in rows)


def test_a_dead_webhook_is_recorded_and_the_email_still_goes(tenant):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        closed = s.getsockname()[1]
    tenant.budget_webhook_url = f"http://127.0.0.1:{closed}/hook"
    tenant.save()
    spend(tenant, 9_000_000)
    [alert] = budget_alerts_raise(now=NOW)

    budget_alert_notify_task(alert.pk)

    alert.refresh_from_db()
    assert alert.webhook_result.startswith("failed: ConnectError (attempt 1 of") and alert.email_result == "sent"
    assert alert.webhook_next_attempt_at is not None  # tried again later (test_budget_webhook_signing.py)
    assert len(mail.outbox) == 1 and "80%" in mail.outbox[0].subject
