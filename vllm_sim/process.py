"""Run the vLLM simulator as a child process (``python -m vllm_sim --port 0``) for tests and
benchmarks: start it, wait until ``/health`` answers, hand back its URL, kill it on exit."""

from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

ROOT = Path(__file__).resolve().parents[1]  # the directory holding the vllm_sim package
MANAGE_PY = ROOT / "manage.py"  # only for light=False: the project's Django wrapper
LISTENING = re.compile(r"^simulate_vllm listening on (http://\S+?):(\d+)\s*$")


def command_line(*, model: str, port: int = 0, light: bool = True, **options: object) -> list[str]:
    """``python -m vllm_sim`` arguments: ``ttft_ms=5`` → ``--ttft-ms 5``; True → a bare flag.

    ``light=False`` runs the same flags through ``manage.py simulate_vllm`` (the Django command
    wrapper), which costs Django's start-up (about 2 s of CPU per simulator on the dev machine).
    """
    entry = ["-m", "vllm_sim"] if light else [str(MANAGE_PY), "simulate_vllm"]
    args = [sys.executable, *entry, "--port", str(port), "--model", model]
    for name, value in options.items():
        if value is None or value is False:
            continue
        flag = "--" + name.replace("_", "-")
        args += [flag] if value is True else [flag, str(value)]
    return args


@dataclass
class SimHandle:
    url: str  # http://127.0.0.1:PORT
    port: int
    proc: subprocess.Popen
    model: str
    api_key: str | None = None
    output: deque[str] = field(default_factory=lambda: deque(maxlen=200))

    @property
    def base_url(self) -> str:
        """For the openai SDK: ``OpenAI(base_url=handle.base_url, api_key=...)``."""
        return self.url + "/v1"

    def stats(self) -> dict:
        """The simulator's ``/sim/stats`` counters (see docs/simulator.md)."""
        return httpx.get(self.url + "/sim/stats", timeout=5).json()

    async def astats(self) -> dict:
        async with httpx.AsyncClient(timeout=5) as client:
            return (await client.get(self.url + "/sim/stats")).json()

    def reset(self) -> None:
        httpx.post(self.url + "/sim/reset", timeout=5).raise_for_status()

    def set_faults(self, **faults: object) -> dict:
        """Change faults live: ``fail_rate``, ``die_after_tokens`` (None = never), ``health_status``."""
        response = httpx.post(self.url + "/sim/faults", json=faults, timeout=5)
        response.raise_for_status()
        return response.json()

    def wait_for(self, predicate: Callable[[dict], bool], *, timeout_s: float = 5.0, interval_s: float = 0.02) -> dict:
        """Poll ``stats()`` until ``predicate(stats)`` holds; return the stats, or raise TimeoutError."""
        deadline = time.monotonic() + timeout_s
        while True:
            stats = self.stats()
            if predicate(stats):
                return stats
            if time.monotonic() > deadline:
                raise TimeoutError(f"simulator stats never matched: {stats}")
            time.sleep(interval_s)

    def kill(self) -> None:
        """Abrupt death (SIGKILL), like a node that vanished."""
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=5)


def _pump(stream: IO[str], lines: queue.Queue, keep: deque[str]) -> None:
    # Drain the child's stdout for its whole life so it can never block on a full pipe.
    for line in stream:
        keep.append(line.rstrip("\n"))
        lines.put(line)
    lines.put(None)


def _wait_listening(proc: subprocess.Popen, lines: queue.Queue, keep: deque[str], timeout_s: float) -> tuple[str, int]:
    deadline = time.monotonic() + timeout_s
    while True:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise TimeoutError(f"simulate_vllm did not start within {timeout_s}s: {list(keep)[-10:]}")
        try:
            line = lines.get(timeout=remaining)
        except queue.Empty:
            continue
        if line is None:
            proc.wait(timeout=5)
            raise RuntimeError(f"simulate_vllm exited with {proc.returncode}: {list(keep)[-10:]}")
        match = LISTENING.match(line)
        if match:
            return match.group(1), int(match.group(2))


@contextmanager
def run_simulator_process(*, model: str = "sim-model", timeout_s: float = 30.0, **options: Any) -> Iterator[SimHandle]:
    """Start ``python -m vllm_sim --port 0 ...`` and yield a SimHandle once ``/health`` is 200.

    Options are the command's flags in snake_case: ``ttft_ms``, ``itl_ms``, ``api_key``,
    ``max_tokens_default``, ``fail_rate``, ``die_after_tokens``, ``die_exits_process``,
    ``startup_delay_s``, ``max_num_seqs``, ``port`` (default 0: any free port) ... and ``light=False``
    to go through ``manage.py simulate_vllm`` instead (see command_line()).
    """
    port = int(options.pop("port", 0))
    api_key = options.pop("api_key", None)
    args = command_line(model=model, port=port, **options)
    # The key goes by environment, as to vLLM: never on a command line, never inherited by accident.
    env = {k: v for k, v in os.environ.items() if k != "VLLM_API_KEY"}
    if api_key:
        env["VLLM_API_KEY"] = str(api_key)
    proc = subprocess.Popen(
        args, stdout=subprocess.PIPE, stdin=subprocess.DEVNULL, text=True, bufsize=1, cwd=ROOT, env=env
    )
    keep: deque[str] = deque(maxlen=200)
    lines: queue.Queue = queue.Queue()
    threading.Thread(target=_pump, args=(proc.stdout, lines, keep), daemon=True, name="simulate_vllm-stdout").start()
    handle = None
    try:
        host_url, bound = _wait_listening(proc, lines, keep, timeout_s)
        handle = SimHandle(url=f"{host_url}:{bound}", port=bound, proc=proc, model=model, api_key=api_key, output=keep)
        deadline = time.monotonic() + timeout_s
        while httpx.get(handle.url + "/health", timeout=2).status_code != 200:
            if time.monotonic() > deadline:
                raise TimeoutError("simulate_vllm never became healthy")
            time.sleep(0.05)
        yield handle
    finally:
        if proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(timeout=5)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(timeout=5)
