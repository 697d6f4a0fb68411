"""``python -m vllm_sim --port 0 --model NAME ...``: see ``python -m vllm_sim --help``."""

from vllm_sim.cli import main

main()
