"""The usage flusher writes through metering and tenancy services, thinning last use by their rule."""

from __future__ import annotations

import asyncio
from datetime import timedelta

import pytest
from django.utils import timezone

from apps.gateway.usage import UsageRecorder
from apps.metering.models import UsageRecord

# The flusher writes from a worker thread on its own connection, as in production.
pytestmark = pytest.mark.django_db(transaction=True)


def test_flush_writes_every_record_and_last_use_at_most_once_per_window(tenant, api_key, settings) -> None:
    settings.API_KEY_LAST_USED_RESOLUTION_S = 60
    key, _ = api_key
    recorder = UsageRecorder()
    t0 = timezone.now()
    ids = iter(range(100))

    def use(at_s: float) -> None:
        recorder.record(
            {
                "request_id": f"req_{next(ids)}",
                "tenant_id": tenant.pk,
                "api_key_id": key.pk,
                "model_name": "m",
                "status_code": 200,
                "created_at": t0 + timedelta(seconds=at_s),
            }
        )

    def last_used():
        key.refresh_from_db()
        return key.last_used_at

    for at in (0, 1, 2):
        use(at)
    assert asyncio.run(recorder.flush()) == 3
    assert last_used() == t0

    use(30)  # inside the window: the record is written, last use is not
    assert asyncio.run(recorder.flush()) == 1
    assert last_used() == t0

    use(60)
    asyncio.run(recorder.flush())
    assert last_used() == t0 + timedelta(seconds=60)
    assert UsageRecord.objects.filter(api_key=key).count() == 5
