"""The only importer of ``sky`` (the SkyPilot SDK). Every call goes to a SkyPilot API server.

``import sky`` takes seconds, so it happens lazily, on first use. Every exception the SDK can
raise (its own classes, the server's exceptions ``sky.get`` re-raises, and the ``requests`` errors
of a server that went away) is translated here into apps.fleet.launchers.base errors with a
reason staff can act on: RetryableLaunchError for what may pass, LaunchError for what will not,
so no other module needs to know SkyPilot's exception classes and none escapes a task.

Fast tests replace ``_sdk()`` with a fake SDK (apps/fleet/tests/conftest.py) that still uses the
real ``sky.Task``, ``sky.exceptions`` and return types; apps/fleet/tests/test_sky_contract.py runs
the same functions against a real SkyPilot API server on loopback.
"""

from __future__ import annotations

import contextlib
import io
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from django.conf import settings

from apps.fleet.launchers.base import LaunchError, RetryableLaunchError

NO_CREDENTIALS = "no cloud credentials — run sky check"
# Job statuses that are not final (sky.JobStatus.nonterminal_statuses()); every other status of a
# `vllm serve` job, SUCCEEDED included, means the server is not running.
JOB_RUNNING = frozenset({"INIT", "PENDING", "SETTING_UP", "RUNNING"})
JOB_LOG_LINES = 40
JOB_LOG_MAX_CHARS = 4000


class ClusterMissing(Exception):  # noqa: N818 - reads as the fact it reports
    """The cluster does not exist (never launched, or already down)."""


class ClusterNotUp(RetryableLaunchError):  # noqa: N818 - reads as the fact it reports
    """The cluster exists but is not UP (still provisioning, stopped, or being repaired)."""


@dataclass(frozen=True)
class ClusterRecord:
    name: str
    status: str  # INIT / UP / STOPPED
    launched_at: float | None


def _sdk() -> Any:
    if not settings.SKYPILOT_API_SERVER_ENDPOINT:
        # Without an endpoint the SDK would start a local API server (~1 GB, several processes).
        raise LaunchError("SKYPILOT_API_SERVER_ENDPOINT is not set; point it at a SkyPilot API server.")
    os.environ["SKYPILOT_API_SERVER_ENDPOINT"] = settings.SKYPILOT_API_SERVER_ENDPOINT
    # Never let the SDK start an API server inside a worker when the configured one is down (it
    # does so for a loopback endpoint): a down server is an error we report and retry.
    os.environ["SKYPILOT_DISABLE_LOCAL_API_SERVER"] = "1"
    # One SkyPilot identity for every worker, wherever it runs: clusters belong to the user that
    # launched them, and a worker with another identity (a redeploy, a second host) could not
    # operate them. The SDK reads both variables on every request.
    for name in ("SKYPILOT_USER_ID", "SKYPILOT_SERVICE_ACCOUNT_TOKEN"):
        value = getattr(settings, name, "")
        if value:
            os.environ[name] = value
        else:
            os.environ.pop(name, None)
    import sky
    from sky.server import common as server_common

    # The SDK caches the endpoint for the process; a value read before ours was set (or before the
    # setting changed) would send every request elsewhere.
    if server_common.get_server_url() != settings.SKYPILOT_API_SERVER_ENDPOINT.rstrip("/"):
        server_common.get_server_url.cache_clear()
        server_common.is_api_server_local.cache_clear()
    return sky


def _summarise_failover(history: list[BaseException]) -> str:
    if not history:
        return "no placement had capacity"
    lines = [
        f"{i}. {type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
        for i, e in enumerate(history[-10:], 1)
    ]
    more = f" (last 10 of {len(history)})" if len(history) > 10 else ""
    return f"tried {len(history)} placement(s){more}:\n" + "\n".join(lines)


def _first_line(exc: BaseException, limit: int = 500) -> str:
    text = str(exc).strip()
    return (text.splitlines()[0] if text else type(exc).__name__)[:limit]


# Errors that may pass by themselves: retried (a bounded number of times) by apps.fleet.lifecycle.
_TRANSIENT = (
    "ServerTemporarilyUnavailableError",
    "RequestInterruptedError",
    "ExecutionRetryableError",
    "ConcurrentWorkerExhaustedError",
    "NetworkError",
    "ClusterStatusFetchingError",
    "SkyletUnavailableError",
    "FetchClusterInfoError",
    "KubeAPIUnreachableError",
)


