"""``manage.py simulate_vllm``: a fake vLLM OpenAI server for development, tests and benchmarks."""

from __future__ import annotations

import asyncio
import sys
from argparse import ArgumentParser

from django.core.management.base import BaseCommand, CommandError

from apps.gateway.simulator import SimConfig, serve_forever


def _fraction(value: str) -> float:
    number = float(value)
    if not 0.0 <= number <= 1.0:
        raise ValueError(value)
    return number


class Command(BaseCommand):
    help = ("Serve a simulated vLLM OpenAI server (a dev/test instrument): /health, /metrics, /v1/models, "
            "/v1/chat/completions, /v1/completions, /v1/embeddings and the simulator-only /sim/stats.")
    requires_system_checks: list[str] = []  # starts fast; it touches no database

    def add_arguments(self, parser: ArgumentParser) -> None:
        parser.add_argument("--port", type=int, required=True, help="TCP port; 0 picks a free one (printed).")
        parser.add_argument("--host", default="127.0.0.1")
        parser.add_argument("--model", required=True, help="The served model name.")
        parser.add_argument("--ttft-ms", type=float, default=50.0, help="Delay before the first token.")
        parser.add_argument("--itl-ms", type=float, default=20.0, help="Delay between tokens.")
        parser.add_argument("--api-key", default=None, help="Require `Authorization: Bearer KEY` on /v1/*.")
        parser.add_argument("--max-tokens-default", type=int, default=64,
                            help="Answer length when a request sets no max_tokens (finish_reason 'stop').")
        parser.add_argument("--max-model-len", type=int, default=4096)
        parser.add_argument("--fail-rate", type=_fraction, default=0.0,
                            help="Fraction of POST /v1/* requests answered 500 before any byte.")
        parser.add_argument("--die-after-tokens", type=int, default=None,
                            help="Cut every response's connection after N tokens (no [DONE]).")
        parser.add_argument("--die-exits-process", action="store_true",
                            help="With --die-after-tokens: the whole process exits (status 17) instead.")
        parser.add_argument("--startup-delay-s", type=float, default=0.0,
                            help="Simulated weight loading: nothing listens until it is over (like vLLM).")
        parser.add_argument("--max-num-seqs", type=int, default=256,
                            help="Concurrent generations; the rest wait (vllm:num_requests_waiting).")
        parser.add_argument("--kv-cache-tokens", type=int, default=65536,
                            help="KV cache capacity in tokens, for vllm:kv_cache_usage_perc.")
        parser.add_argument("--embedding-dim", type=int, default=16)
        parser.add_argument("--seed", type=int, default=None, help="Seed for --fail-rate's random draws.")

    def handle(self, *args: object, **opts: object) -> None:
        for name in ("port", "max_tokens_default", "max_model_len", "max_num_seqs", "kv_cache_tokens",
                     "embedding_dim"):
            minimum = 0 if name == "port" else 1
            if not isinstance(opts[name], int) or opts[name] < minimum or opts[name] > 2**31:  # type: ignore[operator]
                raise CommandError(f"--{name.replace('_', '-')} must be an integer >= {minimum}.")
        if opts["port"] > 65535:  # type: ignore[operator]
            raise CommandError("--port must be at most 65535.")
        for name in ("ttft_ms", "itl_ms", "startup_delay_s"):
            if opts[name] < 0:  # type: ignore[operator]
                raise CommandError(f"--{name.replace('_', '-')} must not be negative.")
        if opts["die_after_tokens"] is not None and opts["die_after_tokens"] < 0:  # type: ignore[operator]
            raise CommandError("--die-after-tokens must not be negative.")
        config = SimConfig(
            model=opts["model"], host=opts["host"], port=opts["port"], ttft_ms=opts["ttft_ms"],  # type: ignore[arg-type]
            itl_ms=opts["itl_ms"], api_key=opts["api_key"] or None,  # type: ignore[arg-type]
            max_tokens_default=opts["max_tokens_default"], max_model_len=opts["max_model_len"],  # type: ignore[arg-type]
            fail_rate=opts["fail_rate"], die_after_tokens=opts["die_after_tokens"],  # type: ignore[arg-type]
            die_exits_process=opts["die_exits_process"], startup_delay_s=opts["startup_delay_s"],  # type: ignore[arg-type]
            max_num_seqs=opts["max_num_seqs"], kv_cache_tokens=opts["kv_cache_tokens"],  # type: ignore[arg-type]
            embedding_dim=opts["embedding_dim"], seed=opts["seed"],  # type: ignore[arg-type]
        )

        def announce(line: str) -> None:
            # The first line on stdout is parsed by run_simulator_process(): keep its format.
            sys.stdout.write(line + "\n")
            sys.stdout.flush()

        try:
            import uvloop
        except ImportError:  # pragma: no cover - uvloop is in requirements; plain asyncio still works
            uvloop = None
        try:
            with asyncio.Runner(loop_factory=uvloop.new_event_loop if uvloop else None) as runner:
                runner.run(serve_forever(config, announce))
        except OSError as exc:
            raise CommandError(f"cannot listen on {config.host}:{config.port}: {exc}") from exc
