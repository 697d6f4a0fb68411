"""Fleet fixtures. SkyPilot is the one boundary that cannot run here: ``fake_sky`` replaces the SDK
at apps.fleet.sky._sdk with a scripted API server, while sky.Task and sky.exceptions stay real."""

from __future__ import annotations

import inspect
import os
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import pytest
from django.contrib.auth.models import User
from rest_framework.test import APIClient


@pytest.fixture
def staff_user(db) -> User:
    return User.objects.create_user("ops", "ops@crosslogic.test", "pw-ops-123456", is_staff=True, is_superuser=True)


@pytest.fixture
def staff_client(staff_user) -> APIClient:
    client = APIClient()
    client.force_authenticate(staff_user)
    return client


def _real_function(real: Any, dotted: str) -> Any:
    """The real SDK function ``sky.<dotted>``: AttributeError if 0.14.1 has no such function."""
    target = real
    for part in dotted.split("."):
        target = getattr(target, part)
    return target


@dataclass
class FakeSky:
    """A SkyPilot API server in memory: requests finish when the test says so.

    As strict as the real SDK where our code could go wrong: every call is bound against the real
    function's signature (a wrong or missing argument, or a function 0.14.1 does not have, fails
    as it would for real); ``api_status`` returns real ``RequestPayload`` objects (status a plain
    string), ``status`` real ``StatusResponse`` objects and ``job_status`` ``{int: JobStatus}``;
    ``status`` without ``all_users=True`` lists only the caller's clusters (SKYPILOT_USER_ID, as
    the real server does); ``get`` raises whatever error a request finished with (any class
    ``sky.get`` can re-raise: see ``SERVER_ERRORS``); a server that went away raises what the real
    client raises: ``ApiServerConnectionError`` from calls that check the server's health first,
    ``requests.ConnectionError`` from ``get``/``api_status``/``api_cancel``/``api_info``.
    """

    real: Any
    requests: dict[str, dict[str, Any]] = field(default_factory=dict)
    clusters: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: list[tuple[str, Any]] = field(default_factory=list)
    launch_error: BaseException | None = None
    endpoints_by_cluster: dict[str, str] = field(default_factory=dict)
    unreachable: bool = False
    status_hangs: bool = False  # cluster status requests never finish (a stuck cloud refresh)
    cancelled: list[str] = field(default_factory=list)
    jobs: dict[tuple[str, int], str] = field(default_factory=dict)  # (cluster, job id) → JobStatus value
    job_logs: dict[tuple[str, int], str] = field(default_factory=dict)
    enabled: list[str] = field(default_factory=lambda: ["AWS"])
    version: str = "0.14.1"
    default_user: str = "worker-a"  # the hash a worker without SKYPILOT_USER_ID gets

    def __post_init__(self) -> None:
        # ``sky.client.sdk.enabled_clouds`` exists; a top-level ``sky.enabled_clouds`` does not.
        self.client = SimpleNamespace(sdk=SimpleNamespace(enabled_clouds=self._enabled_clouds))

    # --- what the tests script --------------------------------------------------------------
    def finish(self, request_id: str, *, result: Any = None, error: BaseException | None = None) -> None:
        req = self.requests[request_id]
        req.update(status="FAILED" if error else "SUCCEEDED", result=result, error=error)
        if req["kind"] == "launch" and not error:
            # A launch onto a stopped cluster starts it again (same cloud/zone) and keeps its record.
            self.clusters[req["cluster"]] = {
                **self.clusters.get(req["cluster"], {}),
                "name": req["cluster"],
                "status": self.real.ClusterStatus.UP,
                "launched_at": self.clusters.get(req["cluster"], {}).get("launched_at", req["at"]),
                "user_hash": req["user"],
                "use_spot": req.get("use_spot", False),
            }
            job_id = self.real_job_id(result)
            if job_id is not None:
                self.jobs.setdefault((req["cluster"], job_id), "SETTING_UP")
        if req["kind"] == "down" and not error:
            self.clusters.pop(req["cluster"], None)
        if req["kind"] == "stop" and not error:
            self.clusters[req["cluster"]]["status"] = self.real.ClusterStatus.STOPPED

    @staticmethod
    def real_job_id(result: Any) -> int | None:
        return result[0] if isinstance(result, tuple) and result and isinstance(result[0], int) else None

    def last(self, kind: str) -> str:
        return [rid for rid, r in self.requests.items() if r["kind"] == kind][-1]

    def caller(self) -> str:
        return os.environ.get("SKYPILOT_USER_ID") or self.default_user

    def _check(self, dotted: str, *args: Any, **kwargs: Any) -> None:
        inspect.signature(_real_function(self.real, dotted)).bind(*args, **kwargs)
        self.calls.append((dotted, kwargs if not args else (args, kwargs)))

    def _gone(self, *, health_checked: bool) -> None:
        if not self.unreachable:
            return
        if health_checked:
            raise self.real.exceptions.ApiServerConnectionError("http://skypilot.test:46580")
        import requests

        raise requests.exceptions.ConnectionError(
            "HTTPConnectionPool(host='skypilot.test', port=46580): Max retries exceeded with url: /api/get "
            "(Caused by NewConnectionError('Failed to establish a new connection: [Errno 111] Connection refused'))"
        )

    def _new(self, kind: str, cluster: str | None = None, **extra: Any) -> str:
        self._gone(health_checked=True)
        rid = f"req-{len(self.requests) + 1}"
        self.requests[rid] = {
            "kind": kind,
            "cluster": cluster,
            "status": "RUNNING",
            "at": 1_000_000.0,
            "user": self.caller(),
            **extra,
        }
        return rid

    def _finished_with(self, result: Any) -> str:
        rid = self._new("other")
        self.finish(rid, result=result)
        return rid

    # --- the SDK surface apps.fleet.sky uses --------------------------------------------------
    @property
    def Task(self) -> Any:  # noqa: N802 - mirrors sky.Task
        return self.real.Task

    @property
    def exceptions(self) -> Any:
        return self.real.exceptions

    @property
    def StatusRefreshMode(self) -> Any:  # noqa: N802
        return self.real.StatusRefreshMode

    def launch(self, task: Any, *args: Any, **kwargs: Any) -> str:
        self._check("launch", task, *args, **kwargs)
        self.calls[-1] = ("launch", {"task": task, **kwargs})
        self._gone(health_checked=True)
        if self.launch_error is not None:
            raise self.launch_error
        return self._new("launch", kwargs.get("cluster_name"), use_spot=any(r.use_spot for r in task.resources))

    def api_status(self, *args: Any, **kwargs: Any) -> list[Any]:
        self._check("api_status", *args, **kwargs)
        self._gone(health_checked=False)
        from sky.server.requests.payloads import RequestPayload

        request_ids = args[0] if args else kwargs.get("request_ids")
        return [
            RequestPayload(
                request_id=rid,
                name=self.requests[rid]["kind"],
                entrypoint="",
                request_body="",
                status=self.requests[rid]["status"],
                created_at=self.requests[rid]["at"],
                user_id=self.requests[rid]["user"],
                return_value="",
                error="",
                pid=None,
                schedule_type="short",
                cluster_name=self.requests[rid]["cluster"],
            )
            for rid in request_ids
            if rid in self.requests
        ]

    def api_cancel(self, *args: Any, **kwargs: Any) -> str:
        self._check("api_cancel", *args, **kwargs)
        self._gone(health_checked=False)
        request_ids = args[0] if args else kwargs.get("request_ids")
        for rid in [request_ids] if isinstance(request_ids, str) else request_ids:
            self.cancelled.append(rid)
            self.requests[rid]["status"] = "CANCELLED"
        return self._new("other")

    def api_info(self) -> Any:
        self._check("api_info")
        self._gone(health_checked=False)
        from sky.schemas.api.responses import APIHealthResponse

        return APIHealthResponse(status="healthy", api_version="62", version=self.version, commit="0" * 40)

    def get(self, *args: Any, **kwargs: Any) -> Any:
        self._check("get", *args, **kwargs)
        self._gone(health_checked=False)
        request_id = args[0] if args else kwargs["request_id"]
        req = self.requests.get(request_id)
        if req is None:
            raise RuntimeError(f"Failed to get request {request_id}: 404 Request {request_id!r} not found")
        if req["status"] not in {"SUCCEEDED", "FAILED", "CANCELLED"}:
            raise AssertionError("sky.get on an unfinished request would block the worker")
        if req["status"] == "CANCELLED":
            raise self.real.exceptions.RequestCancelled(
                f"Current {req['kind']!r} request ({request_id}) is cancelled by another process."
            )
        if req.get("error") is not None:
            raise req["error"]
        return req.get("result")

    def status(self, *args: Any, **kwargs: Any) -> str:
        self._check("status", *args, **kwargs)
        self._gone(health_checked=True)
        from sky.schemas.api.responses import StatusResponse

        names = kwargs.get("cluster_names", args[0] if args else None)
        caller, everyone = self.caller(), kwargs.get("all_users", False)
        rid = self._new("status")
        visible = [
            c
            for n, c in self.clusters.items()
            if (names is None or n in names) and (everyone or c.get("user_hash", self.default_user) == caller)
        ]
        if not self.status_hangs:
            self.finish(
                rid,
                result=[
                    StatusResponse(
                        name=c["name"],
                        launched_at=int(c["launched_at"]),
                        status=c["status"],
                        autostop=-1,
                        to_down=False,
                        cluster_hash="0" * 8,
                        cluster_ever_up=True,
                        user_hash=c.get("user_hash", self.default_user),
                        user_name="crosslogic",
                        workspace="default",
                        is_managed=False,
                        nodes=1,
                    )
                    for c in visible
                ],
            )
        return rid

    def endpoints(self, *args: Any, **kwargs: Any) -> str:
        self._check("endpoints", *args, **kwargs)
        cluster = args[0] if args else kwargs["cluster"]
        port = args[1] if len(args) > 1 else kwargs.get("port")
        rid = self._new("endpoints", cluster)
        if cluster not in self.clusters:  # what 0.14.1 answers for a cluster that does not exist
            self.finish(rid, error=self.real.exceptions.ClusterNotUpError(f"Cluster {cluster!r} not found."))
        else:
            self.finish(rid, result={port: self.endpoints_by_cluster.get(cluster, "203.0.113.7:8000")})
        return rid

    def job_status(self, *args: Any, **kwargs: Any) -> str:
        self._check("job_status", *args, **kwargs)
        cluster = args[0] if args else kwargs["cluster_name"]
        job_ids = args[1] if len(args) > 1 else kwargs.get("job_ids")
        rid = self._new("job_status", cluster)
        if cluster not in self.clusters:
            self.finish(rid, error=self.real.exceptions.ClusterDoesNotExist(f"Cluster {cluster!r} does not exist."))
        elif job_ids is None:  # the cluster's latest job, or {None: None} when it has none
            latest = max((j for c, j in self.jobs if c == cluster), default=None)
            status = self.jobs.get((cluster, latest)) if latest is not None else None
            self.finish(rid, result={latest: None if status is None else self.real.JobStatus(status)})
        else:
            statuses = {j: self.jobs.get((cluster, j)) for j in job_ids}
            self.finish(rid, result={j: None if s is None else self.real.JobStatus(s) for j, s in statuses.items()})
        return rid

    def tail_logs(self, *args: Any, **kwargs: Any) -> int:
        self._check("tail_logs", *args, **kwargs)
        self._gone(health_checked=True)
        cluster, job_id = args[0], args[1]
        if cluster not in self.clusters:
            raise self.real.exceptions.ClusterDoesNotExist(f"Cluster {cluster!r} does not exist.")
        lines = self.job_logs.get((cluster, job_id), "").splitlines()
        tail = kwargs.get("tail", 0)
        kwargs["output_stream"].write("\n".join(lines[-tail:] if tail else lines) + "\n")
        return 100 if self.jobs.get((cluster, job_id), "").startswith("FAILED") else 0

    def down(self, *args: Any, **kwargs: Any) -> str:
        self._check("down", *args, **kwargs)
        cluster_name = args[0] if args else kwargs["cluster_name"]
        self.calls[-1] = ("down", cluster_name)
        rid = self._new("down", cluster_name)
        if cluster_name not in self.clusters:  # the server's answer, raised by sky.get
            self.finish(
                rid, error=self.real.exceptions.ClusterDoesNotExist(f"Cluster {cluster_name!r} does not exist.")
            )
        return rid

    def stop(self, *args: Any, **kwargs: Any) -> str:
        """sky.stop: the request fails as the real server's does (sky/core.py): ClusterDoesNotExist
        for an unknown cluster, NotSupportedError for a spot cluster (every cloud but GCP)."""
        self._check("stop", *args, **kwargs)
        cluster_name = args[0] if args else kwargs["cluster_name"]
        self.calls[-1] = ("stop", cluster_name)
        rid = self._new("stop", cluster_name)
        cluster = self.clusters.get(cluster_name)
        if cluster is None:
            self.finish(
                rid, error=self.real.exceptions.ClusterDoesNotExist(f"Cluster {cluster_name!r} does not exist.")
            )
        elif cluster.get("use_spot"):
            self.finish(
                rid,
                error=self.real.exceptions.NotSupportedError(
                    "Stopping spot instances is currently not supported on AWS"
                ),
            )
        return rid

    def _enabled_clouds(self, *args: Any, **kwargs: Any) -> str:
        self._check("client.sdk.enabled_clouds", *args, **kwargs)
        return self._finished_with(list(self.enabled))


