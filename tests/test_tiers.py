"""The test tiers and per-run isolation: conftest.py's guard keeps processes and servers out of the
fast tier, and crosslogic/settings_test.py gives each run its own Redis database."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from collections.abc import Iterator

import pytest
import redis
from django.conf import settings
from django.core.exceptions import ImproperlyConfigured
from django.db import connection

from conftest import _guard
from crosslogic.settings_test import _LOCK_KEY, _LOCK_TTL_S, claim_index


def _refused(action) -> str:
    """Run ``action`` in this (unmarked) test; return the guard's message and forget the violation,
    which would otherwise fail this test after its call."""
    with pytest.raises(RuntimeError, match="is not marked slow") as refused:
        action()
    _guard.violations.clear()
    return str(refused.value)


def test_an_unmarked_test_may_not_start_a_process() -> None:
    message = _refused(lambda: subprocess.run(["true"], check=False))
    assert "test_an_unmarked_test_may_not_start_a_process starts a process (true)" in message


def test_an_unmarked_test_may_not_listen_on_a_socket() -> None:
    with socket.socket() as server:
        server.bind(("127.0.0.1", 0))
        assert "starts a server" in _refused(server.listen)


def test_the_suite_runs_with_the_test_settings() -> None:
    assert settings.PASSWORD_HASHERS == ["django.contrib.auth.hashers.MD5PasswordHasher"]
    # Its own test database: the pid of this run unless TEST_DB_SUFFIX was given (SQLite: in memory).
    expected = "test_crosslogic" + os.environ["TEST_DB_SUFFIX"] if connection.vendor == "postgresql" else None
    assert settings.DATABASES["default"]["TEST"]["NAME"] == expected


@pytest.fixture
def redis_server() -> Iterator[int]:
    """A redis-server of this test's own, with 4 databases: claims lock and empty databases."""
    if shutil.which("redis-server") is None:
        pytest.skip("needs the redis-server binary")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen(
        [
            "redis-server",
            "--port",
            str(port),
            "--bind",
            "127.0.0.1",
            "--save",
            "",
            "--appendonly",
            "no",
            "--databases",
            "4",
        ],
        stdout=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                redis.Redis(port=port).ping()
                break
            except redis.ConnectionError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        yield port
    finally:
        proc.terminate()
        proc.wait(10)


def _db(port: int, index: int) -> redis.Redis:
    return redis.Redis(port=port, db=index)


@pytest.mark.slow
def test_runs_claim_different_empty_databases_then_any_unlocked_one(redis_server: int) -> None:
    port = redis_server
    lock = _db(port, 0)
    _db(port, 1).set("someone-else", "explicit REDIS_URL=.../1, no lock")

    first = claim_index(lock, lambda i: _db(port, i), "run-a")
    second = claim_index(lock, lambda i: _db(port, i), "run-b")
    assert (first, second) == (2, 3)  # db 0 holds the locks; db 1 is in use, so skipped while others are free
    assert lock.get(_LOCK_KEY.format(index=2)) == b"run-a"
    assert 0 < lock.ttl(_LOCK_KEY.format(index=3)) <= _LOCK_TTL_S  # a killed run's lock expires

    # Every empty database is taken: a non-empty unlocked one (a killed run's leftovers) is emptied.
    third = claim_index(lock, lambda i: _db(port, i), "run-c")
    assert third == 1
    assert _db(port, 1).dbsize() == 0

    with pytest.raises(ImproperlyConfigured, match="all 3 Redis databases are held"):
        claim_index(lock, lambda i: _db(port, i), "run-d")
