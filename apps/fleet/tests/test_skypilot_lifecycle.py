"""A node's life through the SkyPilot launcher, with only the SDK calls faked (see conftest)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

from apps.fleet import lifecycle
from apps.fleet.models import Node, NodeEvent, NodeStatus
from apps.fleet.services import node_create, node_register, node_terminate
from apps.fleet.sky import NO_CREDENTIALS

pytestmark = pytest.mark.django_db


@pytest.fixture
def sky_node(served_model, fake_sky):
    return node_create(model=served_model, launcher="skypilot", cloud="aws", region="us-east-1")


def _reload(node: Node) -> Node:
    return Node.objects.get(pk=node.pk)


def test_successful_launch_polls_without_blocking_then_registers(sky_node, fake_sky, settings, real_sky) -> None:
    step = lifecycle.launch_node(sky_node.pk)

    node = _reload(sky_node)
    assert node.status == NodeStatus.PROVISIONING and node.registration_token_digest
    rid = node.launcher_state["launch_request_id"]
    assert (step.then, step.again_in) == ("poll", settings.FLEET_LAUNCH_POLL_S)
    ((_, launch_call),) = [c for c in fake_sky.calls if c[0] == "launch"]
    assert launch_call["cluster_name"] == node.cluster_name and launch_call["task"].secrets

    assert lifecycle.poll_launch(node.pk).then == "poll"  # still running: come back later
    assert _reload(node).status == NodeStatus.PROVISIONING

    # SkyPilot failed over: it reports where the node actually runs.
    handle = SimpleNamespace(launched_resources=real_sky.Resources(infra="gcp/us-central1", accelerators="L4:1"))
    fake_sky.finish(rid, result=(1, handle))
    assert lifecycle.poll_launch(node.pk).then == "poll"  # up: now the job is watched until the node is ready
    node = _reload(node)
    assert node.endpoint_url == "http://203.0.113.7:8000" and node.launcher_state["launched"] is True
    assert (node.cloud, node.region, node.accelerator) == ("gcp", "us-central1", "L4:1")
    assert NodeEvent.objects.filter(node=node, message__contains="machine up on gcp/us-central1/L4:1").exists()
    assert node.provisioned_at is not None and node.launcher_state["job_id"] == 1

    token = launch_call["task"].secrets["CROSSLOGIC_REGISTRATION_TOKEN"].get_secret_value()
    node_register(token=token, health_ok=False)
    assert _reload(node).status == NodeStatus.LOADING
    fake_sky.jobs[(node.cluster_name, 1)] = "RUNNING"
    assert lifecycle.poll_launch(node.pk).then == "poll"
    assert NodeEvent.objects.filter(node=node, message__contains="machine up").count() == 1  # said once


def test_no_capacity_fails_the_node_with_the_failover_history(sky_node, fake_sky, real_sky) -> None:
    lifecycle.launch_node(sky_node.pk)
    history = [
        real_sky.exceptions.ResourcesUnavailableError("Insufficient capacity for L4 in us-east-1 (spot)"),
        real_sky.exceptions.ResourcesUnavailableError("InsufficientInstanceCapacity in us-west-2"),
    ]
    fake_sky.finish(
        fake_sky.last("launch"),
        error=real_sky.exceptions.ResourcesUnavailableError(
            "Failed to provision all possible launchable resources.", failover_history=history
        ),
    )

    lifecycle.poll_launch(sky_node.pk)

    node = _reload(sky_node)
    assert node.status == NodeStatus.FAILED
    assert node.status_reason.startswith("no capacity")
    assert "tried 2 placement(s)" in node.status_reason
    assert "us-east-1 (spot)" in node.status_reason and "us-west-2" in node.status_reason


def test_no_cloud_credentials_fails_with_run_sky_check(sky_node, fake_sky, real_sky) -> None:
    fake_sky.launch_error = real_sky.exceptions.NoCloudAccessError("Cloud access is not set up.")

    lifecycle.launch_node(sky_node.pk)

    node = _reload(sky_node)
    assert node.status == NodeStatus.FAILED and node.status_reason.startswith(NO_CREDENTIALS)


def test_unreachable_api_server_is_retried_then_fails_clearly(sky_node, fake_sky) -> None:
    fake_sky.unreachable = True
    steps = [lifecycle.launch_node(sky_node.pk)]
    for _ in range(lifecycle.MAX_API_RETRIES):
        steps.append(lifecycle.launch_node(sky_node.pk))

    assert [s.then for s in steps[:-1]] == ["launch"] * lifecycle.MAX_API_RETRIES
    assert steps[0].again_in < steps[-2].again_in  # backing off
    node = _reload(sky_node)
    assert node.status == NodeStatus.FAILED
    assert "SkyPilot API server unreachable" in node.status_reason and "gave up" in node.status_reason
    assert NodeEvent.objects.filter(node=node, kind=NodeEvent.Kind.ERROR).count() == lifecycle.MAX_API_RETRIES


def test_api_server_back_after_a_retry_launches_once(sky_node, fake_sky) -> None:
    fake_sky.unreachable = True
    lifecycle.launch_node(sky_node.pk)
    fake_sky.unreachable = False
    assert lifecycle.launch_node(sky_node.pk).then == "poll"
    assert lifecycle.launch_node(sky_node.pk).again_in is None  # a duplicate delivery does nothing
    assert len([c for c in fake_sky.calls if c[0] == "launch"]) == 1


def test_a_retried_launch_task_never_launches_twice(sky_node, fake_sky) -> None:
    lifecycle.launch_node(sky_node.pk)
    lifecycle.launch_node(sky_node.pk)
    lifecycle.launch_node(sky_node.pk)
    assert len([c for c in fake_sky.calls if c[0] == "launch"]) == 1


def test_an_existing_cluster_of_the_same_name_is_adopted_not_relaunched(sky_node, fake_sky, real_sky) -> None:
    fake_sky.clusters[sky_node.cluster_name] = {
        "name": sky_node.cluster_name,
        "status": real_sky.ClusterStatus.UP,
        "launched_at": 1.0,
    }
    fake_sky.jobs[(sky_node.cluster_name, 1)] = "RUNNING"
    lifecycle.launch_node(sky_node.pk)
    assert not [c for c in fake_sky.calls if c[0] == "launch"]
    assert _reload(sky_node).launcher_state["adopted_existing_cluster"] is True
    lifecycle.poll_launch(sky_node.pk)
    assert _reload(sky_node).endpoint_url == "http://203.0.113.7:8000"


def test_teardown_calls_down_and_waits_for_it(sky_node, fake_sky) -> None:
    lifecycle.launch_node(sky_node.pk)
    fake_sky.finish(fake_sky.last("launch"), result=(1, "handle"))
    lifecycle.poll_launch(sky_node.pk)
    node_terminate(node=_reload(sky_node), actor="staff:ops")

    assert lifecycle.teardown_node(sky_node.pk).then == "teardown"
    assert ("down", sky_node.cluster_name) in fake_sky.calls
    assert _reload(sky_node).status == NodeStatus.TERMINATING
    assert lifecycle.teardown_node(sky_node.pk).then == "teardown"  # down still running: no second down
    assert len([c for c in fake_sky.calls if c[0] == "down"]) == 1

    fake_sky.finish(fake_sky.last("down"))
    lifecycle.teardown_node(sky_node.pk)
    node = _reload(sky_node)
    assert node.status == NodeStatus.TERMINATED and node.terminated_at is not None
    assert lifecycle.teardown_node(sky_node.pk).again_in is None  # idempotent


def test_teardown_of_a_cluster_that_is_already_gone_completes(sky_node, fake_sky, real_sky) -> None:
    lifecycle.launch_node(sky_node.pk)
    node_terminate(node=_reload(sky_node))
    assert lifecycle.teardown_node(sky_node.pk).then == "teardown"  # the server takes the down request and fails it
    assert isinstance(fake_sky.requests[fake_sky.last("down")]["error"], real_sky.exceptions.ClusterDoesNotExist)
    lifecycle.teardown_node(sky_node.pk)
    assert _reload(sky_node).status == NodeStatus.TERMINATED


def test_no_api_server_configured_fails_without_starting_one(served_model, settings) -> None:
    settings.SKYPILOT_API_SERVER_ENDPOINT = ""
    node = node_create(model=served_model, launcher="skypilot")
    lifecycle.launch_node(node.pk)
    node = _reload(node)
    assert node.status == NodeStatus.FAILED and "SKYPILOT_API_SERVER_ENDPOINT" in node.status_reason


def test_a_node_registering_before_its_launch_is_seen_still_gets_its_endpoint(sky_node, fake_sky) -> None:
    lifecycle.launch_node(sky_node.pk)
    ((_, launch_call),) = [c for c in fake_sky.calls if c[0] == "launch"]
    token = launch_call["task"].secrets["CROSSLOGIC_REGISTRATION_TOKEN"].get_secret_value()
    node_register(token=token, health_ok=True)  # a SkyPilot node does not send its endpoint
    assert _reload(sky_node).status == NodeStatus.LOADING

    fake_sky.endpoints_by_cluster[sky_node.cluster_name] = "198.51.100.4:8000"
    fake_sky.finish(fake_sky.last("launch"), result=(1, "handle"))
    assert lifecycle.poll_launch(sky_node.pk).then == "poll"
    assert _reload(sky_node).endpoint_url == "http://198.51.100.4:8000"


def test_fleet_check_reports_the_server_and_its_clouds(fake_sky, settings) -> None:
    from io import StringIO

    from django.core.management import CommandError, call_command

    settings.CONTROL_PLANE_URL = "https://cp.crosslogic.example"
    settings.SKYPILOT_API_SERVER_ENDPOINT = "https://skypilot.test"
    fake_sky.enabled = ["AWS", "GCP"]  # served by sky.client.sdk.enabled_clouds, as in 0.14.1
    out = StringIO()
    call_command("fleet_check", stdout=out, stderr=StringIO())
    assert "version 0.14.1" in out.getvalue() and "enabled clouds: AWS, GCP" in out.getvalue()

    fake_sky.enabled = []
    with pytest.raises(CommandError, match="run `sky check`"):
        call_command("fleet_check", stdout=StringIO(), stderr=StringIO())
    fake_sky.unreachable = True
    with pytest.raises(CommandError, match="SkyPilot API server unreachable"):
        call_command("fleet_check", stdout=StringIO(), stderr=StringIO())


def test_fleet_check_without_an_api_server_names_the_setting(settings) -> None:
    from io import StringIO

    from django.core.management import CommandError, call_command

    settings.SKYPILOT_API_SERVER_ENDPOINT = ""
    with pytest.raises(CommandError, match="SKYPILOT_API_SERVER_ENDPOINT is not set"):
        call_command("fleet_check", stdout=StringIO(), stderr=StringIO())


# --- issue #10 item 3: the job, not just the launch request ------------------------------------

PIP_FAILURE = "\n".join(
    [f"Collecting dependency {i}" for i in range(60)]
    + [
        "ERROR: Could not find a version that satisfies the requirement vllm[runai]==0.11.0",
        "ERROR: No matching distribution found for vllm[runai]==0.11.0",
    ]
)


def _launched(sky_node, fake_sky) -> Node:
    lifecycle.launch_node(sky_node.pk)
    fake_sky.finish(fake_sky.last("launch"), result=(1, "handle"))  # the request succeeds once the job is queued
    lifecycle.poll_launch(sky_node.pk)
    return _reload(sky_node)


@pytest.mark.parametrize("job_status", ["FAILED_SETUP", "FAILED", "FAILED_DRIVER", "SUCCEEDED", "CANCELLED"])
def test_a_job_that_dies_after_launch_fails_the_node_with_its_log_and_downs_it(
    job_status, sky_node, fake_sky, settings
) -> None:
    node = _launched(sky_node, fake_sky)
    assert node.status == NodeStatus.PROVISIONING and node.launcher_state["job_id"] == 1
    fake_sky.jobs[(node.cluster_name, 1)] = job_status
    fake_sky.job_logs[(node.cluster_name, 1)] = PIP_FAILURE

    step = lifecycle.poll_launch(node.pk)  # seconds after the failure, not FLEET_LAUNCH_TIMEOUT_S later

    node = _reload(node)
    assert node.status == NodeStatus.FAILED
    assert f"job 1 {job_status.lower().replace('_', ' ')}" in node.status_reason
    assert "No matching distribution found for vllm[runai]==0.11.0" in node.status_reason
    assert "Collecting dependency 0\n" not in node.status_reason  # bounded: the last lines only
    ((_, tail_call),) = [c for c in fake_sky.calls if c[0] == "tail_logs"]
    assert tail_call[1]["follow"] is False and 0 < tail_call[1]["tail"] <= 100
    assert step.then == "teardown"
    lifecycle.teardown_node(node.pk)
    assert ("down", node.cluster_name) in fake_sky.calls


def test_a_vllm_crash_while_loading_is_caught_after_registration(sky_node, fake_sky) -> None:
    node = _launched(sky_node, fake_sky)
    ((_, launch_call),) = [c for c in fake_sky.calls if c[0] == "launch"]
    node_register(
        token=launch_call["task"].secrets["CROSSLOGIC_REGISTRATION_TOKEN"].get_secret_value(), health_ok=False
    )
    fake_sky.jobs[(node.cluster_name, 1)] = "RUNNING"
    assert lifecycle.poll_launch(node.pk).then == "poll"
    assert _reload(node).status == NodeStatus.LOADING

    fake_sky.jobs[(node.cluster_name, 1)] = "FAILED"
    fake_sky.job_logs[(node.cluster_name, 1)] = "torch.OutOfMemoryError: CUDA out of memory."
    lifecycle.poll_launch(node.pk)

    node = _reload(node)
    assert node.status == NodeStatus.FAILED and "CUDA out of memory" in node.status_reason


def test_watching_stops_once_the_node_is_ready(sky_node, fake_sky) -> None:
    from apps.fleet.services import node_transition

    node = _launched(sky_node, fake_sky)
    node_transition(node=node, to=NodeStatus.LOADING)
    node_transition(node=_reload(node), to=NodeStatus.READY)
    requests_before = len(fake_sky.requests)
    assert lifecycle.poll_launch(node.pk).again_in is None
    assert len(fake_sky.requests) == requests_before


def test_a_cluster_not_up_while_watching_is_not_a_failure(sky_node, fake_sky, real_sky) -> None:
    node = _launched(sky_node, fake_sky)
    fake_sky.clusters[node.cluster_name]["status"] = real_sky.ClusterStatus.INIT
    original = fake_sky.job_status

    def not_up(*args, **kwargs):
        rid = original(*args, **kwargs)
        fake_sky.requests[rid].update(
            status="FAILED",
            error=real_sky.exceptions.ClusterNotUpError(
                f"{node.cluster_name} is not up (INIT)", cluster_status=real_sky.ClusterStatus.INIT
            ),
        )
        return rid

    fake_sky.job_status = not_up
    assert lifecycle.poll_launch(node.pk).then == "poll"
    assert _reload(node).status == NodeStatus.PROVISIONING


@pytest.mark.parametrize(
    ("control_plane", "endpoint", "flagged"),
    [
        ("http://127.0.0.1:8000", "https://skypilot.internal", "loopback address"),
        ("http://localhost:8000", "https://skypilot.internal", "loopback address"),
        ("http://[::1]:8000", "https://skypilot.internal", "loopback address"),
        ("https://cp.crosslogic.example", "http://skypilot.internal:46580", "plain http to another host"),
        ("https://cp.crosslogic.example", "http://10.0.0.5:46580", "plain http to another host"),
    ],
)
def test_fleet_check_flags_settings_that_break_or_leak_on_a_real_launch(
    control_plane, endpoint, flagged, fake_sky, settings
) -> None:
    from io import StringIO

    from django.core.management import CommandError, call_command

    settings.CONTROL_PLANE_URL, settings.SKYPILOT_API_SERVER_ENDPOINT = control_plane, endpoint
    with pytest.raises(CommandError, match=flagged):
        call_command("fleet_check", stdout=StringIO(), stderr=StringIO())


def test_fleet_check_passes_https_endpoints_and_a_loopback_api_server(fake_sky, settings) -> None:
    from io import StringIO

    from django.core.management import call_command

    settings.CONTROL_PLANE_URL = "https://cp.crosslogic.example"
    for endpoint in ("https://skypilot.internal", "http://127.0.0.1:46580"):  # loopback http stays on the host
        settings.SKYPILOT_API_SERVER_ENDPOINT = endpoint
        call_command("fleet_check", stdout=StringIO(), stderr=StringIO())
    # docker-compose's API server: a bare service name on the containers' private network is a warning.
    settings.SKYPILOT_API_SERVER_ENDPOINT, err = "http://skypilot:46580", StringIO()
    call_command("fleet_check", stdout=StringIO(), stderr=err)
    assert "warning: SKYPILOT_API_SERVER_ENDPOINT is http://skypilot:46580: plain http" in err.getvalue()


def test_fleet_check_flags_missing_read_only_node_credentials(fake_sky, settings) -> None:
    from io import StringIO

    from django.core.management import CommandError, call_command

    settings.CONTROL_PLANE_URL = "https://cp.crosslogic.example"
    settings.R2_NODE_ACCESS_KEY_ID = ""
    with pytest.raises(CommandError, match="read-only"):
        call_command("fleet_check", stdout=StringIO(), stderr=StringIO())
