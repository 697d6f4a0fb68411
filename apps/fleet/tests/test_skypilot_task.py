"""The SkyPilot task we generate, validated by the real skypilot library."""

from __future__ import annotations

import json
import shlex

import pytest
import yaml

from apps.fleet import sky as fleet_sky
from apps.fleet.launchers.base import LaunchError, Secrets
from apps.fleet.launchers.skypilot import SkyPilotLauncher, disk_size_gb, task_config, task_secrets
from apps.fleet.models import LaunchProfile
from apps.fleet.services import node_create

pytestmark = pytest.mark.django_db

SECRETS = Secrets(registration_token="clr_AbCdEfGh" + "t" * 40, vllm_api_key="vk-" + "k" * 64)


@pytest.fixture
def r2(settings):
    settings.R2_ENDPOINT_URL = "https://acct123.r2.cloudflarestorage.com"
    settings.R2_ACCESS_KEY_ID = "r2-access-key-id-XYZ"
    settings.R2_SECRET_ACCESS_KEY = "r2-secret-access-key-very-secret"
    settings.R2_NODE_ACCESS_KEY_ID = "r2-node-read-only-id"
    settings.R2_NODE_SECRET_ACCESS_KEY = "r2-node-read-only-secret"
    settings.SKYPILOT_API_SERVER_ENDPOINT = "http://skypilot.test:46580"
    return settings


def _vllm_args(task) -> list[str]:
    line = next(line for line in task.run.splitlines() if line.startswith("exec vllm serve"))
    return shlex.split(line.removeprefix("exec "))


def test_task_passes_skypilot_validation_with_the_vllm_command(r2, served_model) -> None:
    node = node_create(model=served_model, launcher="skypilot", cloud="aws", region="us-east-1", use_spot=True)

    task = fleet_sky.build_task(task_config(node), task_secrets(SECRETS))

    args = _vllm_args(task)
    assert args[:3] == ["vllm", "serve", "s3://crosslogic-weights/models/llama-3-8b-instruct"]
    opts = dict(zip(args[3::2], args[4::2], strict=False))
    assert opts["--load-format"] == "runai_streamer"
    assert opts["--served-model-name"] == "llama-3-8b-instruct"
    assert json.loads(opts["--model-loader-extra-config"]) == {"concurrency": 32, "memory_limit": 5 * 1024**3}
    assert (opts["--host"], opts["--port"], opts["--dtype"]) == ("0.0.0.0", "8000", "bfloat16")  # noqa: S104
    assert opts["--max-model-len"] == "8192" and opts["--gpu-memory-utilization"] == "0.92"
    assert opts["--tensor-parallel-size"] == "1"
    # Extra args survive the shell intact, even with quotes, braces and a dollar sign.
    tail = ["--enable-prefix-caching", "--chat-template", "{{ x }} 'q' $HOME"]
    assert args[-3:] == tail
    assert "vllm[runai]==" in task.setup
    (resources,) = list(task.resources)
    assert str(resources.cloud).lower() == "aws" and resources.region == "us-east-1"
    assert resources.use_spot and resources.accelerators == {"L4": 1}
    assert resources.ports == ["8000"] and resources.disk_size == disk_size_gb(served_model.total_bytes)
    envs = task.envs
    assert envs["AWS_ENDPOINT_URL"] == "https://acct123.r2.cloudflarestorage.com"
    assert envs["RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING"] == "0" and envs["AWS_EC2_METADATA_DISABLED"] == "true"
    assert int(envs["RUNAI_STREAMER_S3_REQUEST_TIMEOUT_MS"]) > 1000
    assert "/api/v1/nodes/register" in task.run and "crosslogic_register &" in task.run


def test_no_secret_appears_in_the_tasks_yaml_but_all_travel_as_secrets(r2, served_model) -> None:
    node = node_create(model=served_model, launcher="skypilot")
    secret_values = list(task_secrets(SECRETS).values())

    task = fleet_sky.build_task(task_config(node), task_secrets(SECRETS))

    assert {k: v.get_secret_value() for k, v in task.secrets.items()} == task_secrets(SECRETS)
    stored = yaml.safe_dump(task.to_yaml_config(use_user_specified_yaml=True))
    redacted = yaml.safe_dump(task._to_yaml_config(redact_secrets=True))
    preview = SkyPilotLauncher().preview(node)
    for text in (stored, redacted, preview, yaml.safe_dump(task_config(node))):
        for secret in secret_values:
            assert secret not in text
    assert "<redacted>" in preview and "VLLM_API_KEY" in preview