@contextlib.contextmanager
def _mapped(sdk: Any) -> Iterator[None]:
    """Every exception becomes ClusterMissing, ClusterNotUp, RetryableLaunchError or LaunchError."""
    exc_mod = sdk.exceptions
    try:
        yield
    except (LaunchError, ClusterMissing):
        raise
    except exc_mod.ResourcesUnavailableError as exc:
        if isinstance(exc, exc_mod.KubeAPIUnreachableError):
            raise RetryableLaunchError(f"Kubernetes API unreachable: {_first_line(exc)}") from exc
        raise LaunchError(f"no capacity: {exc}\n{_summarise_failover(exc.failover_history)}") from exc
    except exc_mod.NoCloudAccessError as exc:
        raise LaunchError(f"{NO_CREDENTIALS} ({_first_line(exc)})") from exc
    except (exc_mod.InvalidCloudCredentials, exc_mod.CloudUserIdentityError) as exc:
        raise LaunchError(f"{NO_CREDENTIALS} ({type(exc).__name__}: {_first_line(exc)})") from exc
    except exc_mod.ClusterOwnerIdentityMismatchError as exc:
        raise LaunchError(
            "the cluster belongs to another cloud identity than the API server's "
            f"(ClusterOwnerIdentityMismatchError: {_first_line(exc)})"
        ) from exc
    except exc_mod.ClusterDoesNotExist as exc:
        raise ClusterMissing(str(exc)) from exc
    except exc_mod.ClusterNotUpError as exc:
        raise ClusterNotUp(f"cluster not up: {_first_line(exc)}") from exc
    except exc_mod.ApiServerAuthenticationError as exc:
        raise LaunchError(
            f"SkyPilot API server refused our credentials (set SKYPILOT_SERVICE_ACCOUNT_TOKEN): {_first_line(exc)}"
        ) from exc
    except exc_mod.PermissionDeniedError as exc:
        raise LaunchError(
            f"SkyPilot API server denied the request (check the service account's role): {_first_line(exc)}"
        ) from exc
    except exc_mod.APIVersionMismatchError as exc:
        raise LaunchError(f"SkyPilot client and API server versions do not match: {_first_line(exc)}") from exc
    except exc_mod.RequestCancelled as exc:
        raise LaunchError(f"SkyPilot request cancelled: {_first_line(exc)}") from exc
    except exc_mod.CommandError as exc:
        # A command on the cluster failed (provisioning, runtime setup): its own message says which.
        detail = (getattr(exc, "detailed_reason", "") or "").strip()[-1500:]
        raise LaunchError(
            f"command failed on the cluster (exit {exc.returncode}): "
            f"{(exc.error_msg or '').strip()[:500]}" + (f"\n{detail}" if detail else "")
        ) from exc
    except exc_mod.ClusterSetUpError as exc:
        raise LaunchError(f"cluster set-up failed: {_first_line(exc, 1500)}") from exc
    except exc_mod.InvalidClusterNameError as exc:
        raise LaunchError(f"invalid cluster name (check FLEET_CLUSTER_PREFIX): {_first_line(exc)}") from exc
    except exc_mod.ResourcesMismatchError as exc:
        raise LaunchError(f"the cluster's resources do not match the task: {_first_line(exc)}") from exc
    except exc_mod.CloudError as exc:
        raise LaunchError(f"cloud error on the SkyPilot API server: {_first_line(exc)}") from exc
    except exc_mod.ApiServerConnectionError as exc:
        raise RetryableLaunchError(f"SkyPilot API server unreachable: {_first_line(exc)}") from exc
    except Exception as exc:
        if type(exc).__name__ in _TRANSIENT:
            raise RetryableLaunchError(
                f"SkyPilot API server busy or a cloud call failed for now ({type(exc).__name__}: {_first_line(exc)})"
            ) from exc
        if isinstance(exc, OSError):  # requests' ConnectionError/Timeout/HTTPError: the server went away
            raise RetryableLaunchError(
                f"SkyPilot API server unreachable ({type(exc).__name__}: {_first_line(exc)})"
            ) from exc
        # Anything else (ValueError, NotSupportedError, ProvisionPrechecksError, a policy refusal…)
        # will not pass by retrying: fail with what SkyPilot said.
        raise LaunchError(f"SkyPilot error: {type(exc).__name__}: {_first_line(exc, 1500)}") from exc


