"""The gateway end to end: the openai SDK → uvicorn + Gateway → simulator processes."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from apps.gateway.tests.conftest import NODE_KEY, ready_node, wait_until
from apps.metering.models import UsageRecord
from apps.tenancy.services import api_key_issue, api_key_revoke, tenant_suspend
from vllm_sim import run_simulator_process

pytestmark = pytest.mark.slow  # starts a uvicorn gateway and simulator processes

MSG = [{"role": "user", "content": "Say something short"}]


@pytest.fixture
def sim():
    with run_simulator_process(model="llama-3-8b", api_key=NODE_KEY, ttft_ms=5, itl_ms=2, light=True) as handle:
        yield handle


@pytest.fixture
def client(gateway, api_key) -> openai.OpenAI:
    return openai.OpenAI(base_url=gateway.base_url, api_key=api_key[1], max_retries=0, timeout=20)


def usage_records(n: int, timeout_s: float = 5.0) -> list[UsageRecord]:
    return wait_until(
        lambda: list(UsageRecord.objects.all()) if UsageRecord.objects.count() >= n else None, timeout_s
    ) or list(UsageRecord.objects.all())


def test_non_streaming_chat_matches_the_node_and_is_metered(gateway, client, catalog_model, sim) -> None:
    ready_node(catalog_model, sim.url, gateway=gateway)
    direct = openai.OpenAI(base_url=sim.base_url, api_key=NODE_KEY).chat.completions.create(
        model="llama-3-8b", messages=MSG, max_tokens=7
    )

    raw = client.chat.completions.with_raw_response.create(model="llama-3-8b", messages=MSG, max_tokens=7)
    answer = raw.parse()

    assert answer.choices[0].message.content == direct.choices[0].message.content
    assert answer.usage.completion_tokens == 7 and answer.usage.prompt_tokens == direct.usage.prompt_tokens
    request_id = raw.headers["x-request-id"]
    [record] = usage_records(1)
    assert record.request_id == request_id and record.status_code == 200 and not record.streamed
    assert (record.prompt_tokens, record.completion_tokens, record.estimated) == (direct.usage.prompt_tokens, 7, False)
    assert record.model_id == catalog_model.pk and record.node_id is not None and record.cost_micros >= 0


def test_streaming_chat_is_relayed_event_for_event_and_usage_chunk_is_stripped(
    gateway, api_key, catalog_model, sim
) -> None:
    ready_node(catalog_model, sim.url, gateway=gateway)
    body = {"model": "llama-3-8b", "messages": MSG, "max_tokens": 5, "stream": True}
    direct = httpx.post(sim.base_url + "/chat/completions", json=body, headers={"Authorization": f"Bearer {NODE_KEY}"})
    via = httpx.post(
        gateway.base_url + "/chat/completions", json=body, headers={"Authorization": f"Bearer {api_key[1]}"}
    )

    assert via.status_code == 200 and via.headers["content-type"].startswith("text/event-stream")
    direct_events = [e for e in direct.text.split("\n\n") if e]
    via_events = [e for e in via.text.split("\n\n") if e]
    assert via_events[-1] == "data: [DONE]"
    assert len(via_events) == len(direct_events)
    assert not any('"choices":[]' in e for e in via_events)  # the client did not ask for usage
    strip = lambda e: {k: v for k, v in json.loads(e[6:]).items() if k not in ("id", "created")}  # noqa: E731
    assert [strip(e) for e in via_events[:-1]] == [strip(e) for e in direct_events[:-1]]
    [record] = usage_records(1)
    assert record.streamed and record.completion_tokens == 5 and not record.estimated and record.ttft_ms > 0


def test_streaming_with_include_usage_keeps_the_usage_chunk(gateway, client, catalog_model, sim) -> None:
    ready_node(catalog_model, sim.url, gateway=gateway)
    chunks = list(
        client.chat.completions.create(
            model="llama-3-8b", messages=MSG, max_tokens=4, stream=True, stream_options={"include_usage": True}
        )
    )
    assert chunks[-1].usage is not None and chunks[-1].usage.completion_tokens == 4
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert len(text.split()) == 4


def test_completions_and_embeddings_are_proxied(gateway, client, catalog_model, sim) -> None:
    ready_node(catalog_model, sim.url, gateway=gateway)
    done = client.completions.create(model="llama-3-8b", prompt="Once upon", max_tokens=3)
    assert done.usage.completion_tokens == 3
    streamed = list(client.completions.create(model="llama-3-8b", prompt="Once upon", max_tokens=3, stream=True))
    assert "".join(c.choices[0].text for c in streamed if c.choices) == done.choices[0].text
    emb = client.embeddings.create(model="llama-3-8b", input="hello world")
    assert len(emb.data[0].embedding) > 0


def test_the_customer_key_never_reaches_the_node(gateway, client, api_key, catalog_model, sim) -> None:
    ready_node(catalog_model, sim.url, gateway=gateway)
    client.chat.completions.create(model="llama-3-8b", messages=MSG, max_tokens=2)
    seen = json.dumps(sim.stats())
    assert api_key[1] not in seen
    assert NODE_KEY in seen


def test_models_lists_what_the_key_may_use_with_readiness(gateway, tenant, catalog_model, sim) -> None:
    from apps.catalog.services import model_create

    model_create(name="other-model")
    ready_node(catalog_model, sim.url, gateway=gateway)
    _, raw = api_key_issue(tenant=tenant, allowed_models=["llama-3-8b"])
    c = openai.OpenAI(base_url=gateway.base_url, api_key=raw, max_retries=0)
    assert wait_until(lambda: [m.id for m in c.models.list().data] == ["llama-3-8b"])
    listed = httpx.get(gateway.base_url + "/models", headers={"Authorization": f"Bearer {raw}"}).json()
    assert listed["data"][0]["ready"] is True


def error_of(response: httpx.Response) -> dict:
    body = response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert response.headers.get("x-request-id", "").startswith("req_")
    return body["error"]


@pytest.mark.parametrize(
    ("header", "why"),
    [
        (None, "Missing"),
        ("Bearer clk_nope", "Incorrect"),
        ("Basic abc", "Malformed"),
    ],
)
def test_bad_credentials_are_401_in_openai_shape(gateway, header, why) -> None:
    headers = {"Authorization": header} if header else {}
    r = httpx.post(gateway.base_url + "/chat/completions", json={"model": "x", "messages": MSG}, headers=headers)
    assert r.status_code == 401
    err = error_of(r)
    assert err["type"] == "authentication_error" and why in err["message"]


def test_revoked_key_is_rejected_within_one_second(gateway, client, api_key, catalog_model, sim) -> None:
    ready_node(catalog_model, sim.url, gateway=gateway)
    client.chat.completions.create(model="llama-3-8b", messages=MSG, max_tokens=1)  # cached now
    api_key_revoke(key=api_key[0])
    import time

    revoked_at = time.monotonic()
    rejected = wait_until(
        lambda: (
            httpx.get(
                client.base_url.__str__().rstrip("/") + "/models", headers={"Authorization": f"Bearer {api_key[1]}"}
            ).status_code
            == 401
        ),
        timeout_s=1.0,
    )
    assert rejected and time.monotonic() - revoked_at < 1.0


def test_suspended_tenant_and_missing_scope_and_model_restriction(gateway, tenant, catalog_model, sim) -> None:
    from apps.catalog.services import model_create

    ready_node(catalog_model, sim.url, gateway=gateway)
    model_create(name="private-model")
    _, usage_only = api_key_issue(tenant=tenant, scopes=["usage:read"])
    _, restricted = api_key_issue(tenant=tenant, allowed_models=["llama-3-8b"])
    url = gateway.base_url + "/chat/completions"
    r = httpx.post(
        url, json={"model": "llama-3-8b", "messages": MSG}, headers={"Authorization": f"Bearer {usage_only}"}
    )
    assert r.status_code == 403 and error_of(r)["type"] == "permission_error"
    assert wait_until(
        lambda: (
            httpx.post(
                url, json={"model": "private-model", "messages": MSG}, headers={"Authorization": f"Bearer {restricted}"}
            ).status_code
            == 403
        )
    )
    tenant_suspend(tenant=tenant, reason="unpaid")
    assert wait_until(
        lambda: (
            httpx.post(
                url, json={"model": "llama-3-8b", "messages": MSG}, headers={"Authorization": f"Bearer {restricted}"}
            ).status_code
            == 401
        ),
        timeout_s=1.0,
    )


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (json.dumps({"messages": MSG}).encode(), "model"),
        (json.dumps({"model": "llama-3-8b"}).encode(), "messages"),
        (json.dumps({"model": "llama-3-8b", "messages": "hi"}).encode(), "messages"),
        (json.dumps({"model": "llama-3-8b", "messages": MSG, "stream": "yes"}).encode(), "stream"),
        (json.dumps({"model": "llama-3-8b", "messages": MSG, "max_tokens": -1}).encode(), "max_tokens"),
        (b'{"model": "llama-3-8b", "messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}", None),  # RecursionError
    ],
)
def test_bad_input_is_400_naming_the_param(gateway, api_key, catalog_model, body, param) -> None:
    r = httpx.post(
        gateway.base_url + "/chat/completions",
        content=body,
        headers={"Authorization": f"Bearer {api_key[1]}", "Content-Type": "application/json"},
    )
    assert r.status_code == 400
    err = error_of(r)
    assert err["type"] == "invalid_request_error" and err["param"] == param


def test_oversized_body_wrong_method_unknown_model_and_path(gateway, api_key, catalog_model, settings) -> None:
    auth = {"Authorization": f"Bearer {api_key[1]}"}
    huge = {"model": "llama-3-8b", "messages": [{"role": "user", "content": "x" * 5_000_000}]}
    r = httpx.post(gateway.base_url + "/chat/completions", json=huge, headers=auth)
    assert r.status_code == 413 and error_of(r)["code"] == "request_too_large"
    r = httpx.get(gateway.base_url + "/chat/completions", headers=auth)
    assert r.status_code == 405 and r.headers["allow"] == "POST"
    r = httpx.post(gateway.base_url + "/chat/completions", json={"model": "nope", "messages": MSG}, headers=auth)
    assert r.status_code == 404 and error_of(r)["code"] == "model_not_found"
    r = httpx.post(gateway.base_url + "/nope", json={}, headers=auth)
    assert r.status_code == 404


def test_no_ready_node_is_503_with_retry_after(gateway, api_key, catalog_model) -> None:
    # Nothing starting and a policy that starts nothing on demand (min_replicas 0 would hold the
    # request while a node starts: test_coldstart.py).
    type(catalog_model).objects.filter(pk=catalog_model.pk).update(min_replicas=1, max_replicas=1)
    r = httpx.post(
        gateway.base_url + "/chat/completions",
        json={"model": "llama-3-8b", "messages": MSG},
        headers={"Authorization": f"Bearer {api_key[1]}"},
    )
    assert r.status_code == 503 and int(r.headers["retry-after"]) >= 1
    assert error_of(r)["code"] == "no_capacity"


def test_health_touches_nothing_and_ready_checks_database_and_redis(gateway) -> None:
    assert httpx.get(gateway.url + "/health").json() == {"status": "ok"}
    ready = httpx.get(gateway.url + "/ready")
    assert ready.status_code == 200 and ready.json()["checks"] == {"database": "ok", "redis": "ok"}


def test_django_still_serves_everything_else(gateway) -> None:
    r = httpx.get(gateway.url + "/admin/login/")
    assert r.status_code == 200 and "CrossLogic admin" in r.text and 'name="csrfmiddlewaretoken"' in r.text


def test_after_warm_up_requests_do_not_touch_the_database_for_keys(gateway, client, catalog_model, sim) -> None:
    ready_node(catalog_model, sim.url, gateway=gateway)
    client.chat.completions.create(model="llama-3-8b", messages=MSG, max_tokens=1)  # warm-up
    loads = []
    real_load = gateway.app.keys._load

    async def counting_load(prefix: str):
        loads.append(prefix)
        return await real_load(prefix)

    gateway.app.keys._load = counting_load
    for _ in range(20):
        client.chat.completions.create(model="llama-3-8b", messages=MSG, max_tokens=1)
    assert loads == []


def test_monthly_token_budget_is_enforced(gateway, api_key, tenant, catalog_model, sim, redis_db) -> None:
    from apps.gateway.limits import Budget
    from apps.tenancy.services import tenant_update

    tenant_update(tenant=tenant, monthly_token_budget=50)  # each call below costs 30
    ready_node(catalog_model, sim.url, gateway=gateway)
    client = openai.OpenAI(base_url=gateway.base_url, api_key=api_key[1], max_retries=0)
    assert wait_until(lambda: gateway.app.keys._entries == {})  # the tenant change reached the cache
    client.chat.completions.create(model="llama-3-8b", messages=MSG, max_tokens=20)
    client.chat.completions.create(model="llama-3-8b", messages=MSG, max_tokens=20)
    # The budget is charged as each request ends, just after its last byte went out: wait for it.
    month = Budget.monthly(tenant_id=tenant.pk, limit=50)
    assert wait_until(lambda: int(redis_db.get(month.key) or 0) == 60)
    with pytest.raises(openai.RateLimitError) as exc:
        client.chat.completions.create(model="llama-3-8b", messages=MSG, max_tokens=20)
    body = exc.value.body  # typed object by the SDK; the gateway sends a JSON object
    assert isinstance(body, dict) and body["code"] == "insufficient_quota"


def test_startup_freezes_what_lives_as_long_as_the_worker_and_shutdown_unfreezes(transactional_db, redis_db) -> None:
    import gc

    from apps.gateway.tests.conftest import running_gateway

    with running_gateway() as running:
        assert running.app._started
        assert gc.get_freeze_count() > 10_000  # Django and the apps, out of the collector's walks
    assert gc.get_freeze_count() == 0
