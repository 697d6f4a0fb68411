"""The only importer of ``sky`` (the SkyPilot SDK). Every call goes to a SkyPilot API server.

``import sky`` takes seconds, so it happens lazily, on first use. SkyPilot's exceptions are
translated here into apps.fleet.launchers.base errors with a reason staff can act on, so no other
module needs to know SkyPilot's exception classes. Tests replace ``_sdk()`` with a fake SDK that
still uses the real ``sky.Task`` and ``sky.exceptions``.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from django.conf import settings

from apps.fleet.launchers.base import LaunchError, RetryableLaunchError

NO_CREDENTIALS = "no cloud credentials — run sky check"


class ClusterMissing(Exception):  # noqa: N818 - reads as the fact it reports
    """The cluster does not exist (never launched, or already down)."""


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
    import sky

    return sky


def _summarise_failover(history: list[BaseException]) -> str:
    if not history:
        return "no placement had capacity"
    lines = [f"{i}. {type(e).__name__}: {str(e).strip().splitlines()[0][:200] if str(e).strip() else ''}"
             for i, e in enumerate(history[-10:], 1)]
    more = f" (last 10 of {len(history)})" if len(history) > 10 else ""
    return f"tried {len(history)} placement(s){more}:\n" + "\n".join(lines)


@contextlib.contextmanager
def _mapped(sdk: Any) -> Iterator[None]:
    exc_mod = sdk.exceptions
    try:
        yield
    except exc_mod.ResourcesUnavailableError as exc:
        raise LaunchError(f"no capacity: {exc}\n{_summarise_failover(exc.failover_history)}") from exc
    except exc_mod.NoCloudAccessError as exc:
        raise LaunchError(f"{NO_CREDENTIALS} ({exc})") from exc
    except (exc_mod.InvalidCloudCredentials, exc_mod.CloudUserIdentityError) as exc:
        raise LaunchError(f"{NO_CREDENTIALS} ({type(exc).__name__}: {exc})") from exc
    except exc_mod.ClusterDoesNotExist as exc:
        raise ClusterMissing(str(exc)) from exc
    except exc_mod.ApiServerConnectionError as exc:
        raise RetryableLaunchError(f"SkyPilot API server unreachable: {exc}") from exc
    except exc_mod.ApiServerAuthenticationError as exc:
        raise LaunchError(f"SkyPilot API server refused our credentials: {exc}") from exc
    except exc_mod.RequestCancelled as exc:
        raise LaunchError(f"SkyPilot request cancelled: {exc}") from exc


def build_task(config: dict[str, Any], secrets: dict[str, str]) -> Any:
    """A validated sky.Task: the schema is checked offline by SkyPilot itself. Secrets are attached
    after parsing so the task's stored YAML (``_user_specified_yaml``) never contains them."""
    sdk = _sdk()
    try:
        task = sdk.Task.from_yaml_config(config)
    except (ValueError, sdk.exceptions.InvalidSkyPilotConfigError) as exc:
        raise LaunchError(f"invalid SkyPilot task: {exc}") from exc
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
            # A RequestStatus enum: str() of it is "RequestStatus.RUNNING", its value "RUNNING".
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
            raise RetryableLaunchError(f"SkyPilot did not answer {what} within {timeout_s:g} s "
                                       f"(request {request_id} cancelled)")
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


def clusters(*, names: list[str] | None = None, refresh: bool = False) -> list[ClusterRecord]:
    sdk = _sdk()
    mode = sdk.StatusRefreshMode.FORCE if refresh else sdk.StatusRefreshMode.NONE
    with _mapped(sdk):
        request_id = sdk.status(cluster_names=names, refresh=mode)
    records = _result_within(sdk, str(request_id), what="a cluster status request",
                             timeout_s=settings.FLEET_SKY_STATUS_TIMEOUT_S)
    out = []
    for record in records:
        get = record.get if isinstance(record, dict) else lambda k, r=record: getattr(r, k, None)
        status = get("status")
        out.append(ClusterRecord(name=str(get("name")), status=str(getattr(status, "value", status)),
                                 launched_at=get("launched_at")))
    return out


def endpoint(cluster_name: str, port: int) -> str:
    """``http://host:port`` of the cluster's port; ValueError while it is not exposed/up yet."""
    sdk = _sdk()
    try:
        with _mapped(sdk):
            endpoints = sdk.get(sdk.endpoints(cluster_name, port))
    except sdk.exceptions.ClusterNotUpError as exc:
        raise ValueError(f"cluster not up yet: {exc}") from exc
    url = endpoints.get(port) or endpoints.get(str(port)) or ""
    return url if "://" in url or not url else f"http://{url}"


def submit_down(cluster_name: str) -> str:
    sdk = _sdk()
    with _mapped(sdk):
        return str(sdk.down(cluster_name))


def server_report() -> tuple[str, list[str]]:
    """(API server version, enabled clouds) — what ``manage.py fleet_check`` prints."""
    sdk = _sdk()
    with _mapped(sdk):
        info = sdk.api_info()
        clouds = sdk.get(sdk.enabled_clouds())
    version = info.get("version") if hasattr(info, "get") else getattr(info, "version", "?")
    return str(version or "?"), [str(c) for c in clouds or []]
