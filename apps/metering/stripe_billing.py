"""Stripe: the only module that imports ``stripe`` (one module per external system).

It sends one Billing Meter event and turns the library's exceptions into ``StripeSendError``
with a ``retry`` verdict; what to send and the bookkeeping live in apps.metering.billing.

The client is built per call from settings (STRIPE_API_KEY, STRIPE_API_BASE for a local stub,
STRIPE_TIMEOUT_S) with the library's own retries off: a failed event stays in its row and the
next hourly run resends it, with the same identifier and Idempotency-Key.
"""

from __future__ import annotations

from dataclasses import dataclass

import stripe
from django.conf import settings


def enabled() -> bool:
    return bool(settings.STRIPE_API_KEY)


@dataclass
class StripeSendError(Exception):
    message: str
    retry: bool  # False: the same request would fail the same way (bad key, bad params)
    status: int | None = None
    code: str | None = None

    def __str__(self) -> str:
        parts = [f"HTTP {self.status}" if self.status else "no response", self.code or "", self.message]
        return ": ".join(part for part in parts if part)[:500]


def _client() -> stripe.StripeClient:
    base = settings.STRIPE_API_BASE.rstrip("/")
    return stripe.StripeClient(
        settings.STRIPE_API_KEY,
        base_addresses={"api": base} if base else None,
        max_network_retries=0,
        http_client=stripe.RequestsClient(timeout=settings.STRIPE_TIMEOUT_S),
    )


def meter_event_create(*, event_name: str, customer_id: str, value: int, identifier: str, timestamp: int) -> str:
    """POST /v1/billing/meter_events; returns the event's identifier as Stripe echoed it.

    The identifier doubles as the Idempotency-Key: a resend of an event whose first attempt did
    reach Stripe (timeout after the write) replays the first answer instead of counting twice.
    """
    if not enabled():
        raise StripeSendError("STRIPE_API_KEY is not set", retry=False)
    try:
        event = _client().v1.billing.meter_events.create(
            params={
                "event_name": event_name,
                "payload": {"stripe_customer_id": customer_id, "value": str(value)},
                "identifier": identifier,
                "timestamp": timestamp,
            },
            options={"idempotency_key": identifier},
        )
    except (stripe.AuthenticationError, stripe.PermissionError, stripe.IdempotencyError) as exc:
        raise _error(exc, retry=False) from exc  # the same request fails the same way
    except stripe.InvalidRequestError as exc:
        raise _error(exc, retry=False) from exc  # a bad parameter, an unknown meter: staff must look
    except stripe.StripeError as exc:  # rate limits, connection errors, Stripe's 5xx
        raise _error(exc, retry=True) from exc
    return str(event.identifier or identifier)


def _error(exc: stripe.StripeError, *, retry: bool) -> StripeSendError:
    # user_message/_message never include the API key; the key is only ever in a header.
    return StripeSendError(
        message=str(exc.user_message or str(exc) or type(exc).__name__),
        retry=retry,
        status=exc.http_status,
        code=exc.code,
    )
