"""Contract tests: apps.fleet.sky and the SkyPilot launcher against a real SkyPilot 0.14.1 API server.

The server runs offline on loopback (``sky api start`` with HOME in a temporary directory), once
for the module. It has no cloud credentials, so it refuses launches the way a server with an
unconfigured cloud does; a few rows of SkyPilot's public catalog CSVs (``sky_catalog/``) are
written where the server reads them (~/.sky/catalogs/<schema>/, see sky/catalog/common.py): a file
present without a ``.meta/*.md5`` counts as edited by hand and is never refetched, so the server
validates and optimises the task offline instead of failing on a catalog download.

What this covers, and what only a real cloud account can show, is listed in docs/fleet.md.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from apps.fleet import lifecycle, sky
from apps.fleet.models import Node, NodeEvent, NodeStatus
from apps.fleet.services import node_create
from apps.fleet.transitions import node_transition

pytestmark = [pytest.mark.slow, pytest.mark.django_db]

CATALOG = Path(__file__).parent / "sky_catalog"
SKY_CLI = Path(sys.executable).parent / "sky"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _server_env(home: Path, port: int) -> dict[str, str]:
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("AWS_", "AZURE_", "GOOGLE_", "SKYPILOT_", "KUBECONFIG"))
    }
    return {
        **env,
        "HOME": str(home),
        "SKYPILOT_API_SERVER_LOCAL_PORT": str(port),
        "SKYPILOT_DISABLE_USAGE_COLLECTION": "1",
    }


@pytest.fixture(scope="module")
def sky_server(tmp_path_factory) -> Iterator[str]:
    """A real SkyPilot API server on a loopback port; its URL."""
    from sky.skylet import constants

    home = tmp_path_factory.mktemp("sky-home")
    shutil.copytree(CATALOG / "v8", home / ".sky" / "catalogs" / constants.CATALOG_SCHEMA_VERSION)
    port = _free_port()
    env = _server_env(home, port)
    try:  # stopped in `finally` even when the start times out half-way
        started = subprocess.run(
            [str(SKY_CLI), "api", "start", "--host", "127.0.0.1", "--port", str(port)],
            env=env,
            capture_output=True,
            text=True,
            timeout=180,
        )
        assert started.returncode == 0, started.stdout + started.stderr
        url = f"http://127.0.0.1:{port}"
        _warm_up(url, env)
        _SERVER_ENV[url] = env
        yield url
    finally:
        subprocess.run([str(SKY_CLI), "api", "stop"], env=env, capture_output=True, timeout=120)


_SERVER_ENV: dict[str, dict[str, str]] = {}


def _seed_cluster(server_url: str, name: str, *, owner: str) -> None:
    """Record an UP cluster launched by SkyPilot user ``owner`` in the server's own state database,
    the way a finished launch does (global_user_state.add_or_update_cluster): the server has no
    cloud to launch one for real."""
    code = (
        "import sky; from sky import global_user_state as g;"
        "from sky.backends.cloud_vm_ray_backend import CloudVmRayResourceHandle as H;"
        "r = sky.Resources(infra='aws/us-east-1', instance_type='g6.xlarge');"
        f"h = H(cluster_name={name!r}, cluster_name_on_cloud={name + '-2ea4'!r}, cluster_yaml=None, "
        "launched_nodes=1, launched_resources=r);"
        f"g.add_or_update_cluster({name!r}, h, {{r}}, ready=True);"
        # The owner talks to the server, as the launch did: the server then knows the user.
        "sky.get(sky.status())"
    )
    env = {
        **_SERVER_ENV[server_url],
        "SKYPILOT_USER_ID": owner,
        "SKYPILOT_API_SERVER_ENDPOINT": server_url,
        "SKYPILOT_DISABLE_LOCAL_API_SERVER": "1",
    }
    env.pop("SKYPILOT_API_SERVER_LOCAL_PORT")
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def _warm_up(url: str, env: dict[str, str]) -> None:
    """The server's request workers start (and import sky) on the first requests: on a busy
    machine that takes tens of seconds, which is not what the tests measure."""
    code = (
        "import sky, sky.client.sdk as s; sky.get(sky.status(all_users=True)); sky.get(s.enabled_clouds()); "
        "t = sky.Task.from_yaml_config({'name': 'w', 'resources': {'infra': 'aws/us-east-1'}, 'run': 'true'});"
        "rid = sky.launch(t, cluster_name='warmup'); sky.api_cancel(rid)"
    )
    client_env = {**env, "SKYPILOT_API_SERVER_ENDPOINT": url, "SKYPILOT_DISABLE_LOCAL_API_SERVER": "1"}
    client_env.pop("SKYPILOT_API_SERVER_LOCAL_PORT")
    subprocess.run([sys.executable, "-c", code], env=client_env, capture_output=True, timeout=300)


@pytest.fixture
def real_server(sky_server, settings, monkeypatch) -> str:
    settings.SKYPILOT_API_SERVER_ENDPOINT = sky_server
    settings.SKYPILOT_USER_ID = "crosslogic-fleet"
    settings.SKYPILOT_SERVICE_ACCOUNT_TOKEN = ""
    settings.FLEET_LAUNCH_POLL_S = 1
    settings.FLEET_SKY_STATUS_TIMEOUT_S = 90  # generous: the machine running the tests may be busy
    settings.CONTROL_PLANE_URL = "https://cp.crosslogic.example"
    settings.R2_ENDPOINT_URL = "https://acct.r2.cloudflarestorage.com"
    settings.R2_NODE_ACCESS_KEY_ID, settings.R2_NODE_SECRET_ACCESS_KEY = "node-ro-key", "node-ro-secret"
    for name in (
        "SKYPILOT_API_SERVER_ENDPOINT",
        "SKYPILOT_USER_ID",
        "SKYPILOT_SERVICE_ACCOUNT_TOKEN",
        "SKYPILOT_DISABLE_LOCAL_API_SERVER",
    ):
        monkeypatch.delenv(name, raising=False)  # apps.fleet.sky sets them; restored after each test
    return sky_server


def _reload(node: Node) -> Node:
    return Node.objects.get(pk=node.pk)


def _poll_until_settled(node: Node, *, within_s: float) -> list[lifecycle.Step]:
    steps, deadline = [], time.monotonic() + within_s
    while time.monotonic() < deadline:
        steps.append(lifecycle.poll_launch(node.pk))
        if _reload(node).status != NodeStatus.PROVISIONING:
            return steps
        time.sleep(0.5)
    raise AssertionError(f"node still {_reload(node).status} after {within_s}s: {_reload(node).status_reason}")


def _sky_node(model) -> Node:
    return node_create(
        model=model, launcher="skypilot", cloud="aws", region="us-east-1", accelerator="L4:1", use_spot=False
    )


def test_status_over_all_users_is_accepted_and_returns_the_real_types(real_server) -> None:
    import sky as real_sky

    assert sky.clusters(refresh=True) == []
    # The call we make, as the server answers it: StatusResponse objects (not dicts).
    records = real_sky.get(real_sky.status(cluster_names=None, all_users=True))
    assert isinstance(records, list)


def test_clusters_launched_by_another_identity_are_seen_and_other_names_ignored(real_server) -> None:
    import sky as real_sky

    _seed_cluster(real_server, "crosslogic-9001", owner="old-deploy-7f3a")  # the previous deployment's worker
    _seed_cluster(real_server, "research-notebook", owner="alice")  # another team on the same server

    mine_only = real_sky.get(real_sky.status(cluster_names=None))  # what the first version asked for
    ours = sky.clusters()

    assert [c.name for c in mine_only] == []  # user-scoped: the live cluster looked vanished
    assert [(c.name, c.status) for c in ours] == [("crosslogic-9001", "UP")]
    assert sky.clusters(names=["crosslogic-9001"])[0].launched_at  # what launcher.exists() relies on


def test_enabled_clouds_and_fleet_check_against_a_server_without_clouds(real_server) -> None:
    from io import StringIO

    from django.core.management import CommandError, call_command

    assert sky.server_report() == ("0.14.1", [])  # sky.client.sdk.enabled_clouds; no AttributeError
    with pytest.raises(CommandError, match="no cloud is enabled on the SkyPilot API server: run `sky check`"):
        call_command("fleet_check", stdout=StringIO(), stderr=StringIO())


def test_a_launch_without_cloud_access_fails_the_node_within_seconds(real_server, served_model) -> None:
    node = _sky_node(served_model)
    started = time.monotonic()

    lifecycle.launch_node(node.pk)  # the real client validates the task with the server (seeded catalog)
    node = _reload(node)
    assert node.status == NodeStatus.PROVISIONING, node.status_reason
    steps = _poll_until_settled(node, within_s=90)

    node = _reload(node)
    assert node.status == NodeStatus.FAILED
    assert node.status_reason.startswith(sky.NO_CREDENTIALS) and "sky check" in node.status_reason
    assert time.monotonic() - started < 90  # ~3 s on an idle machine; never the 1 h timeout
    assert steps[-1].then == "teardown"
    for _ in range(60):  # sky.down of a cluster that never existed: done, not an error
        if lifecycle.teardown_node(node.pk).again_in is None:
            break
        time.sleep(0.5)
    assert _reload(node).launcher_state.get("torn_down") is True


def test_request_status_and_a_cancelled_launch(real_server, served_model) -> None:
    import sky as real_sky

    node = _sky_node(served_model)
    lifecycle.launch_node(node.pk)
    request_id = _reload(node).launcher_state["launch_request_id"]
    assert sky.request_status(request_id) in {"PENDING", "RUNNING"}  # a string, from RequestPayload
    assert sky.request_status("0000dead-beef-0000-0000-000000000000") is None

    real_sky.get(real_sky.api_cancel(request_id))  # staff (or a timeout) cancelled it on the server
    assert sky.request_status(request_id) == "CANCELLED"
    _poll_until_settled(node, within_s=20)

    node = _reload(node)
    assert node.status == NodeStatus.FAILED and "SkyPilot request cancelled" in node.status_reason


def test_the_server_going_away_mid_poll_is_retried_then_followed_again(real_server, served_model, settings) -> None:
    node = _sky_node(served_model)
    lifecycle.launch_node(node.pk)

    settings.SKYPILOT_API_SERVER_ENDPOINT = f"http://127.0.0.1:{_free_port()}"  # nothing listens there
    step = lifecycle.poll_launch(node.pk)

    assert step.then == "poll" and step.again_in > 0
    node = _reload(node)
    assert node.status == NodeStatus.PROVISIONING
    event = NodeEvent.objects.filter(node=node, kind=NodeEvent.Kind.ERROR).latest("id")
    assert "SkyPilot API server unreachable" in event.message and "retry 1/" in event.message

    settings.SKYPILOT_API_SERVER_ENDPOINT = real_server  # it is back: the same request is followed
    _poll_until_settled(node, within_s=90)
    assert _reload(node).status_reason.startswith(sky.NO_CREDENTIALS)


def test_calls_on_a_cluster_that_does_not_exist_map_to_what_the_node_needs(real_server) -> None:
    with pytest.raises(sky.ClusterMissing):  # ClusterDoesNotExist from sky.get
        sky.job_status("crosslogic-424242", 1)
    assert sky.job_log_tail("crosslogic-424242", 1).startswith("(job log unavailable")
    with pytest.raises(ValueError, match="not found"):  # 0.14.1 answers ClusterNotUpError here, not "does not exist"
        sky.endpoint("crosslogic-424242", 8000)
    request_id = sky.submit_down("crosslogic-424242")  # accepted; the request fails on the server
    _wait_for(request_id)
    with pytest.raises(sky.ClusterMissing):
        sky.request_result(request_id)


def test_stopping_a_cluster_that_does_not_exist_fails_the_warm_pool_stop(real_server, served_model) -> None:
    request_id = sky.submit_stop("crosslogic-424243")  # sky.stop takes the name; the server refuses later
    _wait_for(request_id)
    with pytest.raises(sky.ClusterMissing):
        sky.request_result(request_id)
    # Through the warm pool: the launcher's stop turns it into a LaunchError, the node is torn down.
    node = _sky_node(served_model)
    for status in (NodeStatus.PROVISIONING, NodeStatus.LOADING, NodeStatus.READY, NodeStatus.DRAINING):
        node_transition(node=node, to=status)
    node_transition(node=node, to=NodeStatus.STOPPING)
    deadline = time.monotonic() + 90
    while _reload(node).status == NodeStatus.STOPPING and time.monotonic() < deadline:
        lifecycle.stop_node(node.pk)
        time.sleep(0.3)
    node = _reload(node)
    assert node.status == NodeStatus.TERMINATING and "vanished" in node.status_reason


def _wait_for(request_id: str, within_s: float = 90) -> None:
    deadline = time.monotonic() + within_s
    while sky.request_status(request_id) in {"PENDING", "RUNNING"}:
        assert time.monotonic() < deadline, f"request {request_id} unfinished after {within_s}s"
        time.sleep(0.3)
