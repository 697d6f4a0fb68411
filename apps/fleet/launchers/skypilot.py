"""SkyPilot launcher: a vLLM server streaming its weights from R2, on any cloud SkyPilot reaches.

The task config is built here as a plain dict without secrets (that dict is what staff preview
and what SkyPilot stores); secrets are attached by apps.fleet.sky when the task is submitted.
Launch and teardown are asynchronous SkyPilot API requests: we keep their request ids in
launcher_state and poll them, so no worker waits minutes for a machine.
"""

from __future__ import annotations

import contextlib
import json
import math
import shlex
from typing import Any

import yaml
from django.conf import settings

from apps.fleet import sky
from apps.fleet.launchers.base import Launcher, LaunchError, PollResult, Progress, RetryableLaunchError, Secrets
from apps.fleet.models import Node

VLLM_PORT = 8000
# Run:ai streamer: 32 parallel readers and a 5 GiB CPU buffer load a 15 GB model in ~5 s.
STREAMER_CONCURRENCY = 32
STREAMER_MEMORY_LIMIT = 5 * 1024**3
# Over the internet the streamer's 1 s default request timeout is too tight.
STREAMER_REQUEST_TIMEOUT_MS = 20_000
# The streamer reads straight into memory; the disk holds the OS image, vLLM and its caches.
BASE_DISK_GB = 100
SECRET_NAMES = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "VLLM_API_KEY", "CROSSLOGIC_REGISTRATION_TOKEN")


def disk_size_gb(total_bytes: int) -> int:
    # Room for one local copy of the weights (some vLLM versions cache tokenizer/config files).
    return max(BASE_DISK_GB, BASE_DISK_GB + math.ceil(total_bytes / 1e9))


def _infra(cloud: str, region: str = "", zone: str = "") -> str:
    return "/".join(p for p in (cloud.lower(), region, zone) if p)


def resources_config(node: Node) -> dict[str, Any]:
    model = node.model
    profile = node.launch_profile
    common: dict[str, Any] = {
        "accelerators": (profile.accelerator if profile and profile.accelerator else "")
        or node.accelerator
        or model.accelerator,
        "use_spot": node.use_spot,
        "ports": VLLM_PORT,
        "disk_size": (profile.disk_size_gb if profile and profile.disk_size_gb else None)
        or disk_size_gb(model.total_bytes),
    }
    if profile is not None:
        # A list is an ordered preference: SkyPilot tries each placement in turn.
        common["ordered"] = [
            {"infra": _infra(p["cloud"], p.get("region", ""), p.get("zone", ""))} for p in profile.placements
        ]
    elif node.cloud:
        common["infra"] = _infra(node.cloud, node.region)
    return common


def vllm_command(node: Node) -> str:
    model = node.model
    if not model.storage_uri.startswith("s3://"):
        raise LaunchError(f"model {model.name} has no storage URI (s3://bucket/prefix): upload its weights first")
    extra = json.dumps(
        {"concurrency": STREAMER_CONCURRENCY, "memory_limit": STREAMER_MEMORY_LIMIT}, separators=(",", ":")
    )
    args = [
        "vllm",
        "serve",
        model.storage_uri.rstrip("/"),
        "--load-format",
        "runai_streamer",
        "--served-model-name",
        model.name,
        "--model-loader-extra-config",
        extra,
        "--host",
        "0.0.0.0",  # noqa: S104 - the node serves the gateway over the network
        "--port",
        str(VLLM_PORT),
        "--dtype",
        model.dtype,
        "--tensor-parallel-size",
        str(model.tensor_parallel_size),
        "--gpu-memory-utilization",
        str(model.gpu_memory_utilization),
    ]
    if model.max_model_len:
        args += ["--max-model-len", str(model.max_model_len)]
    if model.tool_call_parser:  # without it vLLM answers 400 to every request with `tools`
        args += ["--enable-auto-tool-choice", "--tool-call-parser", model.tool_call_parser]
    if model.reasoning_parser:
        args += ["--reasoning-parser", model.reasoning_parser]
    args += [str(a) for a in model.extra_vllm_args]
    # No --api-key: vLLM reads VLLM_API_KEY (a SkyPilot secret) from its environment itself, while
    # a flag would land in `ps` and in the job log (vLLM logs its non-default arguments at start).
    return shlex.join(args)


