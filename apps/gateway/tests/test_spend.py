"""Monthly spend limits in dollars through the real gateway: the openai SDK → uvicorn + Gateway →
a simulator process, with Redis and PostgreSQL real."""

from __future__ import annotations

from decimal import Decimal

import openai
import pytest
from django.db.models import Sum

from apps.catalog.services import model_update
from apps.gateway.limits import Budget
from apps.gateway.tests.conftest import NODE_KEY, ready_node, wait_until
from apps.metering.models import UsageRecord
from apps.tenancy.services import api_key_issue, tenant_update
from vllm_sim import run_simulator_process

pytestmark = pytest.mark.slow  # starts a uvicorn gateway and a simulator process

MSG = [{"role": "user", "content": "Say something short"}]
# $1000 and $2000 per 1M tokens: one prompt token costs 1000 micro-dollars, one output token 2000.
PRICE_IN, PRICE_OUT = Decimal("1000"), Decimal("2000")


@pytest.fixture
def sim():
    with run_simulator_process(model="llama-3-8b", api_key=NODE_KEY, ttft_ms=5, itl_ms=2, light=True) as handle:
        yield handle


@pytest.fixture
def priced(gateway, catalog_model, sim):
    model_update(model=catalog_model, price_input_per_mtok=PRICE_IN, price_output_per_mtok=PRICE_OUT)
    ready_node(catalog_model, sim.url, gateway=gateway)
    assert wait_until(lambda: gateway.app.table.models["llama-3-8b"].price_out == PRICE_OUT)
    return catalog_model


def chat(client: openai.OpenAI):
    return client.chat.completions.create(model="llama-3-8b", messages=MSG, max_tokens=20)


def month_spend(**filters) -> int:
    return UsageRecord.objects.filter(**filters).aggregate(s=Sum("cost_micros"))["s"] or 0


def test_a_tenant_spend_limit_refuses_with_insufficient_quota_once_spent(gateway, api_key, tenant, priced, redis_db):
    tenant_update(tenant=tenant, monthly_spend_limit_micros=80_000)  # $0.08; one call below costs $0.05
    assert wait_until(lambda: gateway.app.keys._entries == {})  # the change reached the key cache
    client = openai.OpenAI(base_url=gateway.base_url, api_key=api_key[1], max_retries=0)
    first, second = chat(client), chat(client)
    cost = first.usage.prompt_tokens * 1000 + first.usage.completion_tokens * 2000
    counter = Budget.dollars(owner=f"tenant:{tenant.pk}", limit_micros=80_000).key
    assert wait_until(lambda: int(redis_db.get(counter) or 0) == 2 * cost)  # settled to the real cost

    with pytest.raises(openai.RateLimitError) as refused:
        chat(client)

    body = refused.value.body
    assert isinstance(body, dict) and body["code"] == "insufficient_quota" and body["type"] == "insufficient_quota"
    assert "$0.08" in body["message"] and body["param"] is None
    assert second.usage.completion_tokens == 20
    # The counter is what the usage records say: no money is lost or invented in between.
    assert wait_until(lambda: month_spend(tenant=tenant) == 2 * cost)
    assert UsageRecord.objects.count() == 2  # the refused request reached no node and costs nothing


def test_a_key_spend_limit_stops_that_key_only(gateway, api_key, tenant, priced, redis_db):
    small, small_raw = api_key_issue(tenant=tenant, name="capped", monthly_spend_limit_micros=40_000)
    capped = openai.OpenAI(base_url=gateway.base_url, api_key=small_raw, max_retries=0)
    other = openai.OpenAI(base_url=gateway.base_url, api_key=api_key[1], max_retries=0)
    chat(capped)  # admitted at $0, costs $0.05: over its $0.04

    assert wait_until(
        lambda: int(redis_db.get(Budget.dollars(owner=f"key:{small.pk}", limit_micros=0).key) or 0) > 40_000
    )
    with pytest.raises(openai.RateLimitError) as refused:
        chat(capped)
    assert refused.value.body["code"] == "insufficient_quota" and "API key" in refused.value.body["message"]
    assert chat(other).usage.completion_tokens == 20  # the tenant's other keys go on


def test_a_lost_counter_is_seeded_from_the_months_usage_records(gateway, api_key, tenant, priced, redis_db):
    tenant_update(tenant=tenant, monthly_spend_limit_micros=80_000)
    assert wait_until(lambda: gateway.app.keys._entries == {})
    client = openai.OpenAI(base_url=gateway.base_url, api_key=api_key[1], max_retries=0)
    chat(client)
    chat(client)
    assert wait_until(lambda: UsageRecord.objects.count() == 2)
    counter = Budget.dollars(owner=f"tenant:{tenant.pk}", limit_micros=80_000).key

    redis_db.delete(counter)  # Redis restarted, flushed or evicted the counter
    with pytest.raises(openai.RateLimitError) as refused:
        chat(client)

    assert refused.value.body["code"] == "insufficient_quota"
    assert int(redis_db.get(counter)) == month_spend(tenant=tenant) > 80_000  # seeded from PostgreSQL
