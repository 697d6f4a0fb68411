"""A production-like deployment for the fault suite: the gateway as its own process (``python -m
crosslogic.serve``, the production protocol) on a throwaway PostgreSQL and Redis (servers.py),
seeded through the project's services in a subprocess, and a load driver that records how every
request ended. The tests then stop, kill and restart parts of it.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import psycopg

from bench._gateway_procs import Procs, start_gateway
from tests.faults.servers import ThrowawayPostgres, ThrowawayRedis

ROOT = Path(__file__).resolve().parents[2]
NODE_KEY = "faults-node-key"
TEMPLATE = "faults_template"

SEED = """
import django, json, sys
django.setup()
from apps.catalog.services import model_create
from apps.fleet.keys import SEALED_STATIC_KEY, seal_static_key
from apps.fleet.models import Node, NodeStatus
from apps.fleet.services import node_create, node_transition
from apps.tenancy.services import api_key_issue, tenant_create
spec = json.loads(sys.argv[1])
big = dict(requests_per_minute=1_000_000, tokens_per_minute=1_000_000_000, max_concurrent_requests=10_000)
model = model_create(name=spec["model"])
nodes = []
for url, key in spec["nodes"]:
    node = node_create(model=model, launcher="static", endpoint_url=url)
    Node.objects.filter(pk=node.pk).update(launcher_state={SEALED_STATIC_KEY: seal_static_key(key)})
    nodes.append(node_transition(node=node, to=NodeStatus.READY, reason="fault suite").pk)
keys = {}
for slug in spec["tenants"]:
    tenant = tenant_create(slug=slug, **big)
    keys[slug] = api_key_issue(tenant=tenant, name=slug, scopes=["inference"])[1]
