"""What bench/gateway_bench.py measures besides throughput: Redis commands per request (from a Redis
server of the bench's own, so other users of a shared Redis do not count) and the gateway's memory
per open stream (resident set size while N streams are open, minus before). Not a test."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def private_redis() -> Iterator[str | None]:
    """A throwaway redis-server (no persistence) on a free port: its INFO commandstats counts only
    the gateway's commands. Yields its URL, or None when no redis-server binary is installed."""
    binary = shutil.which("redis-server")
    if binary is None:
        yield None
        return
    port = _free_port()
    with tempfile.TemporaryDirectory(prefix="bench-redis-") as tmp:
        proc = subprocess.Popen(
            [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", tmp],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            stdin=subprocess.DEVNULL,
        )
        try:
            deadline = time.monotonic() + 10
            while True:
                with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.2):
                    break
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the bench's redis-server did not start")
                time.sleep(0.05)
            yield f"redis://127.0.0.1:{port}/0"
        finally:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def command_calls(redis_url: str | None) -> dict[str, int]:
    """INFO commandstats of the server: command name -> calls so far."""
    if redis_url is None:
        return {}
    import redis

    client = redis.Redis.from_url(redis_url)
    try:
        stats = client.info("commandstats")
    finally:
        client.close()
    return {name.removeprefix("cmdstat_"): int(v["calls"]) for name, v in stats.items()}


def calls_delta(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    # INFO itself is the bench's own command, not the gateway's.
    return {k: after[k] - before.get(k, 0) for k in after if k != "info" and after[k] - before.get(k, 0)}


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


class RssPeak:
    """Samples a process's RSS every 0.2 s in a thread while the ``with`` block runs."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(OSError):
                self.peak = max(self.peak, rss_bytes(self.pid))
            self._stop.wait(0.2)

    def __enter__(self) -> RssPeak:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()


def _per_request(r: dict) -> str:
    calls = r.get("redis_calls")
    if calls is None or not r["requests"]:
        return "n/a"
    scripts = calls.get("evalsha", 0) + calls.get("eval", 0)
    return f"{scripts / r['requests']:.2f} / {sum(calls.values()) / r['requests']:.1f}"


def render(results: dict) -> str:
    """The ``### Bursts, scale and costs`` part of the gateway section (issue #14's targets)."""
    from bench._gateway_report import pct, pool, req_s, tok_s

    lines = [
        "### Bursts, scale and costs",
        "",
        "Lockstep: every client starts at the same instant, and with streams of equal length all of them "
        "start their next request together — a burst of admissions at once, as real bursts arrive. Redis "
        "per request, from INFO commandstats of a redis-server of the bench's own over the gateway round, "
        "divided by the requests finished: script calls (EVALSHA: each is one round trip on the hot path) "
        "and operations (every command Redis ran, those inside the scripts and the background loops' "
        "included). Memory per open stream: the gateway's peak RSS during the round minus its RSS before "
        "it, divided by the streams (measured on a fresh, warmed-up gateway for the scale row).",
        "",
        "| setting | direct tok/s (req/s) | gateway | gateway ÷ direct | TTFT added p50 / p99 "
        "| Redis per request: script calls / operations | gateway memory per open stream | target |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def row(label: str, pairs: list, *, stream: bool, memory_level: int | None, target: str) -> None:
        d, g = pool([p[0] for p in pairs]), pool([p[1] for p in pairs])
        merged: dict[str, int] = {}
        for p in pairs:
            for k, v in (p[1].get("redis_calls") or {}).items():
                merged[k] = merged.get(k, 0) + v
        g["redis_calls"] = merged if any(p[1].get("redis_calls") is not None for p in pairs) else None
        rate_d, rate_g = (tok_s(d), tok_s(g)) if stream else (req_s(d), req_s(g))
        ratio = rate_g / rate_d if rate_d else float("nan")
        added = "—"
        if stream:
            p50 = pct(g["ttft_ms"], 0.5) - pct(d["ttft_ms"], 0.5)
            p99 = pct(g["ttft_ms"], 0.99) - pct(d["ttft_ms"], 0.99)
            added = f"{p50:+.1f} / {p99:+.1f} ms"
        memory = "—"
        if memory_level:
            grown = max(p[1]["rss_peak"] - p[1]["rss_before"] for p in pairs)
            memory = f"{grown / memory_level / 1024:.1f} KB"
        bad = sum(p[0]["bad"] + p[0]["errors"] + p[1]["bad"] + p[1]["errors"] for p in pairs)
        flag = f" — **{bad} bad or failed requests**" if bad else ""
        unit = "tok/s" if stream else "req/s"
        lines.append(
            f"| {label} | {rate_d:,.0f} {unit} | {rate_g:,.0f} | **{ratio:.3f}** | {added} | {_per_request(g)} "
            f"| {memory} | {target}{flag} |"
        )

    for level, pairs in results.get("burst", {}).items():
        row(
            f"{level} lockstep streams, 20 ms/token",
            pairs,
            stream=True,
            memory_level=None,
            target="≥ 0.99, ≤ +10 / +50 ms",
        )
    for level, pairs in results.get("scale", {}).items():
        row(f"{level} streams, 50 ms/token", pairs, stream=True, memory_level=level, target="≥ 0.97, ≤ 50 KB")
    for level, pairs in results.get("levels", {}).items():
        row(f"{level} streams (spread), 20 ms/token", pairs, stream=True, memory_level=None, target="")
    flat = results.get("flat", {})
    if flat:
        row("flat out, streamed", flat["saturation"], stream=True, memory_level=None, target="≥ 0.75")
        row("flat out, non-streamed", flat["nonstream"], stream=False, memory_level=None, target="≥ 0.75")
        rounds = [p[1] for p in flat["nonstream"] if p[1].get("redis_calls") is not None]
        requests = sum(r["requests"] for r in rounds)
        if rounds and requests:
            total: dict[str, int] = {}
            for r in rounds:
                for k, v in r["redis_calls"].items():
                    total[k] = total.get(k, 0) + v
            top = sorted(total.items(), key=lambda kv: -kv[1])[:8]
            lines += [
                "",
                "Redis operations per non-streamed request, flat out (inside scripts included): "
                + ", ".join(f"{name} {calls / requests:.2f}" for name, calls in top)
                + ".",
            ]
    lines.append("")
    return "\n".join(lines)
