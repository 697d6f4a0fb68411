"""The two commands, run for real: `make run` (scripts/run.sh) and `make test`'s service
discovery (scripts/test.sh + scripts/services.sh).

For `make test` the standard ports are made unreachable through CROSSLOGIC_PG_PORT /
CROSSLOGIC_REDIS_PORT, so the fallbacks run without touching the shared PostgreSQL and Redis.
`make run` runs with its development defaults (SQLite, filesystem broker) in a temporary var/.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

pytestmark = pytest.mark.slow  # starts scripts/test.sh and scripts/run.sh, as subprocesses

ROOT = Path(__file__).resolve().parent.parent
INNER_TEST = "tests/test_make.py::test_suite_talks_to_real_postgresql_and_redis"


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # nothing listens once the socket is closed


def _env(**overrides: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in {"DATABASE_URL", "REDIS_URL", "PYTEST_ADDOPTS"}}
    env.update(CROSSLOGIC_PG_PORT=str(_closed_port()), CROSSLOGIC_REDIS_PORT=str(_closed_port()))
    env.update(overrides)
    return env


def _run_test_sh(*args: str, env: dict[str, str], timeout: float = 180) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", "scripts/test.sh", *args], cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout
    )


@pytest.mark.django_db
def test_suite_talks_to_real_postgresql_and_redis():
    assert connection.vendor == "postgresql"
    with connection.cursor() as cursor:
        cursor.execute("SELECT 1")
        assert cursor.fetchone() == (1,)

    import redis

    assert redis.Redis.from_url(settings.REDIS_URL, socket_connect_timeout=2).ping() is True


@pytest.mark.skipif(
    not (shutil.which("redis-server") and (shutil.which("initdb") or list(Path("/usr/lib/postgresql").glob("*/bin")))),
    reason="needs PostgreSQL and Redis server binaries installed",
)
def test_throwaway_servers_are_started_when_none_is_reachable_and_removed_after():
    # A folder every user can enter: as root the throwaway PostgreSQL runs as an unprivileged user.
    tmp = Path(tempfile.mkdtemp(prefix="crosslogic-make-test-", dir="/tmp"))
    tmp.chmod(0o755)
    try:
        result = _run_test_sh(INNER_TEST, "-q", "-p", "no:cacheprovider", env=_env(TMPDIR=str(tmp)))
        output = result.stdout + result.stderr
        assert result.returncode == 0, output
        assert "started a throwaway PostgreSQL" in output
        assert "started a throwaway Redis" in output
        assert "1 passed" in output
        # Both servers were stopped and their folders deleted when the script exited.
        assert list(tmp.iterdir()) == []
        ps = subprocess.run(["ps", "-eo", "args"], capture_output=True, text=True, check=True).stdout
        assert str(tmp) not in ps
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def test_missing_postgresql_stops_with_a_message_naming_what_to_install(tmp_path):
    empty = tmp_path / "no-binaries"
    empty.mkdir()
    result = _run_test_sh(INNER_TEST, env=_env(CROSSLOGIC_PG_BINDIR=str(empty)), timeout=30)
    assert result.returncode == 2
    assert "apt-get install postgresql" in result.stderr
    assert "DATABASE_URL" in result.stderr


def test_missing_redis_stops_with_a_message_naming_what_to_install(tmp_path):
    env = _env(CROSSLOGIC_REDIS_SERVER=str(tmp_path / "redis-server"))
    env["DATABASE_URL"] = os.environ["DATABASE_URL"]  # PostgreSQL is found; Redis is not
    result = _run_test_sh(INNER_TEST, env=env, timeout=30)
    assert result.returncode == 2
    assert "apt-get install redis-server" in result.stderr
    assert "REDIS_URL" in result.stderr


def test_a_run_that_collects_no_test_fails():
    env = _env(DATABASE_URL=os.environ["DATABASE_URL"], REDIS_URL=os.environ["REDIS_URL"])
    result = _run_test_sh(INNER_TEST, "-k", "no_test_has_this_name", "-p", "no:cacheprovider", env=env, timeout=60)
    assert result.returncode == 1
    assert "collected no tests" in result.stderr


def _processes_with_env(marker: str) -> list[int]:
    """Pids whose environment holds marker: every descendant of run.sh, detached ones included."""
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if marker.encode() in (entry / "environ").read_bytes():
                    pids.append(int(entry.name))
            except OSError:
                continue  # gone, or not ours to read
    return pids


def _get(url: str, **headers: str) -> tuple[int, bytes]:
    request = urllib.request.Request(url, headers=headers)  # noqa: S310 - loopback only
    with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310 - loopback only
        return response.status, response.read()


def test_make_run_serves_admin_and_api_and_ctrl_c_stops_every_process(tmp_path):
    port = _closed_port()
    var_dir = tmp_path / "var"
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": os.environ.get("HOME", "/tmp"),
        "CROSSLOGIC_ENV_FILE": "",
        "CROSSLOGIC_VAR_DIR": str(var_dir),  # also marks every process this run starts
        "PORT": str(port),
    }
    log_path = tmp_path / "run.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            ["bash", "scripts/run.sh"],
            cwd=ROOT,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            # As a terminal would have it: a pytest started in the background (`cmd &` from a
            # script) ignores SIGINT and its children inherit that, and bash cannot trap a signal
            # ignored at entry, so Ctrl-C would never reach run.sh's cleanup.
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
    try:
        deadline = time.monotonic() + 180
        while "CrossLogic is running" not in log_path.read_text(errors="replace"):
            assert proc.poll() is None, log_path.read_text(errors="replace")
            assert time.monotonic() < deadline, log_path.read_text(errors="replace")
            time.sleep(0.5)
        output = log_path.read_text(errors="replace")
        assert f"http://127.0.0.1:{port}/admin/" in output
        assert "admin (password: admin)" in output
        key = re.findall(r"^\s*(clk_\w+)\s*$", output, flags=re.MULTILINE)[-1]

        assert _get(f"http://127.0.0.1:{port}/admin/login/")[0] == 200
        assert _get(f"http://127.0.0.1:{port}/api/docs/")[0] == 200
        status, body = _get(f"http://127.0.0.1:{port}/v1/models", Authorization=f"Bearer {key}")
        assert status == 200
        assert "demo-llama" in [model["id"] for model in json.loads(body)["data"]]
        assert (var_dir / "db.sqlite3").is_file()  # the development defaults: SQLite under var/
        assert (var_dir / "broker" / "control").is_dir()  # and the filesystem broker, all of it under var/
        assert _processes_with_env(str(var_dir))

        os.killpg(proc.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
        proc.wait(timeout=120)
        output = log_path.read_text(errors="replace")
        assert "run: stopped" in output, output
        assert _processes_with_env(str(var_dir)) == [], output
    finally:
        for pid in _processes_with_env(str(var_dir)):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