def build_task(config: dict[str, Any], secrets: dict[str, str]) -> Any:
    """A validated sky.Task: the schema is checked offline by SkyPilot itself. Secrets are attached
    after parsing so the task's stored YAML (``_user_specified_yaml``) never contains them."""
    sdk = _sdk()
    try:
        task = sdk.Task.from_yaml_config(config)
    except Exception as exc:  # ValueError, InvalidSkyPilotConfigError, a schema error: all final
        raise LaunchError(f"invalid SkyPilot task: {type(exc).__name__}: {exc}") from exc
    task.update_secrets(secrets)
    return task


def submit_launch(task: Any, *, cluster_name: str) -> str:
    sdk = _sdk()
    with _mapped(sdk):
        request_id = sdk.launch(task, cluster_name=cluster_name, retry_until_up=False, down=False)
    return str(request_id)


def request_status(request_id: str) -> str | None:
    """PENDING / WAITING / RUNNING / SUCCEEDED / FAILED / CANCELLED, or None if unknown to the server."""
    sdk = _sdk()
    with _mapped(sdk):
        payloads = sdk.api_status([request_id])
    for payload in payloads:
        if str(payload.request_id).startswith(request_id) or request_id.startswith(str(payload.request_id)):
            # A RequestPayload's status is the plain string ("RUNNING"); accept the enum too.
            return str(getattr(payload.status, "value", payload.status)).upper()
    return None


_UNFINISHED = {"PENDING", "WAITING", "RUNNING"}


def _result_within(sdk: Any, request_id: str, *, what: str, timeout_s: float) -> Any:
    """``sdk.get``, but never forever: a SkyPilot API server that is stuck (or a cloud that does
    not answer a status refresh) must not hold a Celery worker. Past the deadline the request is
    cancelled and the caller gets a RetryableLaunchError."""
    deadline = time.monotonic() + timeout_s
    pause = 0.05
    while request_status(request_id) in _UNFINISHED:
        if time.monotonic() >= deadline:
            with contextlib.suppress(Exception):  # best effort: the server may be the thing that is stuck
                sdk.api_cancel(request_id)
            raise RetryableLaunchError(
                f"SkyPilot did not answer {what} within {timeout_s:g} s (request {request_id} cancelled)"
            )
        time.sleep(pause)
        pause = min(1.0, pause * 2)
    with _mapped(sdk):
        return sdk.get(request_id)


def request_result(request_id: str) -> Any:
    """The finished request's return value; its error raised as a LaunchError."""
    sdk = _sdk()
    with _mapped(sdk):
        return sdk.get(request_id)


def launched_placement(launch_result: Any) -> dict[str, str]:
    """Cloud, region and accelerator SkyPilot actually chose (from ``(job_id, handle)``)."""
    handle = launch_result[1] if isinstance(launch_result, tuple | list) and len(launch_result) > 1 else None
    resources = getattr(handle, "launched_resources", None)
    if resources is None:
        return {}
    accelerators = getattr(resources, "accelerators", None) or {}
    placement = {
        "cloud": str(getattr(resources, "cloud", "") or "").lower(),
        "region": str(getattr(resources, "region", "") or ""),
        "accelerator": ",".join(f"{name}:{count:g}" for name, count in accelerators.items()),
    }
    return {k: v for k, v in placement.items() if v and v != "none"}


def launched_job_id(launch_result: Any) -> int | None:
    """The id of the job running our setup and ``vllm serve`` (first of ``(job_id, handle)``);
    None when the launch queued no job."""
    job_id = launch_result[0] if isinstance(launch_result, tuple | list) and launch_result else None
    try:
        return int(job_id) if job_id is not None else None
    except (TypeError, ValueError):
        return None


