"""A vLLM OpenAI-server simulator: a development and test instrument, never a production part.

It needs no Django: ``python -m vllm_sim --port 0 --model NAME`` serves it (``manage.py
simulate_vllm`` is the same command for the project's operators). Modules: ``server`` (the aiohttp
app), ``requests`` (validation, as vLLM validates), ``text`` (the bytes it answers), ``pacer``
(token timing), ``process`` (run it as a child process from tests), ``cli`` (the flags).
"""

from vllm_sim.process import SimHandle, run_simulator_process
from vllm_sim.server import SimConfig, SimServer, simulator_server

__all__ = ["SimConfig", "SimHandle", "SimServer", "run_simulator_process", "simulator_server"]
