"""Admission leases (issue #14): a worker admits most requests of a busy subject without a Redis
round trip, from slices of the subject's allowance it leased ahead of need.

When a request must go to Redis anyway (its worker holds no slice, or not enough), the admit
script charges it and, in the same call and atomically, a slice on top: k-1 more requests of the
requests/min bucket (TAT moved by (k-1)·T), (k-1)·c more tokens of the tokens/min bucket (c =
this request's charge), k-1 more concurrency slots (members ``lease:<worker>:<n>:<i>`` of the
subject's sorted set) and (k-1)·reservation more of each budget. A slice is granted only if the
request *and the whole slice* fit in what Redis has left, so Redis never hands out more than the
limit: the guarantee #3 proved (never more admitted than the limit across all workers) holds,
because every admission is paid for by units Redis counted as taken, once.

k follows the subject's recent rate at this worker (requests seen in the last ``lease_s``), and
is capped at 1/``SLICE_SHARE`` of the limit: a quiet subject (k = 1) and a small limit (a
concurrency of 10 gives k = 1) are admitted one request per call, exactly as before, so a small
limit is never split into idle slices.

A slice is used only while fresh (``lease_s``, 1 s by default). Its unused part goes back to
Redis, through the same batched call as the settles, when it expires and at shutdown (``drain``):
TAT moved back by the unused units (never before now), unused slots removed, unused budget
reservations subtracted. The cost is bounded under-admission: while a slice sits unused, other
workers see at most k units fewer for at most ``lease_s`` (plus one settle batch).

A concurrency slot taken from a slice comes back to the slice when its request settles (no Redis
call) while the slice is fresh; otherwise the settle removes it from Redis.
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

SLICE_SHARE = 8  # a slice is at most 1/8 of a limit
MAX_SLICE = 256  # requests per slice, whatever the rate
BUCKET, SLOTS, BUDGET = "t", "z", "b"

Post = Callable[[list[str], list[object]], None]  # queue a return on the batched settle call


@dataclass(slots=True)
class Pool:
    """This worker's leased, unused allowance of one Redis key (a bucket, a slot set, a budget)."""

    kind: str
    limit: int = 0  # the bucket's limit when leased: a return moves TAT by units·60 s/limit
    units: int = 0  # leased and unused: requests, tokens or budget units
    until: float = 0.0  # monotonic: units are used before, returned after
    free: list[tuple[str, float, float]] = field(default_factory=list)  # slots: (member, usable until, born)
    epoch: int = 0  # +1 when everything is returned: slots of an older epoch are gone from Redis
    leasing: asyncio.Future | None = None  # a lease of this key in flight: others wait for it
    window: float = 0.0  # the rate: requests seen in the current and the last window of lease_s
    hits: int = 0
    last_hits: int = 0
    timer: asyncio.TimerHandle | None = None


@dataclass(slots=True)  # not frozen: one is made per request, and frozen init costs twice as much
class Slot:
    """A concurrency slot a request took from a slice."""

    key: str
    member: str
    epoch: int
    until: float
    born: float  # when Redis set its deadline (born + the concurrency TTL)


@dataclass(slots=True)
class Plan:
    """How one request is admitted: per dimension, charged by Redis (1) or covered by a slice (0),
    and the slice to lease on top. Dimensions: per subject [rpm, tpm, conc], then per budget."""

    charge: list[int] = field(default_factory=list)
    extra: list[int] = field(default_factory=list)
    taken: list[tuple[Pool, int, int]] = field(default_factory=list)  # (pool, units, epoch) to undo
    slots: list[Slot | None] = field(default_factory=list)  # per subject
    asked: list[Pool] = field(default_factory=list)  # pools whose lease this request carries
    pending: list[asyncio.Future] = field(default_factory=list)  # leases in flight it could use

    @property
    def local(self) -> bool:
        return not any(self.charge)


