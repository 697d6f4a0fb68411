"""What the browser tests need: Debian's chromium through Playwright (never Playwright's own
browser download), the real server (`python -m crosslogic.serve`) and a Celery worker on the test
database, a staff login, and a record of every console error a page logs."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

CHROMIUM = Path("/usr/bin/chromium")
ROOT = Path(__file__).resolve().parent.parent


def chromium_or_skip() -> Path:
    """Debian's chromium. Outside CI a machine without it skips, saying how to get it; in CI
    (.ci/run installs it) a missing browser fails, so the tier never passes by skipping."""
    if CHROMIUM.exists():
        return CHROMIUM
    if os.environ.get("CI"):
        pytest.fail(f"{CHROMIUM} is missing in CI: .ci/run should have installed Debian's chromium package")
    pytest.skip(f"browser tests need Debian's chromium at {CHROMIUM} (apt-get install chromium)")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def database_url() -> str:
    from django.db import connection

    db = connection.settings_dict
    password = f":{db['PASSWORD']}" if db.get("PASSWORD") else ""
    return f"postgres://{db['USER']}{password}@{db['HOST'] or '127.0.0.1'}:{db['PORT'] or 5432}/{db['NAME']}"


def _stop(proc: subprocess.Popen) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGTERM)
    try:
        proc.wait(15)
    except subprocess.TimeoutExpired:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(5)


@contextlib.contextmanager
def server(env: dict[str, str], port: int, log: Path) -> Iterator[str]:
    """`python -m crosslogic.serve` on ``port``; yields its base URL once /health answers."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "crosslogic.serve", "--port", str(port), "--log-level", "warning"],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(base + "/health", timeout=2).status_code == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"python -m crosslogic.serve did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield base
    finally:
        _stop(proc)


@contextlib.contextmanager
def worker(env: dict[str, str], log: Path) -> Iterator[Path]:
    """``celery worker --pool=solo`` (node launches and teardowns); yields its log file."""
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [
                str(ROOT / ".venv/bin/celery"),
                "-A",
                "crosslogic",
                "worker",
                "--pool=solo",
                "--loglevel=INFO",
                "--without-mingle",
                "--without-gossip",
                "--without-heartbeat",
            ],
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    try:
        yield log
    finally:
        _stop(proc)


def create_staff_user(username: str, password: str) -> Any:
    """A superuser. The servers started here inherit DJANGO_SETTINGS_MODULE (the test settings,
    fast password hashing included), so they check the password as this process hashed it."""
    from django.contrib.auth.models import User

    return User.objects.create_superuser(username, f"{username}@crosslogic.test", password)


@dataclass
class ConsoleErrors:
    """Console errors, uncaught exceptions and failed requests of every page in a context."""

    errors: list[str] = field(default_factory=list)

    def watch(self, context: Any) -> None:
        context.on("page", self._watch_page)
        for page in context.pages:
            self._watch_page(page)

    def _watch_page(self, page: Any) -> None:
        page.on("console", lambda m: self.errors.append(f"console {m.type}: {m.text}") if m.type == "error" else None)
        page.on("pageerror", lambda e: self.errors.append(f"uncaught: {e}"))
        page.on("requestfailed", lambda r: self.errors.append(f"request failed: {r.url} {r.failure}"))


def login(page: Any, base: str, username: str, password: str) -> None:
    page.goto(base + "/")  # the bare host leads to the admin's login page
    page.fill("#id_username", username)
    page.fill("#id_password", password)
    with page.expect_navigation():
        page.click("input[type=submit]")
    if "/admin/login/" in page.url:
        errors = page.locator(".errornote").all_inner_texts()
        raise AssertionError(f"login as {username} failed: {errors}")
