"""The bursty day of bench/autoscale_bench.py, the time scales, the SkyServe-style QPS policy's
decision rule, and the summary statistics. Pure functions: no Django, no processes. Not a test.

The day (hours 0-24, compressed into ``duration`` seconds):
- a diurnal ramp: lowest at 04:00 (8% of the day's peak), highest at 16:00;
- a quiet hour, 03:00-04:00, with no request at all;
- two bursts of 5x the diurnal rate, 10:00-11:00 and 15:00-16:00 (the second is the day's peak).

Two clocks: the day is compressed by 86400 / duration (144x for 10 minutes), while every
infrastructure and control-plane delay (cold start 45 s, warm start 7 s, SkyServe's 300 s / 1200 s
delays, our windows) is divided by ``infra`` (7.5 for 10 minutes: a 6 s cold start). Local nodes
cannot start faster than a few seconds here, so relative to the traffic the infrastructure is
slower than in reality (a burst lasts ~4 cold starts instead of ~80): harder for every policy.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass, field

QUIET_HOURS = (3.0, 4.0)
BURSTS = ((10.0, 11.0), (15.0, 16.0))
BURST_FACTOR = 5.0
# What the real systems use, before scaling (seconds).
COLD_START_S = 45.0
WARM_START_S = 7.0
SKYSERVE_UPSCALE_DELAY_S = 300.0
SKYSERVE_DOWNSCALE_DELAY_S = 1200.0
SKYSERVE_DECISION_INTERVAL_S = 20.0
SKYSERVE_QPS_WINDOW_S = 60.0


@dataclass(frozen=True)
class Scale:
    duration_s: float

    @property
    def day_factor(self) -> float:
        return 86400.0 / self.duration_s

    @property
    def infra(self) -> float:
        """Real seconds per bench second for delays: 45 s of cold start become 6 s in 10 minutes."""
        return 7.5 * 600.0 / self.duration_s

    def delay(self, real_s: float) -> float:
        return real_s / self.infra

    def hour(self, t: float) -> float:
        return 24.0 * t / self.duration_s

    def at_hour(self, hour: float) -> float:
        return hour * self.duration_s / 24.0


def diurnal(hour: float) -> float:
    """0.08 at 04:00 .. 1.0 at 16:00."""
    return 0.08 + 0.92 * (0.5 - 0.5 * math.cos(2 * math.pi * (hour - 4.0) / 24.0))


def in_burst(hour: float) -> int | None:
    for i, (lo, hi) in enumerate(BURSTS):
        if lo <= hour < hi:
            return i
    return None


def rate(hour: float, peak_rps: float) -> float:
    """Requests per second at ``hour``; ``peak_rps`` is the day's highest (inside the 2nd burst)."""
    if QUIET_HOURS[0] <= hour < QUIET_HOURS[1]:
        return 0.0
    base = peak_rps / (BURST_FACTOR * diurnal(15.5)) * diurnal(hour)
    return base * (BURST_FACTOR if in_burst(hour) is not None else 1.0)


def arrivals(scale: Scale, peak_rps: float, seed: int = 7) -> list[float]:
    """Arrival times (bench seconds from the start) of a Poisson process with rate(hour): thinning."""
    rng = random.Random(seed)
    out: list[float] = []
    t = 0.0
    while True:
        t += rng.expovariate(peak_rps)
        if t >= scale.duration_s:
            return out
        if rng.random() < rate(scale.hour(t), peak_rps) / peak_rps:
            out.append(t)


