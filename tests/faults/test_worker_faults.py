"""Fault injection on the background side (issue #11): a Celery worker killed with SIGKILL in the
middle of an upload to R2 (the upload resumes and the bucket ends byte-exact), and Celery beat
started twice (no double launches, no double health passes). Real worker and beat processes on
the test database and the test Redis; R2 is moto's S3 server behind the R2-faithful front.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

from apps.catalog import storage
from apps.catalog.enqueue import upload_enqueue
from apps.catalog.models import UploadStatus, WeightUpload
from apps.catalog.services import model_create
from apps.catalog.tests.conftest import make_model_folder
from apps.catalog.transfer import MANIFEST_NAME
from apps.catalog.uploads import upload_request
from apps.fleet.models import Node

pytestmark = [pytest.mark.django_db(transaction=True), pytest.mark.slow]

CELERY = Path(settings.BASE_DIR) / ".venv" / "bin" / "celery"


def _wait(what: str, predicate: Callable[[], object], timeout_s: float = 60.0, logs: Sequence[Path] = ()) -> object:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    tails = "\n".join(f"--- {log.name} ---\n{log.read_text()[-3000:]}" for log in logs if log.exists())
    pytest.fail(f"timed out waiting for {what}\n{tails}")


def _base_env(**extra: str) -> dict[str, str]:
    db = connection.settings_dict
    return {
        **os.environ,
        "DATABASE_URL": f"postgres://{db['USER']}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}",
        "REDIS_URL": settings.REDIS_URL,
        "CELERY_BROKER_URL": settings.REDIS_URL,
        "DJANGO_SETTINGS_MODULE": "crosslogic.settings",
        "DB_CONN_MAX_AGE": "0",
        **extra,
    }


@contextmanager
def celery(args: list[str], env: dict[str, str], log: Path) -> Iterator[subprocess.Popen]:
    """``celery -A crosslogic <args>`` in its own session; stopped (TERM, then KILL) on the way out."""
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [str(CELERY), "-A", "crosslogic", *args],
            cwd=settings.BASE_DIR,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    try:
        yield proc
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)


WORKER = ["worker", "--pool=solo", "--loglevel=INFO", "--without-mingle", "--without-gossip", "--without-heartbeat"]


# --- (e) a worker killed with -9 in the middle of an upload --------------------------------------


def _r2_env() -> dict[str, str]:
    """The r2 fixture's settings, for the worker process."""
    names = (
        "R2_ENDPOINT_URL",
        "R2_CA_BUNDLE",
        "R2_REGION",
        "R2_ACCESS_KEY_ID",
        "R2_SECRET_ACCESS_KEY",
        "R2_BUCKET",
        "R2_MULTIPART_THRESHOLD_MB",
        "R2_MULTIPART_CHUNK_MB",
        "R2_MAX_ATTEMPTS",
        "R2_CONNECT_TIMEOUT_S",
        "R2_READ_TIMEOUT_S",
        "UPLOAD_FILE_RETRIES",
        "UPLOAD_WORK_DIR",
    )
    return {name: str(getattr(settings, name)) for name in names}


def _sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_a_worker_killed_mid_upload_resumes_and_the_bucket_ends_byte_exact(
    r2, r2_front, redis_db, settings, tmp_path
) -> None:
    settings.UPLOAD_STALE_AFTER_S = 1  # a silent attempt counts as dead after 1 s (default 600)
    folder = make_model_folder(tmp_path / "model", big=40 * 1024 * 1024)  # 8 parts of 5 MB
    model = model_create(name="faults-upload")
    # One file and one part at a time, progress often: the kill lands inside the multipart upload.
    env = _base_env(**_r2_env(), UPLOAD_PROGRESS_INTERVAL_S="0.05", UPLOAD_FILES_IN_FLIGHT="1", R2_MAX_CONCURRENCY="1")
    logs = [tmp_path / "worker-1.log", tmp_path / "worker-2.log"]
    big = "model-00001-of-00002.safetensors"

    with celery(WORKER, env, logs[0]) as first:
        killed = upload_request(model=model, local_dir=str(folder))
        upload_enqueue(upload=killed)
        _wait(
            "the worker to be inside the big file's multipart upload",
            lambda: WeightUpload.objects.filter(
                pk=killed.pk, status=UploadStatus.UPLOADING, current_file=big, bytes_done__gt=12 * 1024 * 1024
            ).exists(),
            logs=logs,
        )
        os.killpg(first.pid, signal.SIGKILL)
        first.wait(10)

    prefix = killed.source["prefix"]
    landed = {o.key for o in storage.list_objects(r2, prefix + "/")}
    incomplete = storage.client().list_multipart_uploads(Bucket=r2, Prefix=prefix + "/").get("Uploads", [])
    assert f"{prefix}/{big}" not in landed and [u["Key"] for u in incomplete] == [f"{prefix}/{big}"]
    killed.refresh_from_db()
    assert killed.status == UploadStatus.UPLOADING  # nobody is left to say otherwise

    # Staff retry once the attempt has gone silent (the admin's "upload again" does this).
    time.sleep(settings.UPLOAD_STALE_AFTER_S + 0.2)
    r2_front.reset()
    with celery(WORKER, env, logs[1]):
        retry = upload_request(model=model, local_dir=str(folder))
        upload_enqueue(upload=retry)
        _wait(
            "the retried upload to finish",
            lambda: WeightUpload.objects.filter(pk=retry.pk, status=UploadStatus.UPLOADED).exists(),
            logs=logs,
        )

    killed.refresh_from_db()
    assert killed.status == UploadStatus.FAILED and "silent" in killed.error
    # Resumed: what had landed before the kill was not sent again.
    assert landed and not (set(r2_front.writes) & {f"/{r2}/{key}" for key in landed}), r2_front.writes
    # Byte-exact: every file vLLM needs, with the local bytes, plus the manifest; nothing else, and
    # no multipart upload left behind (the killed one was aborted).
    wanted = {p.name for p in folder.iterdir() if p.name != "README.md"}
    objects = {o.key.removeprefix(prefix + "/") for o in storage.list_objects(r2, prefix + "/")}
    assert objects == wanted | {MANIFEST_NAME}
    for name in wanted:
        assert _sha(storage.get_bytes(r2, f"{prefix}/{name}")) == _sha((folder / name).read_bytes()), name
    assert storage.client().list_multipart_uploads(Bucket=r2, Prefix=prefix + "/").get("Uploads", []) == []