def test_the_vllm_key_travels_only_in_the_environment_never_on_the_command_line(r2, served_model) -> None:
    # vLLM 0.11 logs its non-default CLI arguments into the job log, and `ps` shows them; it reads
    # VLLM_API_KEY from its environment by itself.
    node = node_create(model=served_model, launcher="skypilot")

    task = fleet_sky.build_task(task_config(node), task_secrets(SECRETS))

    assert "--api-key" not in _vllm_args(task) and "VLLM_API_KEY" not in task.run
    assert task.secrets["VLLM_API_KEY"].get_secret_value() == SECRETS.vllm_api_key


def test_nodes_stream_weights_with_the_read_only_token_not_the_uploaders(r2, served_model) -> None:
    secrets = task_secrets(SECRETS)
    assert (secrets["AWS_ACCESS_KEY_ID"], secrets["AWS_SECRET_ACCESS_KEY"]) == (
        "r2-node-read-only-id",
        "r2-node-read-only-secret",
    )
    assert "r2-secret-access-key-very-secret" not in secrets.values()


def test_production_refuses_to_launch_without_a_read_only_node_token(r2, served_model, settings) -> None:
    settings.DEBUG = False
    settings.R2_NODE_ACCESS_KEY_ID = settings.R2_NODE_SECRET_ACCESS_KEY = ""
    with pytest.raises(LaunchError, match="R2_NODE_ACCESS_KEY_ID and R2_NODE_SECRET_ACCESS_KEY are not set"):
        task_secrets(SECRETS)
    settings.R2_NODE_ACCESS_KEY_ID, settings.R2_NODE_SECRET_ACCESS_KEY = settings.R2_ACCESS_KEY_ID, "x"
    with pytest.raises(LaunchError, match="uploader's read-write key"):
        task_secrets(SECRETS)

    settings.DEBUG = True  # development: the uploader's token stands in
    settings.R2_NODE_ACCESS_KEY_ID = settings.R2_NODE_SECRET_ACCESS_KEY = ""
    assert task_secrets(SECRETS)["AWS_ACCESS_KEY_ID"] == "r2-access-key-id-XYZ"


def test_a_launch_without_node_credentials_fails_the_node_with_the_reason(r2, served_model, fake_sky, settings) -> None:
    from apps.fleet import lifecycle
    from apps.fleet.models import Node, NodeStatus

    settings.DEBUG = False
    settings.R2_NODE_ACCESS_KEY_ID = settings.R2_NODE_SECRET_ACCESS_KEY = ""
    node = node_create(model=served_model, launcher="skypilot")
    lifecycle.launch_node(node.pk)
    node = Node.objects.get(pk=node.pk)
    assert node.status == NodeStatus.FAILED and "read-only" in node.status_reason
    assert not [c for c in fake_sky.calls if c[0] == "launch"]


def test_the_models_tool_and_reasoning_parsers_reach_vllm_serve(r2, served_model) -> None:
    node = node_create(model=served_model, launcher="skypilot")
    assert "--enable-auto-tool-choice" not in _vllm_args(fleet_sky.build_task(task_config(node), {}))

    served_model.tool_call_parser, served_model.reasoning_parser = "llama3_json", "deepseek_r1"
    served_model.save()
    node.refresh_from_db()
    args = _vllm_args(fleet_sky.build_task(task_config(node), task_secrets(SECRETS)))

    assert "--enable-auto-tool-choice" in args
    assert args[args.index("--tool-call-parser") + 1] == "llama3_json"
    assert args[args.index("--reasoning-parser") + 1] == "deepseek_r1"


def test_a_launch_profile_becomes_an_ordered_failover_list(r2, served_model) -> None:
    profile = LaunchProfile.objects.create(
        name="l4-anywhere",
        accelerator="L4:1",
        use_spot=True,
        placements=[
            {"cloud": "aws", "region": "us-east-1"},
            {"cloud": "gcp", "region": "us-central1"},
            {"cloud": "azure"},
        ],
    )
    node = node_create(model=served_model, launcher="skypilot")
    node.launch_profile = profile

    task = fleet_sky.build_task(task_config(node), task_secrets(SECRETS))

    assert isinstance(task.resources, list)  # a list = ordered preference in SkyPilot
    assert [str(r.cloud).lower() for r in task.resources] == ["aws", "gcp", "azure"]
    assert [r.region for r in task.resources] == ["us-east-1", "us-central1", None]
    assert all(r.use_spot and r.ports == ["8000"] for r in task.resources)


def test_a_model_without_weights_in_storage_cannot_be_launched(r2, catalog_model) -> None:
    catalog_model.storage_uri = ""
    node = node_create(model=catalog_model, launcher="skypilot")
    with pytest.raises(LaunchError, match="storage URI"):
        task_config(node)


def test_disk_size_grows_with_the_model() -> None:
    assert disk_size_gb(0) == 100
    assert disk_size_gb(140 * 10**9) == 240
