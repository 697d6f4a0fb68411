"""vllm_sim stands on its own: it imports no Django and nothing from the project's apps, so it runs
(``python -m vllm_sim``) where only aiohttp and httpx are installed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.slow  # runs python -m vllm_sim

# Import every module of the package in a fresh interpreter and list what got loaded.
PROBE = """
import json, pkgutil, importlib, sys
import vllm_sim
for info in pkgutil.walk_packages(vllm_sim.__path__, "vllm_sim."):
    if ".tests" not in info.name and not info.name.endswith("__main__"):  # __main__ would run
        importlib.import_module(info.name)
print(json.dumps(sorted(sys.modules)))
"""


def test_vllm_sim_imports_no_django_and_no_apps_module():
    env = {k: v for k, v in os.environ.items() if k != "DJANGO_SETTINGS_MODULE"}
    out = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60, check=True
    )
    loaded = json.loads(out.stdout)

    assert "vllm_sim.server" in loaded and "vllm_sim.cli" in loaded  # the probe really walked the package
    offenders = [m for m in loaded if m.split(".")[0] in ("django", "apps", "crosslogic", "rest_framework")]
    assert offenders == []


def test_python_dash_m_vllm_sim_shows_its_flags():
    out = subprocess.run(
        [sys.executable, "-m", "vllm_sim", "--help"], cwd=ROOT, capture_output=True, text=True, timeout=60, check=True
    )

    assert out.stdout.startswith("usage: python -m vllm_sim")
    assert "--itl-ms" in out.stdout and "--max-num-seqs" in out.stdout


def test_bad_flags_are_refused_with_a_readable_error():
    out = subprocess.run(
        [sys.executable, "-m", "vllm_sim", "--port", "0", "--model", "m", "--itl-ms", "-5"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )

    assert out.returncode == 2 and "--itl-ms must not be negative" in out.stderr
