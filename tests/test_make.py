"""`make test`'s service discovery (scripts/test.sh + scripts/services.sh), run for real.

The standard ports are made unreachable through CROSSLOGIC_PG_PORT / CROSSLOGIC_REDIS_PORT, so
these tests exercise the fallbacks without touching the shared PostgreSQL and Redis.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import tempfile
from pathlib import Path

import pytest
from django.conf import settings
from django.db import connection

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


@pytest.mark.slow
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