@dataclass
class QpsPolicy:
    """SkyServe's RequestRateAutoscaler (sky/serve/autoscalers.py): desired = ceil(QPS over the
    window / target QPS per replica), clamped; the target moves only after the desire has pointed
    the same way for upscale_delay (resp. downscale_delay) worth of consecutive decisions."""

    min_replicas: int
    max_replicas: int
    target_qps_per_replica: float
    upscale_threshold: int
    downscale_threshold: int
    interval_s: float
    window_s: float
    target: int = 0
    _up: int = 0
    _down: int = 0

    @classmethod
    def skyserve_defaults(
        cls, divisor: float, *, min_replicas: int, max_replicas: int, target_qps_per_replica: float
    ) -> QpsPolicy:
        """SkyServe's default delays, decision interval and QPS window divided by ``divisor``
        (the infrastructure's factor, or the day's); at least 0.5 s between decisions and a 5 s
        window, so that the rate is measured over more than a handful of requests."""
        interval = max(0.5, SKYSERVE_DECISION_INTERVAL_S / divisor)
        return cls(
            min_replicas=min_replicas,
            max_replicas=max_replicas,
            target_qps_per_replica=target_qps_per_replica,
            upscale_threshold=math.ceil(SKYSERVE_UPSCALE_DELAY_S / divisor / interval),
            downscale_threshold=math.ceil(SKYSERVE_DOWNSCALE_DELAY_S / divisor / interval),
            interval_s=interval,
            window_s=max(5.0, SKYSERVE_QPS_WINDOW_S / divisor),
            target=min_replicas,
        )

    def decide(self, qps: float) -> int:
        wanted = math.ceil(qps / self.target_qps_per_replica)
        wanted = max(self.min_replicas, min(self.max_replicas, wanted))
        if wanted > self.target:
            self._up += 1
            self._down = 0
            if self._up >= self.upscale_threshold:
                self.target, self._up = wanted, 0
        elif wanted < self.target:
            self._down += 1
            self._up = 0
            if self._down >= self.downscale_threshold:
                self.target, self._down = wanted, 0
        else:
            self._up = self._down = 0
        return self.target


@dataclass
class Outcome:
    """One request as the client saw it."""

    at: float  # scheduled start, bench seconds
    status: int = 0
    ttft_ms: float | None = None
    tokens: int = 0
    complete: bool = False
    held_ms: float | None = None  # the gateway's x-cold-start-wait-ms
    error: str = ""

    @property
    def failed(self) -> bool:
        return self.status != 200 or not self.complete


@dataclass
class Sample:
    t: float
    offered_rps: float
    live: int  # nodes holding (or about to hold) a machine: pending .. draining
    ready: int
    starting: int
    stopped: int
    in_flight: int  # requests the client has open
    held: int  # requests the gateway holds for a node
    waiting: int  # vLLM's queue, summed over ready nodes (last health check)
    desired: int | None = None


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    k = (len(ordered) - 1) * q
    lo, hi = math.floor(k), math.ceil(k)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (k - lo)


@dataclass
class Summary:
    policy: str
    requests: int
    failed: int
    failures: dict[str, int] = field(default_factory=dict)
    node_seconds: float = 0.0
    ttft_p50_ms: float | None = None
    ttft_p95_ms: float | None = None
    ttft_p95_outside_first_burst_ms: float | None = None
    held: int = 0
    held_wait_p50_ms: float | None = None
    held_wait_max_ms: float | None = None
    max_live: int = 0
    cold_starts_s: list[float] = field(default_factory=list)
    warm_starts_s: list[float] = field(default_factory=list)


def summarize(policy: str, scale: Scale, outcomes: list[Outcome], samples: list[Sample], period_s: float) -> Summary:
    first_burst = (scale.at_hour(BURSTS[0][0]), scale.at_hour(BURSTS[0][1]))
    ttft = [o.ttft_ms for o in outcomes if o.ttft_ms is not None and not o.failed]
    outside = [
        o.ttft_ms
        for o in outcomes
        if o.ttft_ms is not None and not o.failed and not first_burst[0] <= o.at < first_burst[1]
    ]
    held = [o.held_ms for o in outcomes if o.held_ms is not None and o.held_ms > 0]
    failures: dict[str, int] = {}
    for o in outcomes:
        if o.failed:
            why = o.error or (f"HTTP {o.status}" if o.status != 200 else "incomplete stream")
            failures[why] = failures.get(why, 0) + 1
    return Summary(
        policy=policy,
        requests=len(outcomes),
        failed=sum(o.failed for o in outcomes),
        failures=failures,
        node_seconds=sum(s.live for s in samples) * period_s,
        ttft_p50_ms=percentile(ttft, 0.5),
        ttft_p95_ms=percentile(ttft, 0.95),
        ttft_p95_outside_first_burst_ms=percentile(outside, 0.95),
        held=len(held),
        held_wait_p50_ms=percentile(held, 0.5),
        held_wait_max_ms=max(held) if held else None,
        max_live=max((s.live for s in samples), default=0),
    )
