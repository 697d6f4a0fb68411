"""Local launcher: the whole node lifecycle on this machine, for development and tests.

It starts ``manage.py run_local_node`` (the node side: it runs the vLLM simulator, waits for
/health and registers with the control plane, exactly like the SkyPilot run script) as a
detached process group, so it outlives the Celery task that started it. Secrets travel in the
child's environment, never on its command line.
"""

from __future__ import annotations

import contextlib
import os
import shlex
import signal
import subprocess
import sys
import time
from pathlib import Path

from django.conf import settings

from apps.fleet.launchers.base import Launcher, LaunchError, Secrets
from apps.fleet.models import Node

TERM_GRACE_S = 5.0


def log_dir() -> Path:
    path = Path(settings.VAR_DIR) / "fleet"
    path.mkdir(parents=True, exist_ok=True)
    return path


def command(node: Node) -> list[str]:
    return [
        sys.executable,
        "manage.py",
        "run_local_node",
        "--node-id",
        str(node.pk),
        "--model",
        node.model.name,
        "--startup-delay-s",
        str(settings.FLEET_LOCAL_STARTUP_DELAY_S),
    ]


def _alive(pid: int, node_id: int | None = None) -> bool:
    try:
        waited, _ = os.waitpid(pid, os.WNOHANG)  # reap it if it is our own child
        if waited == pid:
            return False
    except ChildProcessError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except (FileNotFoundError, ProcessLookupError):
        return False
    if stat.rsplit(")", 1)[-1].split()[0] == "Z":
        return False
    # A recycled pid belongs to someone else: only our own node process counts.
    return "run_local_node" in cmdline and (node_id is None or f"--node-id {node_id} " in cmdline + " ")


def _gone(pid: int) -> bool:
    """After we signalled our own process: has it fully exited? (An exiting process loses its
    cmdline before it leaves /proc, so _alive() would call it gone too early.)"""
    try:
        if os.waitpid(pid, os.WNOHANG)[0] == pid:
            return True
    except ChildProcessError:
        pass
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return True
    return state in {"Z", "X"}


class LocalLauncher(Launcher):
    name = "local"

    def preview(self, node: Node) -> str:
        cmd = shlex.join(command(node)).replace("--node-id None", "--node-id <new>")
        return (
            f"# cwd: {settings.BASE_DIR}\n"
            "# env: CROSSLOGIC_REGISTRATION_TOKEN=<redacted> VLLM_API_KEY=<redacted>\n"
            f"#      CROSSLOGIC_CONTROL_PLANE_URL={settings.CONTROL_PLANE_URL}\n"
            f"{cmd}\n"
            "# runs `python -m vllm_sim --port 0` (the simulator), waits for /health, then registers\n"
        )

    def launch(self, node: Node, secrets: Secrets) -> dict[str, object]:
        log_path = log_dir() / f"node-{node.pk}.log"
        env = {
            **os.environ,
            "CROSSLOGIC_REGISTRATION_TOKEN": secrets.registration_token,
            "VLLM_API_KEY": secrets.vllm_api_key,
            "CROSSLOGIC_CONTROL_PLANE_URL": settings.CONTROL_PLANE_URL,
        }
        try:
            with open(log_path, "ab") as log:
                proc = subprocess.Popen(
                    command(node),
                    cwd=settings.BASE_DIR,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
        except OSError as exc:
            raise LaunchError(f"could not start the local node: {exc}") from exc
        return {"pid": proc.pid, "log": str(log_path)}

    def terminate(self, node: Node) -> bool:
        pid = node.launcher_state.get("pid")
        if not isinstance(pid, int):
            return True
        if not _alive(pid, node.pk):
            # The node process is gone; its simulator child may linger in the process group.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pid, signal.SIGKILL)
            return True
        try:
            os.killpg(pid, signal.SIGTERM)
            os.killpg(pid, signal.SIGCONT)  # a paused (warm) node only sees its SIGTERM once resumed
        except ProcessLookupError:
            return True
        deadline = time.monotonic() + TERM_GRACE_S
        while time.monotonic() < deadline:
            if _gone(pid):
                return True
            time.sleep(0.1)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(pid, signal.SIGKILL)
        deadline = time.monotonic() + 2.0
        while not _gone(pid) and time.monotonic() < deadline:
            time.sleep(0.05)
        return True

    def exists(self, node: Node) -> bool | None:
        pid = node.launcher_state.get("pid")
        if not isinstance(pid, int):
            return False
        return _alive(pid, node.pk)

    # Warm pool: the node's whole process group (run_local_node and its simulator) is paused, the
    # closest a laptop gets to a stopped VM: no CPU, memory kept, resumed in milliseconds.
    restarts_in_place = True

    def can_stop(self, node: Node) -> bool:
        return True

    def stop(self, node: Node) -> bool:
        pid = node.launcher_state.get("pid")
        if not isinstance(pid, int) or not _alive(pid, node.pk):
            raise LaunchError("the local node process is gone")
        try:
            os.killpg(pid, signal.SIGSTOP)
        except ProcessLookupError as exc:
            raise LaunchError("the local node process is gone") from exc
        deadline = time.monotonic() + 2.0
        while _state(pid) != "T" and time.monotonic() < deadline:
            time.sleep(0.02)
        return _state(pid) == "T"

    def resume(self, node: Node) -> None:
        pid = node.launcher_state.get("pid")
        if not isinstance(pid, int) or not _alive(pid, node.pk):
            raise LaunchError("the paused local node process is gone")
        try:
            os.killpg(pid, signal.SIGCONT)
        except ProcessLookupError as exc:
            raise LaunchError("the paused local node process is gone") from exc


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[-1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return ""