# After vLLM answers /health, the node reports to the control plane (in the background, retrying;
# a 4xx answer is final: wrong/used token or a terminated node).
REGISTER_SCRIPT = r"""
crosslogic_register() {
  until curl -sf -o /dev/null "http://127.0.0.1:__PORT__/health"; do sleep 2; done
  healthy_at=$(date +%s)
  for attempt in $(seq 1 120); do
    code=$(curl -s -o /tmp/crosslogic-register.out -w '%{http_code}' -X POST \
      "$CROSSLOGIC_CONTROL_PLANE_URL/api/v1/nodes/register" \
      -H "Authorization: Bearer $CROSSLOGIC_REGISTRATION_TOKEN" -H 'Content-Type: application/json' \
      -d "{\"provisioned_at\": $CROSSLOGIC_STARTED_AT, \"weights_loaded_at\": $healthy_at, \"health_ok\": true}")
    case "$code" in
      2*) echo "crosslogic: registered"; return 0 ;;
      4*) echo "crosslogic: registration refused ($code): $(cat /tmp/crosslogic-register.out)"; return 1 ;;
    esac
    sleep 5
  done
}
""".replace("__PORT__", str(VLLM_PORT))


def task_config(node: Node) -> dict[str, Any]:
    """The SkyPilot task as a YAML-shaped dict, without secrets (see SECRET_NAMES)."""
    run = "\n".join(
        [
            "export CROSSLOGIC_STARTED_AT=$(date +%s)",
            REGISTER_SCRIPT.strip(),
            "crosslogic_register &",
            f"exec {vllm_command(node)}",
        ]
    )
    return {
        "name": node.cluster_name or "crosslogic-node",
        "resources": resources_config(node),
        "envs": {
            "AWS_ENDPOINT_URL": getattr(settings, "R2_ENDPOINT_URL", ""),
            "AWS_DEFAULT_REGION": "auto",
            "RUNAI_STREAMER_S3_USE_VIRTUAL_ADDRESSING": "0",
            "AWS_EC2_METADATA_DISABLED": "true",
            "RUNAI_STREAMER_S3_REQUEST_TIMEOUT_MS": str(STREAMER_REQUEST_TIMEOUT_MS),
            "CROSSLOGIC_CONTROL_PLANE_URL": settings.CONTROL_PLANE_URL.rstrip("/"),
            "CROSSLOGIC_NODE_ID": str(node.pk or ""),
        },
        "setup": f"pip install {shlex.quote(f'vllm[runai]=={settings.VLLM_VERSION}')}",
        "run": run,
    }


def node_r2_credentials() -> tuple[str, str]:
    """The read-only R2 token GPU nodes stream weights with (R2_NODE_*). In development (DEBUG on)
    the uploader's read-write token stands in; in production launching without a read-only one
    is refused: any GPU machine could otherwise overwrite or delete the weights."""
    key_id, secret = settings.R2_NODE_ACCESS_KEY_ID, settings.R2_NODE_SECRET_ACCESS_KEY
    if key_id and secret:
        if not settings.DEBUG and key_id == settings.R2_ACCESS_KEY_ID:
            raise LaunchError(
                "R2_NODE_ACCESS_KEY_ID is the uploader's read-write key: give nodes a read-only "
                "R2 token (docs/r2.md, 'A read-only token for GPU nodes')."
            )
        return key_id, secret
    if settings.DEBUG:
        return settings.R2_ACCESS_KEY_ID, settings.R2_SECRET_ACCESS_KEY
    raise LaunchError(
        "R2_NODE_ACCESS_KEY_ID and R2_NODE_SECRET_ACCESS_KEY are not set: nodes need a read-only "
        "R2 token to stream weights (docs/r2.md, 'A read-only token for GPU nodes')."
    )


def task_secrets(secrets: Secrets) -> dict[str, str]:
    key_id, secret = node_r2_credentials()
    return {
        "AWS_ACCESS_KEY_ID": key_id,
        "AWS_SECRET_ACCESS_KEY": secret,
        "VLLM_API_KEY": secrets.vllm_api_key,
        "CROSSLOGIC_REGISTRATION_TOKEN": secrets.registration_token,
    }


def _cluster_name(node: Node) -> str:
    if not node.cluster_name:  # node_create names every node in its transaction: a bug, not a cluster
        raise LaunchError(f"node {node.pk} has no cluster name")
    return node.cluster_name