# --- (f) beat started twice ------------------------------------------------------------------------


class HealthCounter:
    """A node endpoint that answers every GET 200 and counts them by path (health passes)."""

    def __init__(self) -> None:
        self.hits: Counter[str] = Counter()
        counter = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                counter.hits[self.path] += 1
                body = b"{}" if self.path.startswith("/v1/") else b""
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, daemon=True, name="health-counter").start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


SENDING = re.compile(r"Sending due task (fleet: [a-z ]+?) \(")


def _sent(log: Path) -> Counter[str]:
    return Counter(SENDING.findall(log.read_text())) if log.exists() else Counter()


def test_beat_started_twice_sends_each_pass_once(live_server, redis_db, tmp_path) -> None:
    from django_celery_beat.models import IntervalSchedule, PeriodicTask

    from apps.gateway.tests.conftest import ready_node

    every, _ = IntervalSchedule.objects.get_or_create(every=1, period=IntervalSchedule.SECONDS)
    # The rows migration fleet.0003 creates, every second (an earlier transactional test may have
    # emptied the table). Expiry above the interval: a loaded machine's worker may be seconds late.
    for name, task in (
        ("fleet: health checks", "apps.fleet.periodic.fleet_health_check"),
        ("fleet: reconcile", "apps.fleet.periodic.fleet_reconcile"),
    ):
        PeriodicTask.objects.update_or_create(
            name=name, defaults={"task": task, "interval": every, "expire_seconds": 10, "enabled": True}
        )
    counter = HealthCounter()
    watched = model_create(name="faults-watched")
    ready_node(watched, counter.url)
    launched = model_create(name="faults-launched", min_replicas=1, max_replicas=1)
    env = _base_env(
        BEAT_LEASE_S="3",
        CONTROL_PLANE_URL=live_server.url,
        FLEET_DEFAULT_LAUNCHER="local",
        FLEET_LAUNCH_POLL_S="1",
        FLEET_LOCAL_STARTUP_DELAY_S="0.3",
    )
    beat_args = ["beat", "--loglevel=INFO", "--max-interval", "1"]
    logs = {name: tmp_path / f"{name}.log" for name in ("worker", "beat-1", "beat-2")}
    try:
        with (
            celery(WORKER, env, logs["worker"]),
            celery(beat_args, env, logs["beat-1"]) as first,
            celery(beat_args, env, logs["beat-2"]) as second,
        ):
            # Both beats up, one of them the leader and the other standing by.
            _wait(
                "one beat to lead and the other to stand by",
                lambda: (
                    sum("holds the beat lease" in logs[b].read_text() for b in ("beat-1", "beat-2")) == 1
                    and sum("standing by" in logs[b].read_text() for b in ("beat-1", "beat-2")) == 1
                ),
                timeout_s=60,
                logs=list(logs.values()),
            )
            first_leads = "holds the beat lease" in logs["beat-1"].read_text()
            leader = first if first_leads else second
            leader_log, standby_log = (
                (logs["beat-1"], logs["beat-2"]) if first_leads else (logs["beat-2"], logs["beat-1"])
            )
            _wait("a health pass", lambda: counter.hits["/health"] > 0, timeout_s=60, logs=list(logs.values()))
            sent0, hits0, t0 = _sent(leader_log), counter.hits["/health"], time.monotonic()
            time.sleep(8)
            sent1, hits1, elapsed = _sent(leader_log), counter.hits["/health"], time.monotonic() - t0
            assert _sent(standby_log) == Counter(), "the standby beat sent tasks"
            health_sent = sent1["fleet: health checks"] - sent0["fleet: health checks"]
            # Once a second, from one beat: not twice as often (two beats would send ~2 x elapsed).
            assert health_sent <= elapsed + 2, (health_sent, elapsed)
            assert hits1 - hits0 >= 2  # and the passes ran

            # The leader dies: the standby takes over within the lease.
            os.killpg(leader.pid, signal.SIGKILL)
            leader.wait(10)
            _wait(
                "the standby to take over",
                lambda: _sent(standby_log)["fleet: health checks"] >= 2,
                timeout_s=3 + 15,
                logs=list(logs.values()),
            )
            nodes = list(Node.objects.filter(model=launched))
            # Each pass checks the node once: never more checks than passes sent, by both beats together.
            sends = _sent(logs["beat-1"])["fleet: health checks"] + _sent(logs["beat-2"])["fleet: health checks"]
            assert counter.hits["/health"] <= sends, (counter.hits["/health"], sends)
    finally:
        counter.close()
        for node in Node.objects.filter(model=launched):  # never leave a node process behind
            pid = node.launcher_state.get("pid")
            if isinstance(pid, int):
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(pid, signal.SIGKILL)
    # The reconciler ran every second from one beat and then the other: one launch, not two.
    assert len(nodes) == 1, [(n.pk, n.status) for n in nodes]