print(json.dumps({"keys": keys, "nodes": nodes}))
"""


def production_env(**overrides: str) -> dict[str, str]:
    """The environment of a production-like server process: DEBUG off (with the secrets it then
    requires, made up per run), plain http on loopback (TLS is the reverse proxy's), no .env file,
    none of a developer's SkyPilot settings, no test-run variables."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("SKYPILOT_")}
    for name in ("TEST_REDIS_DB", "TEST_DB_SUFFIX", "VLLM_API_KEY"):
        env.pop(name, None)
    return {
        **env,
        "DJANGO_SETTINGS_MODULE": "crosslogic.settings",
        "CROSSLOGIC_ENV_FILE": "",
        "PYTHONPATH": str(ROOT),
        "DEBUG": "false",
        "SECRET_KEY": secrets.token_urlsafe(48),
        "API_KEY_PEPPER": secrets.token_urlsafe(24),
        "ALLOWED_HOSTS": "127.0.0.1,localhost",
        "SECURE_SSL_REDIRECT": "false",
        "LOG_LEVEL": "WARNING",
        **overrides,
    }


def migrate_template(pg: ThrowawayPostgres) -> None:
    """Migrate one database once a session; each test copies it (CREATE DATABASE … TEMPLATE: fast)."""
    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{TEMPLATE}"')
    env = production_env(DATABASE_URL=pg.url_for(TEMPLATE))
    env.pop("REDIS_URL", None)
    subprocess.run(
        [sys.executable, "manage.py", "migrate", "--noinput", "-v", "0"], cwd=ROOT, env=env, check=True, timeout=300
    )


@dataclass
class Outcome:
    request_id: str
    status: int
    ending: str  # "done" ([DONE]), "error-event" (an SSE error event), "json" (a non-stream answer), "cut"
    tenant: str
    body: str = ""


@dataclass
class Deployment:
    pg: ThrowawayPostgres
    redis: ThrowawayRedis
    database: str
    procs: Procs
    env: dict = field(default_factory=dict)
    url: str = ""
    gateway: subprocess.Popen | None = None
    keys: dict[str, str] = field(default_factory=dict)
    node_ids: list[int] = field(default_factory=list)
    model: str = "faults-model"

    @property
    def db_url(self) -> str:
        return self.pg.url_for(self.database)

    def seed(self, nodes: list[tuple[str, str]], tenants: tuple[str, ...] = ("acme",)) -> None:
        spec = json.dumps({"model": self.model, "nodes": nodes, "tenants": list(tenants)})
        out = subprocess.run(
            [sys.executable, "-c", SEED, spec], cwd=ROOT, env=self.env, check=True, capture_output=True, text=True
        )
        seeded = json.loads(out.stdout.strip().splitlines()[-1])
        self.keys, self.node_ids = seeded["keys"], seeded["nodes"]

    def start_gateway(self, workers: int = 0) -> None:
        self.gateway, self.url = start_gateway(self.env, workers, self.procs)
        key = next(iter(self.keys.values()))
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # routed: the table loads in the background
            models = httpx.get(self.url + "/v1/models", headers={"Authorization": f"Bearer {key}"}, timeout=5)
            if any(m["id"] == self.model and m.get("ready") for m in models.json().get("data", [])):
                return
            time.sleep(0.1)
        raise AssertionError("the gateway never routed the model")

    def query(self, sql: str, params: list | None = None) -> list[tuple]:
        with psycopg.connect(self.db_url, autocommit=True, connect_timeout=5) as conn:
            return conn.execute(sql, params or []).fetchall()

    def records_by_request(self, outcomes: list[Outcome], timeout_s: float = 45.0) -> dict[str, int]:
        """request id -> number of usage records, once every outcome's record is in (or the deadline)."""
        ids = [o.request_id for o in outcomes]
        deadline = time.monotonic() + timeout_s
        while True:
            rows = self.query(
                "SELECT request_id, count(*) FROM metering_usagerecord WHERE request_id = ANY(%s) GROUP BY 1", [ids]
            )
            counts = dict(rows)
            if len(counts) == len(set(ids)) or time.monotonic() > deadline:
                return counts
            time.sleep(0.25)


@contextmanager
def deployment(pg: ThrowawayPostgres, redis: ThrowawayRedis, **settings: str) -> Iterator[Deployment]:
    """A fresh database copied from the template, an emptied Redis, and the gateway's environment
    (``settings`` override it). The gateway is started by the test, after seeding."""
    database = f"faults_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(pg.url, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{database}" TEMPLATE "{TEMPLATE}"')
    import redis as redis_py

    client = redis_py.Redis.from_url(redis.url(0))
    client.flushall()
    client.close()
    env = production_env(
        DATABASE_URL=pg.url_for(database),
        REDIS_URL=redis.url(0),
        CELERY_BROKER_URL=redis.url(0),
        GATEWAY_USAGE_FLUSH_INTERVAL_S="0.2",
        ROUTING_REFRESH_S="1",
        **settings,
    )
    with Procs() as procs:
        yield Deployment(pg=pg, redis=redis, database=database, procs=procs, env=env)


async def _one(client: httpx.AsyncClient, url: str, key: str, body: bytes, tenant: str) -> Outcome:
    headers = {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}
    try:
        async with client.stream("POST", url, content=body, headers=headers) as resp:
            raw = b""
            async for piece in resp.aiter_bytes():
                raw += piece
    except httpx.HTTPError as exc:  # the connection to the gateway broke: never expected
        return Outcome("", 0, "cut", tenant, repr(exc))
    rid = resp.headers.get("x-request-id", "")
    text = raw.decode(errors="replace")
    if not resp.headers.get("content-type", "").startswith("text/event-stream"):
        return Outcome(rid, resp.status_code, "json", tenant, text[:300])
    events = [e for e in text.split("\n\n") if e.strip()]
    if events and events[-1] == "data: [DONE]":
        ending = "done"
    elif events and '"error"' in events[-1]:
        ending = "error-event"
    else:
        ending = "cut"
    return Outcome(rid, resp.status_code, ending, tenant, events[-1] if events else "")


def chat_body(model: str, *, max_tokens: int, stream: bool = True, content: str = "Tell me a story.") -> bytes:
    messages = [{"role": "user", "content": content}]
    return json.dumps({"model": model, "messages": messages, "max_tokens": max_tokens, "stream": stream}).encode()


async def load(
    url: str, key: str, body: bytes, *, slots: int, seconds: float, tenant: str = "acme", pause_s: float = 0.0
) -> list[Outcome]:
    """``slots`` clients sending ``body`` back to back for ``seconds``; every request's outcome."""
    outcomes: list[Outcome] = []
    stop_at = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=slots + 4, max_keepalive_connections=slots + 4)
    async with httpx.AsyncClient(timeout=httpx.Timeout(30, connect=5), limits=limits) as client:

        async def slot() -> None:
            while time.monotonic() < stop_at:
                outcomes.append(await _one(client, url + "/v1/chat/completions", key, body, tenant))
                if pause_s:
                    await asyncio.sleep(pause_s)

        await asyncio.gather(*(slot() for _ in range(slots)))
    return outcomes


def describe(outcomes: list[Outcome]) -> str:
    summary: dict[tuple[int, str], int] = {}
    for o in outcomes:
        summary[(o.status, o.ending)] = summary.get((o.status, o.ending), 0) + 1
    odd = next((o for o in outcomes if o.status != 200 or o.ending not in ("done",)), None)
    return f"{summary}" + (f"; e.g. {odd}" if odd else "")
