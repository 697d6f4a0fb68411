"""What a request costs, and the batch insert the gateway's usage flusher calls."""

from __future__ import annotations

from decimal import Decimal

import pytest

from apps.metering.models import UsageRecord
from apps.metering.services import cost_micros, usage_records_create


def test_cost_is_exact_micro_dollars_rounded_half_up_once() -> None:
    # $0.15 / $0.60 per 1M tokens: 1,000 prompt + 333 completion = 150 + 199.8 micro-dollars.
    assert (
        cost_micros(prompt_tokens=1000, completion_tokens=333, price_in=Decimal("0.15"), price_out=Decimal("0.60"))
        == 350
    )
    # Rounding each side separately would give 0 + 0; summing first gives the exact 0.5 -> 1.
    assert cost_micros(prompt_tokens=1, completion_tokens=1, price_in=Decimal("0.25"), price_out=Decimal("0.25")) == 1
    assert cost_micros(prompt_tokens=0, completion_tokens=0, price_in=Decimal("3"), price_out=Decimal("15")) == 0


@pytest.mark.django_db
def test_a_retried_batch_that_had_landed_is_harmless(tenant, api_key, django_assert_num_queries) -> None:
    rows = [
        {
            "request_id": f"req_{i}",
            "tenant_id": tenant.pk,
            "api_key_id": api_key[0].pk,
            "model_name": "m",
            "prompt_tokens": i,
            "completion_tokens": 1,
            "status_code": 200,
            "cost_micros": i,
        }
        for i in range(3)
    ]
    with django_assert_num_queries(1):
        usage_records_create(rows=rows)
    usage_records_create(rows=[*rows, {**rows[0], "request_id": "req_new"}])
    assert sorted(UsageRecord.objects.values_list("request_id", flat=True)) == ["req_0", "req_1", "req_2", "req_new"]
