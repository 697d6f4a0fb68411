"""Fleet fixtures. SkyPilot is the one boundary that cannot run here: ``fake_sky`` replaces the SDK
at apps.fleet.sky._sdk with a scripted API server, while sky.Task and sky.exceptions stay real."""

from __future__ import annotations

from dataclasses import dataclass, field
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


@dataclass
class _Payload:
    request_id: str
    status: Any  # sky's RequestStatus


@dataclass
class FakeSky:
    """A SkyPilot API server in memory: requests finish when the test says so."""

    real: Any
    requests: dict[str, dict[str, Any]] = field(default_factory=dict)
    clusters: dict[str, dict[str, Any]] = field(default_factory=dict)
    calls: list[tuple[str, Any]] = field(default_factory=list)
    launch_error: BaseException | None = None
    endpoints_by_cluster: dict[str, str] = field(default_factory=dict)
    unreachable: bool = False
    status_hangs: bool = False  # cluster status requests never finish (a stuck cloud refresh)
    cancelled: list[str] = field(default_factory=list)

    # --- what the tests script --------------------------------------------------------------
    def finish(self, request_id: str, *, result: Any = None, error: BaseException | None = None) -> None:
        req = self.requests[request_id]
        req.update(status="FAILED" if error else "SUCCEEDED", result=result, error=error)
        if req["kind"] == "launch" and not error:
            self.clusters[req["cluster"]] = {"name": req["cluster"], "status": self.real.ClusterStatus.UP,
                                             "launched_at": req["at"]}
        if req["kind"] == "down" and not error:
            self.clusters.pop(req["cluster"], None)

    def last(self, kind: str) -> str:
        return [rid for rid, r in self.requests.items() if r["kind"] == kind][-1]

    def _new(self, kind: str, cluster: str | None = None, **extra: Any) -> str:
        if self.unreachable:
            raise self.real.exceptions.ApiServerConnectionError("http://skypilot.test:46580")
        rid = f"req-{len(self.requests) + 1}"
        self.requests[rid] = {"kind": kind, "cluster": cluster, "status": "RUNNING", "at": 1_000_000.0, **extra}
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

    def launch(self, task: Any, cluster_name: str, **kwargs: Any) -> str:
        self.calls.append(("launch", {"task": task, "cluster_name": cluster_name, **kwargs}))
        if self.launch_error is not None:
            raise self.launch_error
        return self._new("launch", cluster_name)

    def api_status(self, request_ids: list[str]) -> list[_Payload]:
        if self.unreachable:
            raise self.real.exceptions.ApiServerConnectionError("http://skypilot.test:46580")
        # The real SDK's payloads carry a RequestStatus enum, not a string.
        from sky.server.requests.requests import RequestStatus

        return [_Payload(rid, RequestStatus(self.requests[rid]["status"])) for rid in request_ids
                if rid in self.requests]

    def api_cancel(self, request_ids: str | list[str]) -> str:
        for rid in [request_ids] if isinstance(request_ids, str) else request_ids:
            self.cancelled.append(rid)
            self.requests[rid]["status"] = "CANCELLED"
        return self._new("other")

    def get(self, request_id: str) -> Any:
        req = self.requests[request_id]
        if req["status"] not in {"SUCCEEDED", "FAILED"}:
            raise AssertionError("sky.get on an unfinished request would block the worker")
        if req.get("error") is not None:
            raise req["error"]
        return req.get("result")

    def status(self, cluster_names: list[str] | None = None, refresh: Any = None) -> str:
        self.calls.append(("status", cluster_names))
        names = cluster_names if cluster_names is not None else list(self.clusters)
        rid = self._new("status")
        if not self.status_hangs:
            self.finish(rid, result=[dict(self.clusters[n]) for n in names if n in self.clusters])
        return rid

    def endpoints(self, cluster: str, port: int) -> str:
        rid = self._new("endpoints", cluster)
        if cluster not in self.clusters:
            self.finish(rid, error=self.real.exceptions.ClusterDoesNotExist(f"{cluster} does not exist"))
        else:
            self.finish(rid, result={port: self.endpoints_by_cluster.get(cluster, "203.0.113.7:8000")})
        return rid

    def down(self, cluster_name: str) -> str:
        self.calls.append(("down", cluster_name))
        if cluster_name not in self.clusters:
            raise self.real.exceptions.ClusterDoesNotExist(f"Cluster {cluster_name!r} does not exist.")
        return self._new("down", cluster_name)


@pytest.fixture(scope="session")
def real_sky():
    import sky

    return sky


@pytest.fixture
def fake_sky(monkeypatch, settings, real_sky) -> FakeSky:
    from apps.fleet import sky as fleet_sky

    settings.SKYPILOT_API_SERVER_ENDPOINT = "http://skypilot.test:46580"
    fake = FakeSky(real=real_sky)
    monkeypatch.setattr(fleet_sky, "_sdk", lambda: fake)
    return fake


@pytest.fixture
def served_model(db):
    from apps.catalog.services import model_create

    return model_create(
        name="llama-3-8b-instruct", hf_repo="meta-llama/Meta-Llama-3-8B-Instruct",
        storage_uri="s3://crosslogic-weights/models/llama-3-8b-instruct", total_bytes=16_060_522_240,
        dtype="bfloat16", max_model_len=8192, tensor_parallel_size=1, gpu_memory_utilization=0.92,
        accelerator="L4:1", extra_vllm_args=["--enable-prefix-caching", "--chat-template", "{{ x }} 'q' $HOME"],
        max_replicas=5,
    )