class Leases:
    def __init__(self, *, lease_s: float, post: Post, slot_age_s: float = 450.0) -> None:
        self.lease_s = lease_s
        # A slot is reused only this long after Redis set its deadline (half the concurrency
        # TTL), so a request on a reused slot keeps at least half the TTL, as refresh() assumes.
        self.slot_age_s = slot_age_s
        self.enabled = lease_s > 0
        self.worker = uuid.uuid4().hex[:12]
        self._seq = itertools.count(1)
        self._post = post
        self._pools: dict[str, Pool] = {}
        self._last: dict[str, tuple[list[int], float]] = {}  # subject -> Redis's last values, when
        self.local = 0  # admissions served from slices, for tests and benchmarks

    def prefix(self) -> str:
        """The member prefix of the slots leased by one admit call."""
        return f"lease:{self.worker}:{next(self._seq)}"

    def _new_pool(self, key: str, kind: str, now: float) -> Pool:
        if len(self._pools) > 100_000:  # bounded: drop what holds nothing
            self._pools = {k: p for k, p in self._pools.items() if p.units or p.free or p.timer}
        pool = self._pools[key] = Pool(kind=kind, window=now)
        return pool

    def plan(self, dims: list[tuple[str, str, int | None, int]], now: float, *, count: bool = True) -> Plan:
        """Take what this worker's slices cover; ``dims``: (key, kind, limit, cost) per dimension.
        Unlimited dimensions (limit None) are left to the script, which ignores them. ``count``:
        the request counts towards the rate (not when it is planned a second time)."""
        p = Plan()
        for key, kind, limit, cost in dims:
            slot: Slot | None = None
            if limit is None or not self.enabled:
                p.charge.append(0 if limit is None else 1)  # the script skips unlimited dimensions
                p.extra.append(0)
            else:
                pool = self._pools.get(key)  # the rate, inline: this runs per dimension per request
                if pool is None:
                    pool = self._new_pool(key, kind, now)
                if now - pool.window >= self.lease_s:
                    pool.last_hits = pool.hits if now - pool.window < 2 * self.lease_s else 0
                    pool.hits, pool.window = 0, now
                pool.hits += count
                if kind == SLOTS:
                    slot = self._take_slot(key, pool, now)
                    covered = slot is not None
                elif now < pool.until and pool.units >= (cost or 1):
                    pool.units -= cost
                    p.taken.append((pool, cost, pool.epoch))
                    covered = True
                else:
                    covered = False
                extra = 0
                if covered:
                    pass
                elif pool.leasing is not None:
                    p.pending.append(pool.leasing)
                elif cost > 0:
                    k = min(max(pool.hits, pool.last_hits), MAX_SLICE, limit // (SLICE_SHARE * cost))
                    extra = (k - 1) * cost if k > 1 else 0
                    if extra:
                        pool.leasing = asyncio.get_running_loop().create_future()
                        p.asked.append(pool)
                p.charge.append(0 if covered else 1)
                p.extra.append(extra)
            if kind == SLOTS:
                p.slots.append(slot)
        return p

    def _take_slot(self, key: str, pool: Pool, now: float) -> Slot | None:
        while pool.free:
            member, until, born = pool.free.pop()
            if until > now:
                return Slot(key=key, member=member, epoch=pool.epoch, until=until, born=born)
            self._post([key], ["r", SLOTS, 0, 0, member])  # stale: give it back now
        return None

    def undo(self, plan: Plan) -> None:
        """The request was refused (or Redis failed): put back what it took from slices."""
        for pool, cost, epoch in plan.taken:
            if pool.epoch == epoch:  # not if the slice went back meanwhile: Redis has them already
                pool.units += cost
        now = time.monotonic()
        for slot in plan.slots:
            if slot is not None:
                self.release(slot, now)
        plan.taken, plan.slots = [], []

    def done(self, plan: Plan) -> None:
        """The call that carried this plan's leases answered (or failed): wake who waits."""
        for pool in plan.asked:
            if pool.leasing is not None and not pool.leasing.done():
                pool.leasing.set_result(None)
            pool.leasing = None
        plan.asked = []

    def grant(self, dims: list[tuple[str, str, int | None, int]], grants: list[int], prefix: str) -> None:
        """Add what Redis granted on top of the request to this worker's slices."""
        now = time.monotonic()
        for (key, kind, limit, _cost), units in zip(dims, grants, strict=True):
            if units <= 0 or limit is None:
                continue
            pool = self._pools.get(key) or self._pools.setdefault(key, Pool(kind=kind, window=now))
            until = now + self.lease_s
            if kind == SLOTS:
                pool.free += [(f"{prefix}:{i}", until, now) for i in range(1, units + 1)]
            else:
                pool.units += units
                pool.limit = limit
            pool.until = until
            if pool.timer is None:
                pool.timer = asyncio.get_running_loop().call_later(self.lease_s, self._expire, key)

    def held(self, key: str) -> int:
        """Units (or free slots) of ``key`` this worker holds and has not used."""
        pool = self._pools.get(key)
        return 0 if pool is None else pool.units + len(pool.free)

    def release(self, slot: Slot, now: float) -> bool:
        """A request that held a leased slot ended: back to its slice if that is still fresh."""
        pool = self._pools.get(slot.key)
        if pool is None or pool.epoch != slot.epoch or now >= slot.until or now - slot.born > self.slot_age_s:
            return False  # given back meanwhile, stale, or near its deadline in Redis: removed there
        # Idle from now on: usable for another lease period, so an idle slot is withheld from
        # the other workers no longer than one lease period (the bound), while a slot in steady
        # use is not given back and leased again every period.
        pool.free.append((slot.member, now + self.lease_s, slot.born))
        pool.until = max(pool.until, now + self.lease_s)
        return True

    def _expire(self, key: str) -> None:
        pool = self._pools.get(key)
        if pool is None:
            return
        pool.timer = None
        now = time.monotonic()
        self._give_back(key, pool, now, everything=now >= pool.until)
        if pool.until > now or pool.free:
            pool.timer = asyncio.get_running_loop().call_later(max(pool.until - now, 0.01), self._expire, key)

    def _give_back(self, key: str, pool: Pool, now: float, *, everything: bool) -> None:
        stale = pool.free if everything else [f for f in pool.free if f[1] <= now]
        if stale:
            self._post([key], ["r", SLOTS, 0, 0, *(f[0] for f in stale)])
            pool.free = [] if everything else [f for f in pool.free if f[1] > now]
        if everything:
            if pool.units:
                self._post([key], ["r", pool.kind, pool.limit, pool.units])
            pool.units, pool.until = 0, 0.0
            pool.epoch += 1

    def return_all(self) -> None:
        """Give every unused slice back now (the worker is shutting down)."""
        now = time.monotonic()
        for key, pool in self._pools.items():
            if pool.timer is not None:
                pool.timer.cancel()
                pool.timer = None
            self._give_back(key, pool, now, everything=True)

    # --- headers: Redis's last answer plus what this worker still holds --------------------------
    def remember(self, subject: str, values: list[int], now: float) -> None:
        self._last[subject] = (values, now)
        if len(self._last) > 100_000:
            self._last.clear()

    def values(self, subject: str, keys: list[str], now: float) -> list[int]:
        """[rpm remaining, rpm reset ms, tpm remaining, tpm reset ms] for the headers: the last
        Redis answer (after the slices were taken) plus the slices' unused units."""
        last = self._last.get(subject)
        if last is None:
            return [-1, -1, -1, -1]
        raw, at = last
        rpm, rpm_reset, tpm, tpm_reset = raw
        if rpm < 0 and tpm < 0:  # concurrency only: nothing to say in the headers
            return raw
        elapsed = (now - at) * 1000
        if rpm >= 0:
            pool = self._pools.get(keys[0])
            if pool is not None and now < pool.until:
                rpm += pool.units
            rpm_reset = max(0, math.ceil(rpm_reset - elapsed))
        if tpm >= 0:
            pool = self._pools.get(keys[1])
            if pool is not None and now < pool.until:
                tpm += pool.units
            tpm_reset = max(0, math.ceil(tpm_reset - elapsed))
        return [rpm, rpm_reset, tpm, tpm_reset]