class SkyPilotLauncher(Launcher):
    name = "skypilot"
    asynchronous = True

    def preview(self, node: Node) -> str:
        config = task_config(node)
        config["secrets"] = {name: "<redacted>" for name in SECRET_NAMES}
        return yaml.safe_dump(config, sort_keys=False, width=120)

    def launch(self, node: Node, secrets: Secrets) -> dict[str, object]:
        # A cluster with this name already running means an earlier attempt got through: never
        # launch a second time, just follow it.
        # A warm restart relaunches onto its own stopped cluster on purpose: SkyPilot starts it (same
        # cloud, region and zone) and runs setup and run again as a new job.
        if not node.launcher_state.get("warm_restart") and self.exists(node):
            return {"launch_request_id": "", "adopted_existing_cluster": True}
        task = sky.build_task(task_config(node), task_secrets(secrets))
        request_id = sky.submit_launch(task, cluster_name=_cluster_name(node))
        return {"launch_request_id": request_id}

    def poll(self, node: Node) -> PollResult:
        """Follow the launch request, then the job: SkyPilot runs ``setup`` and ``run`` as the
        cluster's first job, so a launch succeeds once that job is queued; `pip install vllm`
        failing or vLLM crashing (bad weights, R2 auth, OOM) shows only in the job's status."""
        state: dict[str, object] = {}
        placement: dict[str, str] = {}
        request_id = str(node.launcher_state.get("launch_request_id") or "")
        if request_id and not node.launcher_state.get("launched"):
            status = sky.request_status(request_id)
            if status is None:
                raise RetryableLaunchError(
                    f"SkyPilot API server does not know launch request {request_id} "
                    "(restarted without its request database?)"
                )
            if status in {"PENDING", "WAITING", "RUNNING"}:
                return PollResult(Progress.WAITING, message=status.lower())
            try:
                result = sky.request_result(request_id)  # raises the launch's error, mapped
            except sky.ClusterMissing as exc:
                raise LaunchError(f"launch failed: the cluster does not exist ({exc})") from exc
            placement = sky.launched_placement(result)
            state["job_id"] = sky.launched_job_id(result)
        url, message = node.endpoint_url, ""
        if not url:
            try:
                url = sky.endpoint(_cluster_name(node), VLLM_PORT)
            except sky.ClusterMissing:
                return PollResult(Progress.GONE, message="cluster vanished right after launch")
            except ValueError as exc:  # not exposed yet (or, for 0.14.1, a cluster not found): see the job
                message = f"endpoint not known yet: {exc}"
        job_id = state.get("job_id", node.launcher_state.get("job_id"))
        self._check_job(node, job_id if isinstance(job_id, int) else None)
        return PollResult(Progress.LAUNCHED, endpoint_url=url, placement=placement, state=state, message=message)

    def _check_job(self, node: Node, job_id: int | None) -> None:
        """LaunchError, with the job's last log lines, once the setup/vLLM job is no longer running."""
        try:
            status = sky.job_status(_cluster_name(node), job_id)
        except sky.ClusterNotUp:
            return  # INIT while SkyPilot repairs it, or stopped: the reconciler judges the cluster
        except sky.ClusterMissing as exc:
            raise LaunchError(f"the cluster vanished: {exc}") from exc
        if status in sky.JOB_RUNNING:
            return
        what = f"job {job_id}" if job_id is not None else "the cluster's job"
        verdict = "is not on the cluster" if status is None else status.lower().replace("_", " ")
        log = sky.job_log_tail(_cluster_name(node), job_id)
        raise LaunchError(f"vLLM is not running: {what} {verdict}. Last lines of its log:\n{log}")

    def terminate(self, node: Node) -> bool:
        request_id = str(node.launcher_state.get("down_request_id") or "")
        if not request_id:
            try:
                node.launcher_state["down_request_id"] = sky.submit_down(_cluster_name(node))
            except sky.ClusterMissing:
                return True
            return False
        status = sky.request_status(request_id)
        if status in {"PENDING", "WAITING", "RUNNING"}:
            return False
        with contextlib.suppress(sky.ClusterMissing):
            sky.request_result(request_id)
        return True

    def exists(self, node: Node) -> bool | None:
        return bool(sky.clusters(names=[_cluster_name(node)]))

    def can_stop(self, node: Node) -> bool:
        # sky.stop raises NotSupportedError for spot clusters (GCP aside): never try.
        return not node.use_spot

    def stop(self, node: Node) -> bool:
        request_id = str(node.launcher_state.get("stop_request_id") or "")
        if not request_id:
            try:
                node.launcher_state["stop_request_id"] = sky.submit_stop(_cluster_name(node))
            except sky.ClusterMissing as exc:
                raise LaunchError(f"the cluster vanished before it could be stopped: {exc}") from exc
            return False
        status = sky.request_status(request_id)
        if status in {"PENDING", "WAITING", "RUNNING"}:
            return False
        try:
            sky.request_result(request_id)  # raises the stop's error (NotSupportedError, RuntimeError), mapped
        except sky.ClusterMissing as exc:
            raise LaunchError(f"the cluster vanished while stopping: {exc}") from exc
        return True
