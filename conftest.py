"""Project-wide fixtures. Tests run against a real PostgreSQL and a real Redis (see Makefile)."""

from __future__ import annotations

import multiprocessing.process
import socket
import subprocess
import sys
from collections.abc import Iterator
from types import FrameType

import pytest
from django.conf import settings


def pytest_configure(config: pytest.Config) -> None:
    _install_spawn_guard()
    engine = settings.DATABASES["default"]["ENGINE"]
    if "postgresql" not in engine and not config.getoption("--allow-sqlite", default=False):
        raise pytest.UsageError(
            "The suite runs against PostgreSQL: set DATABASE_URL=postgres://… or use `make test`, "
            "which finds or starts one."
        )


def pytest_report_header(config: pytest.Config) -> str:
    """Which test database and Redis database this run uses (crosslogic/settings_test.py picks them)."""
    redis_where = settings.REDIS_URL.rsplit("@", 1)[-1] or "none (REDIS_URL is unset)"
    database = settings.DATABASES["default"]["TEST"]["NAME"] or "SQLite in memory"
    return f"test database: {database}; Redis: {redis_where}"


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption(
        "--allow-sqlite",
        action="store_true",
        help="Run against SQLite, the embedded default of `make run` (CI runs the fast tier this way too).",
    )


# The fast tier (`make test-fast`, -m "not slow") stays fast only if every test that starts a
# process or a server is marked slow. Rather than trusting review, a test not marked slow that
# spawns a process (subprocess, asyncio subprocesses, multiprocessing) or listens on a socket
# (uvicorn, aiohttp, moto, http.server) fails, naming what it started. Session fixtures are
# covered too: they are set up inside the first test's setup that asks for them.
class _SpawnGuard:
    def __init__(self) -> None:
        self.test: str | None = None  # nodeid of the running test that is not marked slow
        self.violations: list[str] = []

    def check(self, what: str) -> None:
        if self.test is not None:
            message = (
                f"{self.test} {what} but is not marked slow: add @pytest.mark.slow (or a module "
                "pytestmark) so `make test-fast` stays fast"
            )
            self.violations.append(message)
            raise RuntimeError(message)


_guard = _SpawnGuard()


def _called_from_ctypes_util() -> bool:
    """ctypes.util.find_library runs `ldconfig -p` when a library looks up a shared object (the
    schema view does, through an import): a detail of the import, not a process the test starts."""
    frame: FrameType | None = sys._getframe(2)
    while frame is not None:
        if frame.f_code.co_filename.endswith(("ctypes/util.py", "ctypes\\util.py")):
            return True
        frame = frame.f_back
    return False


def _install_spawn_guard() -> None:
    execute_child = subprocess.Popen._execute_child  # type: ignore[attr-defined]  # private, untyped in typeshed
    listen = socket.socket.listen
    start = multiprocessing.process.BaseProcess.start

    def guarded_execute_child(self, args, *rest, **kwargs):
        if not _called_from_ctypes_util():
            _guard.check(f"starts a process ({args if isinstance(args, str) else ' '.join(map(str, args))[:80]})")
        return execute_child(self, args, *rest, **kwargs)

    def guarded_listen(self, *args):
        _guard.check(f"starts a server (listens on {self.getsockname()})")
        return listen(self, *args)

    def guarded_start(self):
        _guard.check("starts a multiprocessing process")
        return start(self)

    subprocess.Popen._execute_child = guarded_execute_child  # type: ignore[attr-defined]  # see above
    socket.socket.listen = guarded_listen  # type: ignore[method-assign]  # the guard wraps, same signature
    multiprocessing.process.BaseProcess.start = guarded_start  # type: ignore[method-assign]  # same


@pytest.hookimpl(wrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    _guard.test = None if item.get_closest_marker("slow") else item.nodeid
    _guard.violations = []
    try:
        return (yield)
    finally:
        _guard.test = None


def _fail_on_violations() -> None:
    """Fail with the guard's message: it also covers a process or server started in a thread
    (uvicorn), whose error would otherwise surface only as a start-up timeout."""
    if _guard.violations:
        violations, _guard.violations = _guard.violations, []
        pytest.fail("\n".join(dict.fromkeys(violations)), pytrace=False)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item: pytest.Item) -> Iterator[None]:
    try:
        return (yield)
    finally:
        _fail_on_violations()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_call(item: pytest.Item) -> Iterator[None]:
    try:
        return (yield)
    finally:
        _fail_on_violations()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    try:
        return (yield)
    finally:
        _fail_on_violations()


@pytest.fixture(autouse=True)
def _fresh_throttles():
    """Throttle counters live in the shared cache (Redis): no test inherits another's attempts."""
    from apps.core import redis as redis_lib

    client = redis_lib.client()
    if client is not None:
        for key in client.scan_iter("crosslogic:*:throttle_*"):
            client.delete(key)
    yield


@pytest.fixture
def tenant(db):
    from apps.tenancy.services import tenant_create

    return tenant_create(slug="acme", name="Acme Corp", contact_email="ops@acme.test")


@pytest.fixture
def catalog_model(db):
    from apps.catalog.services import model_create

    return model_create(
        name="llama-3-8b", hf_repo="meta-llama/Meta-Llama-3-8B-Instruct", storage_uri="s3://weights/llama-3-8b"
    )


@pytest.fixture
def api_key(tenant):
    """(ApiKey, raw key) with every scope."""
    from apps.tenancy.services import api_key_issue

    return api_key_issue(tenant=tenant, name="test", scopes=["inference", "usage:read", "keys:manage"])


@pytest.fixture
def node(catalog_model):
    from apps.fleet.services import node_create

    return node_create(model=catalog_model, launcher="static", endpoint_url="http://127.0.0.1:9")


@pytest.fixture
def redis_db():
    """The test Redis database, emptied before and after the test."""
    from apps.core import redis as redis_lib

    client = redis_lib.client()
    if client is None:
        pytest.fail("REDIS_URL is not set; `make test` sets it.")
    client.flushdb()
    yield client
    client.flushdb()
