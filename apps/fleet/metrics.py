"""A small parser for the Prometheus text format, enough to read vLLM's /metrics.

Comments and unknown lines are skipped; label values may hold spaces, braces and escaped quotes;
values may be NaN or ±Inf (ignored when summing). Samples of one metric are summed over labels
(vLLM reports one series per engine/model).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

RUNNING = "vllm:num_requests_running"
WAITING = "vllm:num_requests_waiting"
KV_CACHE = "vllm:kv_cache_usage_perc"
KV_CACHE_OLD = "vllm:gpu_cache_usage_perc"  # the name before vLLM 0.10
WANTED = frozenset({RUNNING, WAITING, KV_CACHE, KV_CACHE_OLD})


@dataclass(frozen=True)
class NodeLoad:
    running: int | None
    waiting: int | None
    kv_cache_usage: float | None  # 0..1, mean over engines


def _split_sample(line: str) -> tuple[str, str] | None:
    """(metric name, rest after the labels) or None for a malformed line."""
    brace = line.find("{")
    space = line.find(" ")
    if brace == -1 or (space != -1 and space < brace):
        if space == -1:
            return None
        return line[:space], line[space + 1 :]
    name = line[:brace]
    i, in_quotes = brace + 1, False
    while i < len(line):
        ch = line[i]
        if in_quotes:
            if ch == "\\":
                i += 1
            elif ch == '"':
                in_quotes = False
        elif ch == '"':
            in_quotes = True
        elif ch == "}":
            return name, line[i + 1 :]
        i += 1
    return None


def parse_samples(text: str, wanted: frozenset[str] = WANTED) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {}
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        split = _split_sample(line)
        if split is None:
            continue
        name, rest = split
        if name not in wanted:
            continue
        fields = rest.split()
        if not fields:
            continue
        try:
            value = float(fields[0])  # accepts NaN, +Inf, -Inf, 1e3
        except ValueError:
            continue
        samples.setdefault(name, []).append(value)
    return samples


def _finite(values: list[float]) -> list[float]:
    return [v for v in values if math.isfinite(v)]


def parse_vllm_load(text: str) -> NodeLoad:
    samples = parse_samples(text)
    running = _finite(samples.get(RUNNING, []))
    waiting = _finite(samples.get(WAITING, []))
    kv = _finite(samples.get(KV_CACHE, []) or samples.get(KV_CACHE_OLD, []))
    return NodeLoad(
        running=max(0, round(sum(running))) if running else None,
        waiting=max(0, round(sum(waiting))) if waiting else None,
        kv_cache_usage=min(1.0, max(0.0, sum(kv) / len(kv))) if kv else None,
    )
