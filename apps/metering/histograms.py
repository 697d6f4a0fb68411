"""Fixed log-spaced histogram buckets for TTFT and latency, in milliseconds.

Why fixed buckets and not a sketch: counts over the same bounds add up, so an hour's histogram
plus the next hour's is exactly the histogram of both hours, and p50/p95/p99 over a day (or a
month, or a tenant's whole fleet) come from the merged counts with the same error bound as one
hour's. Ten buckets per decade (ratio 10^0.1 ≈ 1.259) from 1 ms to ~631 s.

NEVER change ``BOUNDS_MS`` in place: every stored rollup's counts are positional over these
bounds. A different layout needs new columns (or a version field) and a rebuild from raw records.
"""

from __future__ import annotations

import math
import operator
from bisect import bisect_left
from collections.abc import Iterable, Sequence

# Upper bounds (inclusive) of buckets 0..N-1; bucket N counts everything above the last bound.
# 10**(i/10) rounded to 3 decimals: 1, 1.259, 1.585, ..., 630957.344 ms.
BOUNDS_MS: tuple[float, ...] = tuple(round(10 ** (i / 10), 3) for i in range(0, 59))
BUCKETS = len(BOUNDS_MS) + 1
QUANTILES = (0.5, 0.95, 0.99)


def empty() -> list[int]:
    return [0] * BUCKETS


def bucket_of(value_ms: float) -> int:
    """Index of the bucket holding ``value_ms``: the first bound >= value (<= 1 ms is bucket 0)."""
    return bisect_left(BOUNDS_MS, value_ms)


def observe(counts: list[int], value_ms: float | None) -> None:
    if value_ms is None:
        return  # no TTFT for a request that failed before its first token, or not streamed
    counts[bucket_of(value_ms)] += 1


def from_values(values: Iterable[float | None]) -> list[int]:
    counts = empty()
    for value in values:
        observe(counts, value)
    return counts


def merge(into: list[int], other: Sequence[int] | None) -> list[int]:
    """Add ``other`` into ``into`` in place (and return it). A missing histogram adds nothing."""
    if not other:
        return into
    if len(other) != BUCKETS:
        raise ValueError(f"histogram has {len(other)} buckets, expected {BUCKETS}")
    into[:] = map(operator.add, into, other)  # ~3x a Python loop over the 60 buckets
    return into


def quantile(counts: Sequence[int], q: float) -> float | None:
    """The upper bound of the bucket holding the ceil(q·n)-th smallest value (n = total count).

    The true quantile lies in that bucket, so the answer is at most one bucket width (≤ 25.9%)
    above it and never below it. Values in the overflow bucket report the last bound. None when
    the histogram is empty.
    """
    total = sum(counts)
    if total == 0:
        return None
    rank = max(1, math.ceil(round(q * total, 9)))  # round: 0.95 * 100 must not become 95.000…01
    seen = 0
    for index, count in enumerate(counts):
        seen += count
        if seen >= rank:
            return BOUNDS_MS[min(index, len(BOUNDS_MS) - 1)]
    return BOUNDS_MS[-1]  # unreachable: seen reaches total >= rank


def percentiles(counts: Sequence[int]) -> dict[str, float | None]:
    """{"p50": ..., "p95": ..., "p99": ...} in ms."""
    return {f"p{round(q * 100)}": quantile(counts, q) for q in QUANTILES}
