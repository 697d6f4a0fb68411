"""``manage.py simulate_vllm`` is a thin wrapper over ``python -m vllm_sim`` (tested in vllm_sim/tests):
the same flags, the same server, errors as CommandError."""

from __future__ import annotations

import httpx
import pytest
from django.conf import settings
from django.core.management import CommandError, call_command

from vllm_sim import run_simulator_process
from vllm_sim.server import VLLM_VERSION


def test_the_command_rejects_bad_options_with_a_readable_error():
    with pytest.raises(CommandError, match="--port"):
        call_command("simulate_vllm", port=-1, model="sim-llama")
    with pytest.raises(CommandError, match="--itl-ms"):
        call_command("simulate_vllm", port=0, model="sim-llama", itl_ms=-5)


@pytest.mark.slow
def test_the_command_serves_the_simulator():
    with run_simulator_process(model="sim-llama", api_key="k", ttft_ms=1, itl_ms=0, light=False) as sim:
        assert "manage.py" in " ".join(sim.proc.args)
        version = httpx.get(sim.url + "/version", timeout=5).json()
        models = httpx.get(sim.base_url + "/models", headers={"Authorization": "Bearer k"}, timeout=5)
        reply = httpx.post(
            sim.base_url + "/completions",
            headers={"Authorization": "Bearer k"},
            timeout=5,
            json={"model": "sim-llama", "prompt": "hi", "max_tokens": 3},
        )

    assert [card["id"] for card in models.json()["data"]] == ["sim-llama"]
    assert version == {"version": settings.VLLM_VERSION}  # the release the fleet installs
    assert reply.status_code == 200 and reply.json()["usage"]["completion_tokens"] == 3


def test_the_simulator_follows_the_vllm_release_the_fleet_installs():
    # vllm_sim cannot read settings (no Django); its default must not drift from the pinned release.
    assert settings.VLLM_VERSION == VLLM_VERSION
