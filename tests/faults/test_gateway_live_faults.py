"""Fault injection against a running deployment (issue #11): the gateway process on its own
throwaway PostgreSQL and Redis, in front of simulator processes, under streaming load while
PostgreSQL is stopped, Redis is killed, a node is killed mid-stream, or one tenant sends a poison
request. After each: every stream ended with [DONE] or an error event, every request has exactly
one usage record (once the recorder could flush), and no 500 came from the gateway.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal

import httpx
import pytest
import redis as redis_py
from aiohttp import web

from apps.gateway.tests.fake_node import FakeNode, answer_like_vllm, vllm_error
from tests.faults.deployment import NODE_KEY, Outcome, chat_body, deployment, describe, load
from vllm_sim import run_simulator_process

pytestmark = pytest.mark.slow  # real servers and processes

SIM = dict(api_key=NODE_KEY, light=True, max_num_seqs=512)


def assert_clean(outcomes: list[Outcome]) -> None:
    """Every request got an HTTP answer, none a 500, every stream ended with [DONE] or an error event."""
    assert outcomes, "the load sent nothing"
    assert all(o.status and o.status != 500 for o in outcomes), describe(outcomes)
    assert all(o.ending in ("done", "error-event", "json") for o in outcomes), describe(outcomes)


def assert_one_record_each(dep, outcomes: list[Outcome]) -> dict[str, int]:
    counts = dep.records_by_request(outcomes)
    missing = [o for o in outcomes if counts.get(o.request_id) != 1]
    assert not missing, (
        f"{len(missing)} of {len(outcomes)} requests without exactly one usage record, e.g. {missing[0]}"
    )
    return counts


def test_postgresql_stopped_and_restarted_mid_load(throwaway_pg, throwaway_redis) -> None:
    with (
        deployment(throwaway_pg, throwaway_redis) as dep,
        run_simulator_process(model=dep.model, ttft_ms=10, itl_ms=10, **SIM) as sim,
    ):
        dep.seed([(sim.url, NODE_KEY)], tenants=("acme", "late"))
        dep.start_gateway()
        body = chat_body(dep.model, max_tokens=20)
        late: list[httpx.Response] = []

        async def scenario() -> list[Outcome]:
            running = asyncio.create_task(load(dep.url, dep.keys["acme"], body, slots=6, seconds=9))
            await asyncio.sleep(2)
            await asyncio.to_thread(throwaway_pg.stop)
            await asyncio.sleep(1)
            # A key the gateway has never seen, while the database is away: 503 + Retry-After, not a 500.
            async with httpx.AsyncClient(timeout=15) as client:
                late.append(
                    await client.post(
                        dep.url + "/v1/chat/completions",
                        content=body,
                        headers={"Authorization": f"Bearer {dep.keys['late']}", "Content-Type": "application/json"},
                    )
                )
            await asyncio.sleep(3)
            await asyncio.to_thread(throwaway_pg.start)
            return await running

        outcomes = asyncio.run(scenario())
        after = asyncio.run(load(dep.url, dep.keys["late"], body, slots=1, seconds=0.5, tenant="late"))

    assert_clean(outcomes)
    # The key was cached and the routing table kept: the customer saw nothing of the outage.
    assert all(o.status == 200 and o.ending == "done" for o in outcomes), describe(outcomes)
    [refused] = late
    assert refused.status_code == 503 and int(refused.headers["retry-after"]) >= 1, refused.text
    assert refused.json()["error"]["code"] == "service_unavailable"
    # The database back: the gateway reconnects by itself (the new key authenticates now).
    assert after and all(o.status == 200 and o.ending == "done" for o in after), describe(after)
    counts = assert_one_record_each(dep, outcomes + after)
    assert refused.headers["x-request-id"] not in counts  # refused before admission: nothing to meter


def test_redis_killed_and_restarted_mid_load(throwaway_pg, throwaway_redis) -> None:
    with (
        deployment(throwaway_pg, throwaway_redis) as dep,
        run_simulator_process(model=dep.model, ttft_ms=10, itl_ms=10, **SIM) as sim,
    ):
        dep.seed([(sim.url, NODE_KEY)])
        dep.start_gateway()
        body = chat_body(dep.model, max_tokens=20)

        async def scenario() -> list[Outcome]:
            running = asyncio.create_task(load(dep.url, dep.keys["acme"], body, slots=6, seconds=8))
            await asyncio.sleep(2)
            await asyncio.to_thread(throwaway_redis.kill)  # SIGKILL: everything in it is gone
            await asyncio.sleep(3)
            await asyncio.to_thread(throwaway_redis.start)  # empty, on the same port
            return await running

        outcomes = asyncio.run(scenario())
        client = redis_py.Redis.from_url(throwaway_redis.url(0))
        try:
            # The gateway found the new Redis again: its shared load board and limits write there.
            assert client.dbsize() > 0
        finally:
            client.close()

    assert_clean(outcomes)
    # Rate limiting fails open (GATEWAY_RATE_LIMIT_FAIL_OPEN): every request was served.
    assert all(o.status == 200 and o.ending == "done" for o in outcomes), describe(outcomes)
    assert_one_record_each(dep, outcomes)


def test_a_node_killed_mid_stream(throwaway_pg, throwaway_redis) -> None:
    with (
        deployment(throwaway_pg, throwaway_redis) as dep,
        run_simulator_process(model=dep.model, ttft_ms=10, itl_ms=25, **SIM) as doomed,
        run_simulator_process(model=dep.model, ttft_ms=10, itl_ms=25, **SIM) as survivor,
    ):
        dep.seed([(doomed.url, NODE_KEY), (survivor.url, NODE_KEY)])
        dep.start_gateway()
        body = chat_body(dep.model, max_tokens=40)  # about a second per stream

        async def scenario() -> list[Outcome]:
            running = asyncio.create_task(load(dep.url, dep.keys["acme"], body, slots=8, seconds=6))
            await asyncio.sleep(2.5)
            os.kill(doomed.proc.pid, signal.SIGKILL)
            return await running

        outcomes = asyncio.run(scenario())
        tail = asyncio.run(load(dep.url, dep.keys["acme"], body, slots=4, seconds=1))

    assert_clean(outcomes + tail)
    assert all(o.status == 200 for o in outcomes), describe(outcomes)
    cut = [o for o in outcomes if o.ending == "error-event"]
    assert cut, "no stream was on the killed node: the scenario did not happen"
    for o in cut:
        error = json.loads(o.body.strip().removeprefix("data: "))["error"]
        assert error["code"] == "upstream_error" and error["type"] == "server_error"
    # Later requests go to the survivor: the dead node is cooled down, nothing else fails.
    assert all(o.ending == "done" for o in tail), describe(tail)
    counts = assert_one_record_each(dep, outcomes + tail)
    assert len(counts) == len(outcomes) + len(tail)
    rows = dict(
        (rid, (status, estimated))
        for rid, status, estimated in dep.query(
            "SELECT request_id, status_code, estimated FROM metering_usagerecord WHERE request_id = ANY(%s)",
            [[o.request_id for o in cut]],
        )
    )
    # What was delivered before the cut is billed, marked as counted by the gateway.
    assert set(rows.values()) == {(502, True)}


POISON = "POISON-PILL"


async def poison_or_answer(request: web.Request, raw: bytes) -> web.StreamResponse:
    if POISON.encode() in raw:  # an input that crashes any engine it reaches
        return vllm_error(500, "EngineCore encountered an issue.")
    return await answer_like_vllm(request, raw)


def test_a_poison_request_on_one_of_two_nodes_harms_no_other_tenant(throwaway_pg, throwaway_redis) -> None:
    with (
        deployment(throwaway_pg, throwaway_redis) as dep,
        FakeNode(poison_or_answer, key=NODE_KEY) as first,
        FakeNode(poison_or_answer, key=NODE_KEY) as second,
    ):
        dep.seed([(first.url, NODE_KEY), (second.url, NODE_KEY)], tenants=("victim", "attacker"))
        dep.start_gateway()
        good = chat_body(dep.model, max_tokens=8)
        bad = chat_body(dep.model, max_tokens=8, stream=False, content=POISON)

        async def scenario() -> tuple[list[Outcome], list[Outcome]]:
            victims = asyncio.create_task(load(dep.url, dep.keys["victim"], good, slots=6, seconds=5, tenant="victim"))
            await asyncio.sleep(0.5)
            attacks = await load(dep.url, dep.keys["attacker"], bad, slots=1, seconds=3, tenant="attacker", pause_s=0.2)
            return await victims, attacks

        victims, attacks = asyncio.run(scenario())
        poisoned = [b for b in first.bodies + second.bodies if POISON.encode() in b]
        node_status = dep.query("SELECT status FROM fleet_node WHERE id = ANY(%s)", [dep.node_ids])

    assert_clean(victims)
    # The other tenant never noticed: no 503 from a cooled-down node, every stream complete.
    assert all(o.status == 200 and o.ending == "done" for o in victims), describe(victims)
    assert len(attacks) >= 5
    for o in attacks:  # the poison request itself gets the engine's error, OpenAI-shaped
        assert o.status == 502 and o.ending == "json", o
        assert json.loads(o.body)["error"]["code"] == "upstream_error", o
    # Each poison request was tried on two nodes at most, then answered: never spread further.
    assert len(poisoned) <= 2 * len(attacks)
    assert {s for (s,) in node_status} == {"ready"}
    assert_one_record_each(dep, victims + attacks)
