"""End to end with the local launcher: real processes, a real Celery worker, the real API.

launch from the API → the node registers → ready → a request through the gateway → its vLLM dies →
unhealthy → the reconciler replaces it → terminate. Intervals are shortened through the worker's
environment; every wait is bounded.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import httpx
import pytest
from django.conf import settings
from django.contrib.auth.models import User
from django.db import connection
from rest_framework.test import APIClient

from apps.catalog.services import model_create
from apps.fleet.models import Node, NodeEvent, NodeStatus

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]


def _wait(what: str, predicate: Callable[[], object], timeout_s: float = 60.0, log: Path | None = None) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.2)
    tail = log.read_text()[-3000:] if log and log.exists() else ""
    pytest.fail(f"timed out waiting for {what}\n--- worker log ---\n{tail}")


def _children(pid: int) -> list[int]:
    try:
        return [int(p) for p in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except FileNotFoundError:
        return []


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


@pytest.fixture
def worker(transactional_db, live_server, redis_db, tmp_path) -> Iterator[Path]:
    """``celery worker --pool=solo`` on the test database and this test's Redis db."""
    db = connection.settings_dict
    log = tmp_path / "worker.log"
    env = {
        **os.environ,
        "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}",
        "REDIS_URL": settings.REDIS_URL,
        "CELERY_BROKER_URL": settings.REDIS_URL,
        "CONTROL_PLANE_URL": live_server.url,
        "FLEET_DEFAULT_LAUNCHER": "local",
        "FLEET_LAUNCH_POLL_S": "1",
        "FLEET_LOCAL_STARTUP_DELAY_S": "0.3",
        "FLEET_HEALTH_TIMEOUT_S": "1",
        "FLEET_UNHEALTHY_AFTER": "3",
        "FLEET_REPLACE_UNHEALTHY_AFTER_S": "1",
        "DB_CONN_MAX_AGE": "0",
    }
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                str(Path(settings.BASE_DIR) / ".venv/bin/celery"),
                "-A",
                "crosslogic",
                "worker",
                "--pool=solo",
                "--loglevel=INFO",
                "--without-mingle",
                "--without-gossip",
                "--without-heartbeat",
            ],
            cwd=settings.BASE_DIR,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield log
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        for node in Node.objects.all():  # never leave a node process behind
            pid = node.launcher_state.get("pid")
            if isinstance(pid, int):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)


def test_local_fleet_lifecycle_with_a_real_worker(worker: Path, tenant) -> None:
    from apps.fleet.periodic import fleet_health_check, fleet_reconcile
    from apps.gateway.tests.conftest import running_gateway
    from apps.tenancy.services import api_key_issue

    model = model_create(name="e2e-llama", storage_uri="s3://weights/e2e-llama", min_replicas=1, max_replicas=1)
    staff = User.objects.create_user("ops", is_staff=True)
    api = APIClient()
    api.force_authenticate(staff)

    # 1. Launch from the API; the worker starts the node, which registers; the health check makes it ready.
    created = api.post("/api/v1/nodes/", {"model": model.name, "launcher": "local"}, format="json")
    assert created.status_code == 201, created.content
    node = Node.objects.get(pk=created.json()["id"])
    _wait(
        "the node to become ready",
        lambda: Node.objects.filter(pk=node.pk, status=NodeStatus.READY).exists(),
        log=worker,
    )
    node.refresh_from_db()
    assert node.registered_at and node.endpoint_url.startswith("http://127.0.0.1:")
    assert node.provisioned_at <= node.weights_loaded_at <= node.ready_at
    kinds = list(NodeEvent.objects.filter(node=node).order_by("id").values_list("to_status", flat=True))
    assert kinds[-3:] == ["provisioning", "loading", "ready"]

    # 2. A customer request through the real gateway reaches the node (which wants its derived key).
    body = {"model": model.name, "messages": [{"role": "user", "content": "hello"}], "max_tokens": 5}
    _, customer_key = api_key_issue(tenant=tenant, name="e2e", scopes=["inference"])
    customer = {"Authorization": f"Bearer {customer_key}"}
    with running_gateway() as gateway:
        gateway.wait_routed(model.name, 1, timeout_s=10)
        answer = httpx.post(gateway.base_url + "/chat/completions", json=body, timeout=20, headers=customer)
        assert answer.status_code == 200, answer.text
        assert answer.json()["choices"][0]["message"]["content"]
        assert httpx.post(node.endpoint_url + "/v1/chat/completions", json=body, timeout=10).status_code == 401

        # 3. vLLM dies (SIGKILL); three failed checks → unhealthy → the gateway stops routing there.
        node_pid = node.launcher_state["pid"]
        (sim_pid,) = _children(node_pid)
        os.kill(sim_pid, signal.SIGKILL)
        for failures in (1, 2, 3):
            fleet_health_check.delay()

            def failed(n: int = failures) -> bool:
                return Node.objects.get(pk=node.pk).consecutive_failures >= n

            _wait(f"health failure {failures}", failed, timeout_s=20, log=worker)
        node.refresh_from_db()
        assert node.status == NodeStatus.UNHEALTHY
        gateway.wait_routed(model.name, 0, timeout_s=2)  # follows the worker's transition within ~1 s
        _wait("the node process to exit after its vLLM", lambda: not _alive(node_pid), timeout_s=15)

        # 4. The reconciler replaces it (min_replicas=1); the replacement comes up and serves.
        fleet_reconcile.delay()
        _wait("a replacement node", lambda: Node.objects.exclude(pk=node.pk).exists(), timeout_s=30, log=worker)
        node.refresh_from_db()
        assert node.status == NodeStatus.TERMINATED and node.status_reason == "preempted"
        replacement = Node.objects.exclude(pk=node.pk).get()
        # The reconciler writes its reason right after creating the node: wait for it, don't race it.
        _wait(
            "the reconciler's reason on the replacement",
            lambda: NodeEvent.objects.filter(
                node=replacement, actor="reconciler", message__contains=str(node)
            ).exists(),
            timeout_s=10,
            log=worker,
        )
        _wait(
            "the replacement to become ready",
            lambda: Node.objects.filter(pk=replacement.pk, status=NodeStatus.READY).exists(),
            log=worker,
        )
        gateway.wait_routed(model.name, 1, timeout_s=5)
        again = httpx.post(gateway.base_url + "/chat/completions", json=body, timeout=20, headers=customer)
        assert again.status_code == 200, again.text

        # 5. Terminate from the API: the worker tears it down and the process is gone.
        assert api.post(f"/api/v1/nodes/{replacement.pk}/terminate/").status_code == 200
        _wait(
            "the replacement to be terminated",
            lambda: Node.objects.filter(pk=replacement.pk, status=NodeStatus.TERMINATED).exists(),
            log=worker,
        )
        gateway.wait_routed(model.name, 0, timeout_s=2)
    replacement.refresh_from_db()
    assert not _alive(replacement.launcher_state["pid"])
