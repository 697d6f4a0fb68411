"""``manage.py simulate_vllm``: a fake vLLM OpenAI server for development, tests and benchmarks
(docs/simulator.md). A thin wrapper: the simulator is the Django-free package ``vllm_sim``
(``python -m vllm_sim`` takes the same flags)."""

from __future__ import annotations

from argparse import ArgumentParser

from django.conf import settings
from django.core.management.base import BaseCommand, CommandError

from vllm_sim import cli as simulator_cli


class Command(BaseCommand):
    help = (
        "Serve a simulated vLLM OpenAI server (a dev/test instrument): /health, /metrics, /v1/models, "
        "/v1/chat/completions, /v1/completions, /v1/embeddings and the simulator-only /sim/stats."
    )
    requires_system_checks: list[str] = []  # starts fast; it touches no database

    def add_arguments(self, parser: ArgumentParser) -> None:
        simulator_cli.add_arguments(parser)
        # /version answers the release the fleet installs on real nodes.
        parser.set_defaults(vllm_version=settings.VLLM_VERSION)

    def handle(self, *args: object, **opts: object) -> None:
        try:
            config = simulator_cli.config_from_options(opts)
        except ValueError as exc:
            raise CommandError(str(exc)) from None
        try:
            simulator_cli.run(config)
        except OSError as exc:
            raise CommandError(f"cannot listen on {config.host}:{config.port}: {exc}") from exc
