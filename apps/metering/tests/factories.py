"""Test factories for usage records (the gateway writes them in production)."""

from __future__ import annotations

import itertools
from typing import Any

from apps.metering.models import UsageRecord

_ids = itertools.count(1)


def make_usage(*, tenant: Any, api_key: Any = None, model: Any = None, node: Any = None, **fields: Any) -> UsageRecord:
    values: dict[str, Any] = {
        "request_id": f"req-test-{next(_ids):08d}",
        "model_name": model.name if model is not None else "llama-3-8b",
        "prompt_tokens": 12,
        "completion_tokens": 30,
        "status_code": 200,
        "latency_ms": 250.0,
        "ttft_ms": 40.0,
        "cost_micros": 7,
    }
    values.update(fields)
    return UsageRecord.objects.create(tenant=tenant, api_key=api_key, model=model, node=node, **values)
