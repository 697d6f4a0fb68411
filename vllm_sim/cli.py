"""The simulator's command line: ``python -m vllm_sim`` (no Django; tests that start many simulators
on a small machine save Django's start-up) and ``manage.py simulate_vllm``, which reuses these flags."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys

from vllm_sim.server import VLLM_VERSION, SimConfig, serve_forever

LISTENING_PREFIX = "simulate_vllm listening on "


def _fraction(value: str) -> float:
    number = float(value)
    if not 0.0 <= number <= 1.0:
        raise ValueError(value)
    return number


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, required=True, help="TCP port; 0 picks a free one (printed).")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--model", required=True, help="The served model name.")
    parser.add_argument("--ttft-ms", type=float, default=50.0, help="Delay before the first token.")
    parser.add_argument("--itl-ms", type=float, default=20.0, help="Delay between tokens.")
    parser.add_argument(
        "--api-key",
        default=None,
        help="Require `Authorization: Bearer KEY` on /v1/*. Default: $VLLM_API_KEY, as vLLM "
        "(keeps the key off the process list).",
    )
    parser.add_argument(
        "--max-tokens-default",
        type=int,
        default=64,
        help="Answer length when a request sets no max_tokens (finish_reason 'stop').",
    )
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument(
        "--fail-rate", type=_fraction, default=0.0, help="Fraction of POST /v1/* requests answered 500 before any byte."
    )
    parser.add_argument(
        "--die-after-tokens", type=int, default=None, help="Cut every response's connection after N tokens (no [DONE])."
    )
    parser.add_argument(
        "--die-exits-process",
        action="store_true",
        help="With --die-after-tokens: the whole process exits (status 17) instead.",
    )
    parser.add_argument(
        "--startup-delay-s",
        type=float,
        default=0.0,
        help="Simulated weight loading: nothing listens until it is over (like vLLM).",
    )
    parser.add_argument(
        "--warm-start-delay-s",
        type=float,
        default=0.0,
        help="After SIGCONT (a paused node resumed: a warm restart), /health answers 503 this long.",
    )
    parser.add_argument(
        "--max-num-seqs",
        type=int,
        default=256,
        help="Concurrent generations; the rest wait (vllm:num_requests_waiting).",
    )
    parser.add_argument(
        "--kv-cache-tokens", type=int, default=65536, help="KV cache capacity in tokens, for vllm:kv_cache_usage_perc."
    )
    parser.add_argument("--embedding-dim", type=int, default=16)
    parser.add_argument("--seed", type=int, default=None, help="Seed for --fail-rate's random draws.")
    parser.add_argument(
        "--enable-auto-tool-choice",
        action="store_true",
        help="As vLLM: with --tool-call-parser, requests with `tools` may be answered with tool "
        'calls; without both, tool_choice "auto" (the default with tools) is a 400.',
    )
    parser.add_argument(
        "--tool-call-parser",
        default=None,
        help="As vLLM (hermes, llama3_json, mistral, ...): the simulator answers OpenAI tool_calls whatever the name.",
    )
    parser.add_argument("--vllm-version", default=VLLM_VERSION, help="What GET /version answers.")
    parser.add_argument(
        "--socket-send-buffer",
        type=int,
        default=None,
        help="Simulator only: SO_SNDBUF for streams, so tests can make a client fall behind.",
    )


def config_from_options(opts: dict) -> SimConfig:
    """Validate parsed options; a ValueError names the flag."""
    for name in ("port", "max_tokens_default", "max_model_len", "max_num_seqs", "kv_cache_tokens", "embedding_dim"):
        minimum = 0 if name == "port" else 1
        if not isinstance(opts[name], int) or not minimum <= opts[name] <= 2**31:
            raise ValueError(f"--{name.replace('_', '-')} must be an integer >= {minimum}.")
    if opts["port"] > 65535:
        raise ValueError("--port must be at most 65535.")
    for name in ("ttft_ms", "itl_ms", "startup_delay_s", "warm_start_delay_s"):
        if opts[name] < 0:
            raise ValueError(f"--{name.replace('_', '-')} must not be negative.")
    if opts["die_after_tokens"] is not None and opts["die_after_tokens"] < 0:
        raise ValueError("--die-after-tokens must not be negative.")
    if not opts["model"]:
        raise ValueError("--model must not be empty.")
    if opts.get("enable_auto_tool_choice") and not opts.get("tool_call_parser"):
        raise ValueError("--enable-auto-tool-choice requires --tool-call-parser (as vLLM refuses to start).")
    if opts.get("socket_send_buffer") is not None and opts["socket_send_buffer"] < 1:
        raise ValueError("--socket-send-buffer must be a positive number of bytes.")
    values = {name: opts[name] for name in SimConfig.__dataclass_fields__ if name in opts}
    values["api_key"] = opts.get("api_key") or os.environ.get("VLLM_API_KEY") or None
    return SimConfig(**values)


def run(config: SimConfig) -> None:
    """Serve until SIGTERM/SIGINT, announcing the bound URL as the first stdout line."""

    def announce(line: str) -> None:
        # run_simulator_process() parses this line: keep its format.
        sys.stdout.write(line + "\n")
        sys.stdout.flush()

    try:
        import uvloop

        loop_factory = uvloop.new_event_loop
    except ImportError:  # pragma: no cover - uvloop is in requirements; plain asyncio works too
        loop_factory = None
    with asyncio.Runner(loop_factory=loop_factory) as runner:
        runner.run(serve_forever(config, announce))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m vllm_sim", description=__doc__)
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        config = config_from_options(vars(args))
    except ValueError as exc:
        parser.error(str(exc))
    try:
        run(config)
    except OSError as exc:
        sys.exit(f"error: cannot listen on {config.host}:{config.port}: {exc}")


if __name__ == "__main__":
    main()
