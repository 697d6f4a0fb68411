"""Stripe Billing Meter events: the real ``stripe`` library against a local stub of Stripe's API
(apps/metering/tests/stripe_stub.py), asserting the exact requests."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from io import StringIO

import pytest
from django.core.management import CommandError, call_command
from django.utils import timezone

from apps.metering import billing, tasks
from apps.metering.models import MeterEventStatus, StripeCustomer, StripeMeterEvent
from apps.metering.rollups import floor_hour, rollups_build
from apps.metering.tests.factories import make_usage
from apps.metering.tests.stripe_stub import API_KEY, StripeStub
from apps.tenancy.services import tenant_create

pytestmark = [pytest.mark.django_db, pytest.mark.slow]


@pytest.fixture
def stub(settings) -> Iterator[StripeStub]:
    server = StripeStub().start()
    settings.STRIPE_API_KEY = API_KEY
    settings.STRIPE_API_BASE = server.url
    settings.STRIPE_METER_PROMPT_TOKENS = "cl_prompt"
    settings.STRIPE_METER_COMPLETION_TOKENS = "cl_completion"
    settings.STRIPE_METER_COST_MICROS = ""
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def hour():
    return floor_hour(timezone.now()) - timedelta(hours=3)


@pytest.fixture
def billed(tenant, hour):
    """acme is billed to a Stripe customer and used 2 requests (24 prompt, 60 completion tokens)
    in ``hour``; another tenant without a customer is never sent."""
    StripeCustomer.objects.create(tenant=tenant, customer_id="cus_Acme123")
    make_usage(tenant=tenant, created_at=hour + timedelta(minutes=1))
    make_usage(tenant=tenant, created_at=hour + timedelta(minutes=2))
    make_usage(tenant=tenant_create(slug="unbilled"), created_at=hour + timedelta(minutes=3))
    rollups_build(hour=hour)
    return tenant


def _sent(stub: StripeStub) -> list[dict[str, str]]:
    return [r.form for r in stub.requests]


def test_hourly_task_sends_one_event_per_tenant_hour_meter_with_exact_requests(stub, billed, hour) -> None:
    tasks.stripe_meter_events_hourly()

    stamp = str(int(hour.timestamp()))
    ident = f"cl-{billed.pk}-{hour:%Y%m%d%H}"
    assert _sent(stub) == [
        {
            "event_name": "cl_completion",
            "payload[stripe_customer_id]": "cus_Acme123",
            "payload[value]": "60",
            "identifier": f"{ident}-completion_tokens",
            "timestamp": stamp,
        },
        {
            "event_name": "cl_prompt",
            "payload[stripe_customer_id]": "cus_Acme123",
            "payload[value]": "24",
            "identifier": f"{ident}-prompt_tokens",
            "timestamp": stamp,
        },
    ]
    for request in stub.requests:
        assert (request.method, request.path) == ("POST", "/v1/billing/meter_events")
        assert request.headers["authorization"] == f"Bearer {API_KEY}"
        assert request.headers["content-type"] == "application/x-www-form-urlencoded"
        assert request.headers["idempotency-key"] == request.form["identifier"]
        assert request.headers["stripe-version"]
    assert sorted(stub.events) == [f"{ident}-completion_tokens", f"{ident}-prompt_tokens"]
    rows = StripeMeterEvent.objects.order_by("meter")
    assert [(r.meter, r.value, r.status, r.attempts) for r in rows] == [
        ("completion_tokens", 60, MeterEventStatus.SENT, 1),
        ("prompt_tokens", 24, MeterEventStatus.SENT, 1),
    ]

    stub.requests.clear()
    tasks.stripe_meter_events_hourly()  # nothing new: nothing sent
    assert stub.requests == []


def test_late_records_are_sent_as_a_revision_with_the_difference(stub, billed, hour) -> None:
    tasks.stripe_meter_events_hourly()
    stub.requests.clear()
    make_usage(tenant=billed, created_at=hour + timedelta(minutes=50), prompt_tokens=5, completion_tokens=0)
    rollups_build(hour=hour)

    tasks.stripe_meter_events_hourly()

    assert _sent(stub) == [
        {
            "event_name": "cl_prompt",
            "payload[stripe_customer_id]": "cus_Acme123",
            "payload[value]": "5",
            "identifier": f"cl-{billed.pk}-{hour:%Y%m%d%H}-prompt_tokens-r1",
            "timestamp": str(int(hour.timestamp())),
        }
    ]


def test_a_failure_is_recorded_and_the_same_request_is_resent_later(stub, billed, hour) -> None:
    stub.fail_next.append((500, {"type": "api_error", "message": "Something went wrong on Stripe's end."}))
    now = timezone.now()
    billing.meter_events_plan(start=hour, end=hour + timedelta(hours=1), now=now)

    first = billing.meter_events_send(now=now)

    assert (first.sent, first.failed) == (1, 1)
    failed = StripeMeterEvent.objects.get(status=MeterEventStatus.FAILED)
    assert failed.attempts == 1 and "HTTP 500" in failed.last_error and "Stripe's end" in failed.last_error
    assert failed.next_attempt_at == now + timedelta(minutes=5)
    assert billing.meter_events_send(now=now).sent == 0  # not due yet

    second = billing.meter_events_send(now=now + timedelta(minutes=6))

    assert (second.sent, second.failed) == (1, 0)
    assert stub.requests[0].form == stub.requests[2].form  # the same request, byte for byte
    assert StripeMeterEvent.objects.filter(status=MeterEventStatus.SENT).count() == 2


def test_a_resend_of_an_event_stripe_already_has_is_replayed_not_counted_twice(stub, billed, hour) -> None:
    tasks.stripe_meter_events_hourly()
    # As if the worker died after Stripe accepted but before it marked the rows sent.
    StripeMeterEvent.objects.update(status=MeterEventStatus.PENDING)

    result = billing.meter_events_send()

    assert result.sent == 2 and len(stub.requests) == 4 and len(stub.events) == 2


def test_a_conflicting_idempotency_key_is_a_recorded_failure(stub, billed, hour) -> None:
    tasks.stripe_meter_events_hourly()
    # Someone edited a sent row's value by hand and resent it: Stripe refuses the changed request.
    StripeMeterEvent.objects.filter(meter="prompt_tokens").update(status=MeterEventStatus.PENDING, value=99)

    result = billing.meter_events_send()

    assert result.failed == 1
    row = StripeMeterEvent.objects.get(meter="prompt_tokens")
    assert row.status == MeterEventStatus.FAILED and "same parameters" in row.last_error


def test_a_wrong_api_key_stops_the_run_and_is_recorded(stub, billed, hour, settings) -> None:
    settings.STRIPE_API_KEY = "sk_test_wrong_key_000000000"
    now = timezone.now()
    billing.meter_events_plan(start=hour, end=hour + timedelta(hours=1), now=now)

    result = billing.meter_events_send(now=now)

    assert (result.sent, result.failed) == (0, 1) and len(stub.requests) == 1  # stopped after the first
    row = StripeMeterEvent.objects.get(status=MeterEventStatus.FAILED)
    assert "HTTP 401" in row.last_error and "sk_test_wrong" not in row.last_error
    assert row.next_attempt_at == now + timedelta(hours=6)


def test_stripe_refusing_a_request_is_recorded_with_its_message(stub, billed, hour) -> None:
    stub.fail_next.append(
        (400, {"type": "invalid_request_error", "message": "No such meter: cl_prompt", "param": "event_name"})
    )
    billing.meter_events_plan(start=hour, end=hour + timedelta(hours=1))

    result = billing.meter_events_send()

    assert (result.sent, result.failed) == (1, 1)
    assert "No such meter" in StripeMeterEvent.objects.get(status=MeterEventStatus.FAILED).last_error


def test_stripe_backfill_sends_a_range_and_says_what_it_did(stub, billed, hour) -> None:
    args = ["--start", hour.isoformat(), "--end", (hour + timedelta(hours=1)).isoformat()]
    dry = StringIO()
    call_command("stripe_backfill", *args, "--dry-run", stdout=dry)
    assert dry.getvalue().count("would send cl-") == 2
    assert not StripeMeterEvent.objects.exists() and stub.requests == []

    out = StringIO()
    call_command("stripe_backfill", *args, stdout=out)

    assert "2 new meter event(s) planned; 2 sent, 0 failed" in out.getvalue()
    assert len(stub.events) == 2
    with pytest.raises(CommandError, match="start: 'yesterday' is not an ISO 8601 date"):
        call_command("stripe_backfill", "--start", "yesterday", "--end", "2026-11-02")


def test_stripe_is_off_without_a_key(settings, billed) -> None:
    settings.STRIPE_API_KEY = ""
    tasks.stripe_meter_events_hourly()
    assert not StripeMeterEvent.objects.exists()
    with pytest.raises(CommandError, match="STRIPE_API_KEY"):
        call_command("stripe_backfill", "--start", "2026-11-01", "--end", "2026-11-02")
