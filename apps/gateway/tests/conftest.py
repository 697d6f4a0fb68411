"""A real gateway (uvicorn, in a thread of the test process) in front of real simulator processes."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import pytest
import uvicorn
from django.core.asgi import get_asgi_application

from apps.fleet.keys import SEALED_STATIC_KEY, seal_static_key
from apps.fleet.models import NodeStatus
from apps.fleet.services import node_create, node_transition
from apps.gateway.app import Gateway

NODE_KEY = "node-secret-key"


@dataclass
class RunningGateway:
    url: str
    app: Gateway
    server: uvicorn.Server

    @property
    def base_url(self) -> str:
        return self.url + "/v1"

    def wait_routed(self, model: str, nodes: int, timeout_s: float = 5.0) -> None:
        """Block until this gateway's routing table shows ``nodes`` ready nodes for ``model``."""

        def routed() -> bool:
            route = self.app.table.models.get(model)
            return route is not None and len(route.nodes) == nodes

        if not wait_until(routed, timeout_s):
            raise AssertionError(f"gateway never routed {nodes} node(s) for {model}")


@contextmanager
def running_gateway(http: str = "h11") -> Iterator[RunningGateway]:
    """A fresh Gateway (empty caches) served by uvicorn on a free port, in a thread."""
    app = Gateway(get_asgi_application())
    config = uvicorn.Config(
        app, host="127.0.0.1", port=0, lifespan="on", log_level="warning", loop="asyncio", http=http
    )
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, daemon=True, name="gateway-under-test")
    thread.start()
    deadline = time.monotonic() + 15
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("gateway did not start")
        time.sleep(0.02)
    port = server.servers[0].sockets[0].getsockname()[1]
    try:
        yield RunningGateway(url=f"http://127.0.0.1:{port}", app=app, server=server)
    finally:
        server.should_exit = True
        thread.join(15)


@pytest.fixture
def gateway(transactional_db, redis_db) -> Iterator[RunningGateway]:
    with running_gateway() as running:
        yield running


def ready_node(model, endpoint_url: str, key: str = NODE_KEY, gateway: RunningGateway | None = None):
    """A static node in state ready, pointing at ``endpoint_url``, presenting ``key`` to it."""
    node = node_create(model=model, launcher="static", endpoint_url=endpoint_url)
    type(node).objects.filter(pk=node.pk).update(launcher_state={SEALED_STATIC_KEY: seal_static_key(key)})
    node = node_transition(node=node, to=NodeStatus.READY, reason="test")
    if gateway is not None:
        gateway.wait_routed(model.name, type(node).objects.filter(model=model, status=NodeStatus.READY).count())
    return node


def wait_until(predicate, timeout_s: float = 5.0, interval_s: float = 0.02):
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value or time.monotonic() > deadline:
            return value
        time.sleep(interval_s)
