"""The node side of the local launcher: what the SkyPilot run script does on a GPU machine.

Starts the vLLM simulator on a free port, waits for its /health, then registers with the control
plane (``POST /api/v1/nodes/register`` with the one-time token from CROSSLOGIC_REGISTRATION_TOKEN)
and stays in the foreground with the simulator: when the simulator dies, so does this process,
as a real node's job ends when vLLM exits. SIGTERM stops both.
"""

from __future__ import annotations

import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from datetime import UTC, datetime
from typing import Any

import httpx
from django.conf import settings
from django.core.management.base import BaseCommand, CommandError, CommandParser

LISTENING = re.compile(r"listening on (http://[^\s]+)")


class Command(BaseCommand):
    help = "Run a local vLLM simulator node that registers with the control plane (local launcher)."

    def add_arguments(self, parser: CommandParser) -> None:
        parser.add_argument("--node-id", type=int, required=True)
        parser.add_argument("--model", required=True, help="Served model name.")
        parser.add_argument("--startup-delay-s", type=float, default=0.0, help="Simulated weight loading.")
        parser.add_argument("--control-plane", default="", help="Default: CROSSLOGIC_CONTROL_PLANE_URL.")
        parser.add_argument("--timeout-s", type=float, default=120.0, help="Give up if not healthy by then.")

    def handle(self, *args: Any, **opts: Any) -> None:
        token = os.environ.get("CROSSLOGIC_REGISTRATION_TOKEN", "")
        if not token:
            raise CommandError("CROSSLOGIC_REGISTRATION_TOKEN is not set: the launcher passes it in the environment.")
        control_plane = (
            opts["control_plane"] or os.environ.get("CROSSLOGIC_CONTROL_PLANE_URL") or settings.CONTROL_PLANE_URL
        ).rstrip("/")
        started_at = time.time()
        cmd = [
            sys.executable,
            "-m",
            "vllm_sim",
            "--port",
            "0",
            "--model",
            opts["model"],
            "--startup-delay-s",
            str(opts["startup_delay_s"]),
            "--vllm-version",
            settings.VLLM_VERSION,
            # Capacity and timing of the simulated engine (the autoscaling benchmark sets them).
            *shlex.split(settings.FLEET_LOCAL_SIM_ARGS),
        ]
        if not os.environ.get("VLLM_API_KEY"):
            raise CommandError("VLLM_API_KEY is not set: the launcher passes the node's key in the environment.")
        # The simulator, like vLLM, reads VLLM_API_KEY from its environment: the key stays off `ps`.
        sim = subprocess.Popen(
            cmd,
            cwd=settings.BASE_DIR,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            bufsize=1,
        )
        signal.signal(signal.SIGTERM, lambda *_: self._stop(sim, 0))
        try:
            endpoint = self._wait_for_endpoint(sim, opts["timeout_s"])
            self.stdout.write(f"node {opts['node_id']}: simulator at {endpoint}")
            threading.Thread(target=self._relay, args=(sim,), daemon=True).start()
            healthy_at = self._wait_healthy(sim, endpoint, started_at + opts["timeout_s"])
            self._register(control_plane, token, endpoint, started_at, healthy_at)
        except CommandError:
            self._stop(sim, None)
            raise
        sys.exit(sim.wait())

    def _stop(self, sim: subprocess.Popen, code: int | None) -> None:
        if sim.poll() is None:
            sim.terminate()
            try:
                sim.wait(5)
            except subprocess.TimeoutExpired:
                sim.kill()
        if code is not None:
            sys.exit(code)

    def _wait_for_endpoint(self, sim: subprocess.Popen, timeout_s: float) -> str:
        deadline = time.monotonic() + timeout_s
        assert sim.stdout is not None
        for line in sim.stdout:
            self.stdout.write(line.rstrip())
            match = LISTENING.search(line)
            if match:
                return match.group(1).rstrip("/")
            if time.monotonic() > deadline:
                break
        raise CommandError(f"the simulator did not report its address (exit code {sim.poll()})")

    def _relay(self, sim: subprocess.Popen) -> None:
        assert sim.stdout is not None
        for line in sim.stdout:
            self.stdout.write(line.rstrip())

    def _wait_healthy(self, sim: subprocess.Popen, endpoint: str, deadline: float) -> float:
        with httpx.Client(timeout=2.0) as client:
            while time.time() < deadline:
                if sim.poll() is not None:
                    raise CommandError(f"the simulator exited with code {sim.returncode} before /health answered")
                try:
                    if client.get(f"{endpoint}/health").status_code == 200:
                        return time.time()
                except httpx.HTTPError:
                    pass
                time.sleep(0.2)
        raise CommandError("the simulator's /health did not answer in time")

    def _register(self, control_plane: str, token: str, endpoint: str, started_at: float, healthy_at: float) -> None:
        body = {
            "endpoint_url": endpoint,
            "provisioned_at": datetime.fromtimestamp(started_at, UTC).isoformat(),
            "weights_loaded_at": datetime.fromtimestamp(healthy_at, UTC).isoformat(),
            "health_ok": True,
        }
        delay = 0.5
        with httpx.Client(timeout=5.0) as client:
            for _ in range(60):
                try:
                    response = client.post(
                        f"{control_plane}/api/v1/nodes/register",
                        json=body,
                        headers={"Authorization": f"Bearer {token}"},
                    )
                except httpx.HTTPError as exc:
                    self.stderr.write(f"registration: {exc}; retrying")
                else:
                    if response.status_code < 300:
                        self.stdout.write("registered with the control plane")
                        return
                    if response.status_code < 500:
                        raise CommandError(f"registration refused ({response.status_code}): {response.text[:300]}")
                    self.stderr.write(f"registration: HTTP {response.status_code}; retrying")
                time.sleep(delay)
                delay = min(delay * 2, 10.0)
        raise CommandError("could not reach the control plane to register")