@pytest.fixture(scope="session")
def real_sky():
    import sky

    return sky


@pytest.fixture
def fake_sky(monkeypatch, settings, real_sky) -> FakeSky:
    from apps.fleet import sky as fleet_sky

    settings.SKYPILOT_API_SERVER_ENDPOINT = "http://skypilot.test:46580"
    # Tests run with DEBUG off, like production: nodes need their own read-only R2 token.
    settings.R2_NODE_ACCESS_KEY_ID, settings.R2_NODE_SECRET_ACCESS_KEY = "node-ro-key", "node-ro-secret"
    for name in (
        "SKYPILOT_API_SERVER_ENDPOINT",
        "SKYPILOT_USER_ID",
        "SKYPILOT_SERVICE_ACCOUNT_TOKEN",
        "SKYPILOT_DISABLE_LOCAL_API_SERVER",
    ):
        monkeypatch.delenv(name, raising=False)  # apps.fleet.sky sets them; restored after the test
    fake = FakeSky(real=real_sky)
    monkeypatch.setattr(fleet_sky, "_sdk", lambda: fake)
    return fake


@pytest.fixture
def served_model(db):
    from apps.catalog.services import model_create

    return model_create(
        name="llama-3-8b-instruct",
        hf_repo="meta-llama/Meta-Llama-3-8B-Instruct",
        storage_uri="s3://crosslogic-weights/models/llama-3-8b-instruct",
        total_bytes=16_060_522_240,
        dtype="bfloat16",
        max_model_len=8192,
        tensor_parallel_size=1,
        gpu_memory_utilization=0.92,
        accelerator="L4:1",
        extra_vllm_args=["--enable-prefix-caching", "--chat-template", "{{ x }} 'q' $HOME"],
        max_replicas=5,
    )
