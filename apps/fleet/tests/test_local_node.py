"""The local launcher's node side (run_local_node) and process handling, with real processes."""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from django.conf import settings
from django.core.management import CommandError, call_command

from apps.fleet.launchers.base import Secrets
from apps.fleet.launchers.local import LocalLauncher
from apps.fleet.services import node_create

pytestmark = pytest.mark.slow


def _running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def test_run_local_node_needs_its_token(monkeypatch) -> None:
    monkeypatch.delenv("CROSSLOGIC_REGISTRATION_TOKEN", raising=False)
    with pytest.raises(CommandError, match="CROSSLOGIC_REGISTRATION_TOKEN"):
        call_command("run_local_node", "--node-id", "1", "--model", "m")


@pytest.mark.django_db(transaction=True)
def test_a_refused_registration_stops_the_node_and_its_simulator(live_server) -> None:
    env = {
        **os.environ,
        "CROSSLOGIC_REGISTRATION_TOKEN": "clr_" + "x" * 48,
        "VLLM_API_KEY": "vk-test",
        "CROSSLOGIC_CONTROL_PLANE_URL": live_server.url,
    }
    proc = subprocess.run(
        [sys.executable, "manage.py", "run_local_node", "--node-id", "1", "--model", "m", "--timeout-s", "30"],
        cwd=settings.BASE_DIR,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0
    assert "registration refused (401)" in proc.stderr + proc.stdout
    assert "simulate_vllm listening" in proc.stdout


@pytest.mark.django_db
def test_local_launch_runs_a_detached_node_and_terminate_kills_its_process_group(catalog_model, settings) -> None:
    settings.CONTROL_PLANE_URL = "http://127.0.0.1:9"  # nobody answers: the node keeps retrying
    node = node_create(model=catalog_model, launcher="local")
    launcher = LocalLauncher()
    state = launcher.launch(node, Secrets(registration_token="clr_" + "y" * 48, vllm_api_key="vk-test"))
    node.launcher_state = state
    pid = state["pid"]
    try:
        assert launcher.exists(node) is True and _running(pid)
        assert b"vk-test" not in Path(f"/proc/{pid}/cmdline").read_bytes()  # secrets stay out of `ps`
        deadline = time.monotonic() + 30
        while not Path(f"/proc/{pid}/task/{pid}/children").read_text().split() and time.monotonic() < deadline:
            time.sleep(0.1)
        (child,) = [int(c) for c in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
        assert _running(child)
        assert b"vk-test" not in Path(f"/proc/{child}/cmdline").read_bytes()  # nor on the simulator's

        assert launcher.terminate(node) is True
        assert launcher.exists(node) is False and not _running(pid)
        deadline = time.monotonic() + 5
        while _running(child) and time.monotonic() < deadline:  # reparented to init, then reaped
            time.sleep(0.05)
        assert not _running(child)
        assert launcher.terminate(node) is True  # idempotent
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, 9)
