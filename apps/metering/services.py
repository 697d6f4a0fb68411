"""Writes for usage: what a request costs, and the usage records the gateway sends in batches.

The gateway decides when to write (it buffers off the request path, apps.gateway.usage); what
is written and how lives here.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from decimal import ROUND_HALF_UP, Decimal
from typing import Any

from apps.metering.models import UsageRecord


def cost_micros(*, prompt_tokens: int, completion_tokens: int, price_in: Decimal, price_out: Decimal) -> int:
    """USD per 1M tokens times tokens = micro-dollars, exactly, rounded half-up once at the end."""
    total = Decimal(prompt_tokens) * price_in + Decimal(completion_tokens) * price_out
    return int(total.quantize(Decimal(1), rounding=ROUND_HALF_UP))


def usage_records_create(*, rows: Iterable[Mapping[str, Any]]) -> None:
    """Insert one batch in one statement. ``ignore_conflicts`` on the unique request_id makes
    a retried batch that had in fact landed harmless."""
    UsageRecord.objects.bulk_create([UsageRecord(**row) for row in rows], ignore_conflicts=True)