def clusters(*, names: list[str] | None = None, refresh: bool = False) -> list[ClusterRecord]:
    """Our clusters (named ``FLEET_CLUSTER_PREFIX-…``), whichever SkyPilot user launched them.

    ``all_users=True``: without it the server lists only the caller's user hash, and a worker with
    another identity would see every live cluster as vanished. ``_summary_response=True``: the full
    answer carries each cluster's resource handle, and decoding it on this side reads the cloud's
    catalog (downloaded from GitHub when missing or older than a few hours); the summary carries
    the name, status and launch time we read, and decodes offline."""
    sdk = _sdk()
    mode = sdk.StatusRefreshMode.FORCE if refresh else sdk.StatusRefreshMode.NONE
    with _mapped(sdk):
        request_id = sdk.status(cluster_names=names, refresh=mode, all_users=True, _summary_response=True)
    records = _result_within(
        sdk, str(request_id), what="a cluster status request", timeout_s=settings.FLEET_SKY_STATUS_TIMEOUT_S
    )
    prefix = f"{settings.FLEET_CLUSTER_PREFIX}-"
    out = []
    for record in records:
        get = record.get if isinstance(record, dict) else lambda k, r=record: getattr(r, k, None)
        status = get("status")
        name = str(get("name"))
        if not name.startswith(prefix):
            continue  # another team's cluster on a shared API server: never ours to judge or tear down
        out.append(
            ClusterRecord(name=name, status=str(getattr(status, "value", status)), launched_at=get("launched_at"))
        )
    return out


def endpoint(cluster_name: str, port: int) -> str:
    """``http://host:port`` of the cluster's port; ValueError while it is not exposed/up yet."""
    sdk = _sdk()
    try:
        with _mapped(sdk):
            endpoints = sdk.get(sdk.endpoints(cluster_name, port))
    except ClusterNotUp as exc:
        raise ValueError(exc.reason) from exc
    url = endpoints.get(port) or endpoints.get(str(port)) or ""
    return url if "://" in url or not url else f"http://{url}"


def job_status(cluster_name: str, job_id: int | None) -> str | None:
    """The job's status (INIT, PENDING, SETTING_UP, RUNNING, SUCCEEDED, FAILED, FAILED_SETUP,
    FAILED_DRIVER, CANCELLED), or None if the cluster has no such job. ``job_id`` None: the
    cluster's latest job (an adopted cluster whose launch result we never saw)."""
    sdk = _sdk()
    with _mapped(sdk):
        request_id = sdk.job_status(cluster_name, None if job_id is None else [job_id])
    statuses = (
        _result_within(sdk, str(request_id), what="a job status request", timeout_s=settings.FLEET_SKY_STATUS_TIMEOUT_S)
        or {}
    )
    # Keys are ints (the SDK's decoder); the latest job comes back under the key None.
    status = next(iter(statuses.values()), None) if job_id is None else statuses.get(job_id)
    return None if status is None else str(getattr(status, "value", status)).upper()


def job_log_tail(cluster_name: str, job_id: int | None, *, lines: int = JOB_LOG_LINES) -> str:
    """The job's last ``lines`` log lines (at most JOB_LOG_MAX_CHARS), for a node's failure reason.
    Best effort: a log that cannot be read says why instead."""
    sdk = _sdk()
    buffer = io.StringIO()
    try:
        with _mapped(sdk):
            sdk.tail_logs(cluster_name, job_id, follow=False, tail=lines, output_stream=buffer)
    except (LaunchError, ClusterMissing) as exc:
        return f"(job log unavailable: {getattr(exc, 'reason', exc)})"
    text = "\n".join(buffer.getvalue().rstrip().splitlines()[-lines:])
    return text[-JOB_LOG_MAX_CHARS:]


def submit_down(cluster_name: str) -> str:
    sdk = _sdk()
    with _mapped(sdk):
        return str(sdk.down(cluster_name))


def submit_stop(cluster_name: str) -> str:
    """Stop the cluster, keeping its disks (``sky.stop``). Its request raises ClusterDoesNotExist,
    RuntimeError, or NotSupportedError for a spot cluster: mapped when read with request_result."""
    sdk = _sdk()
    with _mapped(sdk):
        return str(sdk.stop(cluster_name))


def server_report() -> tuple[str, list[str]]:
    """(API server version, enabled clouds) — what ``manage.py fleet_check`` prints.

    ``enabled_clouds`` lives in ``sky.client.sdk`` only (0.14 has no top-level ``sky.enabled_clouds``)."""
    sdk = _sdk()
    with _mapped(sdk):
        info = sdk.api_info()
        request_id = sdk.client.sdk.enabled_clouds()
    clouds = _result_within(
        sdk, str(request_id), what="the enabled clouds request", timeout_s=settings.FLEET_SKY_STATUS_TIMEOUT_S
    )
    version = info.get("version") if isinstance(info, dict) else getattr(info, "version", "?")
    return str(version or "?"), [str(c) for c in clouds or []]
