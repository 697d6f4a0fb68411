"""Atomic rate limits in Redis: requests/min, tokens/min and concurrent requests, per subject
(an API key, a tenant), checked and charged for every subject of a request in ONE Lua call.

Algorithm (why it is exact under concurrency):
- requests/min and tokens/min are token buckets kept as GCRA: one number per subject and
  dimension, the "theoretical arrival time" (TAT, ms). Capacity = the limit, refilled
  continuously at limit/60 s (OpenAI's semantics). A request of cost ``c`` fits when
  ``max(TAT, now) + c·T - 60 s <= now`` with ``T = 60 s / limit``; admitting it sets
  ``TAT = max(TAT, now) + c·T``. So at most ``limit`` units pass in any burst, then ``limit/60``
  per second. Tokens are reserved up front (``reserve_tokens``, clamped to the bucket's size so
  a large ``max_tokens`` waits for a full bucket instead of never passing) and corrected at
  ``settle()``: the difference moves TAT (a refund never fills the bucket past its capacity;
  an overrun leaves debt that refuses later requests until it has drained).
- concurrency is a sorted set per subject: request_id → deadline (now + ``concurrency_ttl_s``).
  Expired entries are pruned on every admit, so a crashed worker's slots free themselves;
  ``settle()`` removes the entry; ``refresh()`` extends it for streams longer than the TTL.
- The admit script first checks every dimension of every subject, and writes only when all
  pass: either everything is charged or nothing is. Redis's clock (``TIME``) is the only clock,
  so workers with skewed clocks agree. ``settle()`` is idempotent: admit enters the request in
  one sorted set of open requests (request_id → deadline), settle applies only if it removed the
  entry. So Redis holds one entry per request *in flight*, not a key per request for minutes
  after it (at 1k req/s a 15-minute marker per request was ~900k keys).
- Monthly budgets ride in the same two calls: a tenant's tokens, and a tenant's or a key's
  micro-dollars (US$ 1e-6). Admit refuses once a month's counter (used + reserved) has reached
  its limit and otherwise adds the request's reservation (tokens: ``reserve_tokens``; dollars:
  ``reserve_micros``, the worst-case cost); settle adds the difference to the real usage.
  Reserving makes it exact under concurrency: fifty simultaneous requests against a budget of
  ten reservations admit exactly ten, and the overshoot is at most the reservations in flight.
- A month's counter that Redis does not have (a new month, a flushed or restarted Redis) is
  seeded before it is used: admit reports it missing, the limiter asks its ``seeder`` (the
  gateway sums the month's usage records in PostgreSQL) and sets it with SET NX (so workers
  racing to seed agree), then admits again. Without a seeder a missing counter starts at 0.
- Redis down, slow (``timeout_s``) or absent: never an exception to the caller. ``fail_open``
  admits (warning logged at most every 30 s), otherwise refuses with reason "unavailable".
  After a failure Redis is not retried for ``backoff_s``, so an outage adds no latency per request.
Keys span several subjects in one script: a single Redis (or keys in one cluster slot) is assumed.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, cast

from apps.core.redis import RedisReplyError
from apps.gateway.batching import SettleBatch

if TYPE_CHECKING:
    from apps.core.redis import Multiplexed

log = logging.getLogger(__name__)

WINDOW_MS = 60_000
_NO_LIMIT = -1
_REASONS = {1: "requests", 2: "tokens", 3: "concurrency", 4: "budget"}
_MISSING = 5  # admit's answer when a budget counter must be seeded first
BUDGET_TTL_MS = 40 * 86_400_000  # a month's counter outlives its month, then goes

# KEYS: the open-requests set, per subject [rpm, tpm, conc], then one counter per budget.
# ARGV: request_id, reserve_tokens, conc_ttl_ms, n_subjects, conc_retry_ms, budget_ttl_ms,
# settle_window_ms, then per subject [rpm_limit, tpm_limit, conc_limit] (-1 = unlimited), then per
# budget [limit, reserve, seed] (seed 1: a missing counter is reported, not taken as 0).
# Returns {allowed, reason, retry_ms, per subject: rpm_remaining, rpm_reset_ms, tpm_remaining,
# tpm_reset_ms}; for reason 4 (budget) retry_ms is the refusing budget's index; for reason 5
# (counters to seed) the indexes of the missing budgets follow the first three values.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local window = 60000
local rid = ARGV[1]
local reserve = tonumber(ARGV[2])
local conc_ttl = tonumber(ARGV[3])
local n = tonumber(ARGV[4])
local m = #KEYS - 1 - n * 3
local missing = {0, 5, 0}
for j = 0, m - 1 do
  if ARGV[10 + n * 3 + j * 3] == '1' and redis.call('EXISTS', KEYS[2 + n * 3 + j]) == 0 then
    table.insert(missing, j)
  end
end
if #missing > 3 then return missing end
local out = {1, 0, 0}
local before = {0, 0, 0}  -- what the headers say if nothing is charged
local writes = {}
local worst_reason, worst_retry = 0, -1
local function report(pre_rem, pre_reset, post_rem, post_reset)
  table.insert(before, pre_rem); table.insert(before, pre_reset)
  table.insert(out, post_rem); table.insert(out, post_reset)
end
for i = 0, n - 1 do
  local rpm, tpm, conc = tonumber(ARGV[8 + i * 3]), tonumber(ARGV[9 + i * 3]), tonumber(ARGV[10 + i * 3])
  for d = 1, 2 do
    local limit = (d == 1) and rpm or tpm
    if limit < 0 then
      report(-1, -1, -1, -1)
    elseif limit == 0 then
      if window > worst_retry then worst_retry = window; worst_reason = d end
      report(0, 0, 0, 0)
    else
      local key = KEYS[2 + i * 3 + d - 1]
      local cost = 1
      if d == 2 then cost = math.min(reserve, limit) end
      local interval = window / limit
      local tat = tonumber(redis.call('GET', key) or now)
      if tat < now then tat = now end
      local new_tat = tat + cost * interval
      local allow_at = new_tat - window
      local pre_rem = math.max(0, math.floor((window - (tat - now)) / interval + 1e-9))
      local pre_reset = math.ceil(tat - now)
      if allow_at > now then
        if allow_at - now > worst_retry then worst_retry = allow_at - now; worst_reason = d end
        report(pre_rem, pre_reset, pre_rem, pre_reset)
      else
        table.insert(writes, {key, new_tat})
        report(pre_rem, pre_reset, math.max(0, math.floor((window - (new_tat - now)) / interval + 1e-9)),
               math.ceil(new_tat - now))
      end
    end
  end
  if conc >= 0 then
    local key = KEYS[2 + i * 3 + 2]
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    if redis.call('ZSCORE', key, rid) == false and redis.call('ZCARD', key) >= conc then
      if worst_reason == 0 then worst_reason = 3; worst_retry = tonumber(ARGV[5]) end
    else
      table.insert(writes, {key, 'z'})
    end
  end
end
for j = 0, m - 1 do
  local bkey = KEYS[2 + n * 3 + j]
  local limit = tonumber(ARGV[8 + n * 3 + j * 3])
  if tonumber(redis.call('GET', bkey) or '0') >= limit then
    if worst_reason ~= 4 then worst_reason = 4; worst_retry = j end
  else
    table.insert(writes, {bkey, 'b', tonumber(ARGV[9 + n * 3 + j * 3])})
  end
end
if worst_reason ~= 0 then
  before[1] = 0; before[2] = worst_reason; before[3] = math.ceil(worst_retry)
  return before
end
for _, w in ipairs(writes) do
  if w[2] == 'z' then
    redis.call('ZADD', w[1], now + conc_ttl, rid)
    redis.call('PEXPIRE', w[1], math.ceil(conc_ttl) + 1000)
  elseif w[2] == 'b' then
    redis.call('INCRBY', w[1], w[3])
    redis.call('PEXPIRE', w[1], tonumber(ARGV[6]))
  else
    redis.call('SET', w[1], string.format('%.3f', w[2]), 'PX', math.ceil(w[2] - now) + 1000)
  end
end
local settle_window = tonumber(ARGV[7])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
redis.call('ZADD', KEYS[1], now + settle_window, rid)
redis.call('PEXPIRE', KEYS[1], math.ceil(settle_window) + 1000)
return out
"""

# Settles of many requests in one call: all settles issued in one pass of the event loop (see
# RateLimiter.settle). KEYS: every entry's keys, in order. ARGV: count, then per entry [n_keys,
# n_args], then every entry's args, in order. One entry's KEYS: the open-requests set, then per
# subject [tpm, conc], then one counter per budget; its ARGV: request_id, n_subjects,
# budget_ttl_ms, then per subject [tpm_limit (-1 = none), token difference, has_conc (0/1)], then
# per budget its difference (used - reserved). Returns per entry 1, or 0 if already settled (or
# admitted so long ago that the request's entry expired).
_SETTLE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local function settle(k, a, nk)
  if redis.call('ZREM', KEYS[k + 1], ARGV[a + 1]) == 0 then return 0 end
  local n = tonumber(ARGV[a + 2])
  for i = 0, n - 1 do
    local limit, diff, has_conc = tonumber(ARGV[a + 4 + i * 3]), tonumber(ARGV[a + 5 + i * 3]), ARGV[a + 6 + i * 3]
    local tkey, ckey = KEYS[k + 2 + i * 2], KEYS[k + 3 + i * 2]
    if limit > 0 and diff ~= 0 then
      local tat = tonumber(redis.call('GET', tkey) or now)
      if tat < now then tat = now end
      tat = tat + diff * 60000 / limit
      if tat <= now then
        redis.call('DEL', tkey)
      else
        redis.call('SET', tkey, string.format('%.3f', tat), 'PX', math.ceil(tat - now) + 1000)
      end
    end
    if has_conc == '1' then redis.call('ZREM', ckey, ARGV[a + 1]) end
  end
  for j = 0, nk - 2 - n * 2 do
    local bkey, diff = KEYS[k + 2 + n * 2 + j], tonumber(ARGV[a + 4 + n * 3 + j])
    if diff ~= 0 then redis.call('INCRBY', bkey, diff) end
    redis.call('PEXPIRE', bkey, tonumber(ARGV[a + 3]))
  end
  return 1
end
local count = tonumber(ARGV[1])
local k, a = 0, 1 + 2 * count
local out = {}
for e = 1, count do
  local nk, na = tonumber(ARGV[2 * e]), tonumber(ARGV[2 * e + 1])
  out[e] = settle(k, a, nk)
  k = k + nk
  a = a + na
end
return out
"""

# KEYS: per subject conc key. ARGV: request_id, ttl_ms. Extends live entries only (XX).
_REFRESH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
for _, key in ipairs(KEYS) do
  if redis.call('ZADD', key, 'XX', now + tonumber(ARGV[2]), ARGV[1]) ~= false then
    redis.call('PEXPIRE', key, math.ceil(tonumber(ARGV[2])) + 1000)
  end
end
return 1
"""


@dataclass(frozen=True)
class _Script:
    source: str
    sha: str

    @classmethod
    def of(cls, source: str) -> _Script:
        return cls(source=source, sha=hashlib.sha1(source.encode()).hexdigest())  # noqa: S324 - Redis's script id


_ADMIT_SCRIPT, _SETTLE_SCRIPT, _REFRESH_SCRIPT = _Script.of(_ADMIT), _Script.of(_SETTLE), _Script.of(_REFRESH)


@dataclass(frozen=True)
class Limit:
    """The limits of one subject (an API key or a tenant); None means unlimited."""

    subject: str  # e.g. "key:12" / "tenant:3"
    requests_per_minute: int | None
    tokens_per_minute: int | None
    max_concurrent: int | None

    @property
    def unlimited(self) -> bool:
        return self.requests_per_minute is None and self.tokens_per_minute is None and self.max_concurrent is None


TOKENS, MICROS = "tokens", "micros"  # the units a budget counts


def month_of(now: float | None = None) -> str:
    """The calendar month (UTC) a counter belongs to: "2026-11"."""
    return time.strftime("%Y-%m", time.gmtime(now))


@dataclass(frozen=True, slots=True)
class Budget:
    """A monthly counter with a limit: a tenant's tokens, or a tenant's or a key's micro-dollars.

    ``owner`` ("tenant:3", "key:12") and ``month`` say what the seeder must sum when Redis has
    no counter; ``unit`` says which reservation and which usage the counter is charged with."""

    key: str
    limit: int
    unit: str = TOKENS
    owner: str = ""
    month: str = ""

    @classmethod
    def monthly(
        cls,
        *,
        tenant_id: int,
        limit: int,
        prefix: str = "crosslogic:budget:",
        now: float | None = None,
        month: str | None = None,
    ) -> Budget:
        """A tenant's token budget (the key format predates the dollar budgets and is kept)."""
        month = month or month_of(now)
        return cls(
            key=f"{prefix}{tenant_id}:{month}",
            limit=max(0, int(limit)),
            unit=TOKENS,
            owner=f"tenant:{tenant_id}",
            month=month,
        )

    @classmethod
    def dollars(
        cls,
        *,
        owner: str,
        limit_micros: int,
        prefix: str = "crosslogic:budget:usd:",
        now: float | None = None,
        month: str | None = None,
    ) -> Budget:
        """A monthly spend limit in micro-dollars of ``owner`` ("tenant:<id>" or "key:<id>")."""
        month = month or month_of(now)
        return cls(
            key=f"{prefix}{owner}:{month}", limit=max(0, int(limit_micros)), unit=MICROS, owner=owner, month=month
        )


# What the limiter calls for a counter Redis does not have: the month's usage so far, in the
# budget's unit. May raise; the limiter then admits without that budget for this request.
Seeder = Callable[[Budget], Awaitable[int]]


@dataclass(frozen=True, slots=True)
class Handle:
    """What settle() needs of an admission (kept in memory: no serialisation per request)."""

    request_id: str
    reserve: int
    limits: tuple[Limit, ...]
    budgets: tuple[Budget, ...] = ()
    reserve_micros: int = 0


@dataclass
class Admission:
    allowed: bool
    retry_after_s: float | None  # when refused
    reason: str | None  # "requests" | "tokens" | "concurrency" | "budget" | "unavailable"
    headers: dict[str, str]  # OpenAI's x-ratelimit-*, for the most constraining subject
    token: Handle | None  # for settle(); None when there is nothing to settle
    settled: bool = field(default=False, compare=False)
    budget: Budget | None = None  # the budget that refused, for reason "budget"


def format_duration(ms: float) -> str:
    """OpenAI's (Go's) duration format: "20ms", "1s", "1.5s", "6m0s", "1h2m3s"."""
    ms = max(0, math.ceil(ms))
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    seconds = f"{rest / 1000:.3f}".rstrip("0").rstrip(".")
    if hours:
        return f"{hours}h{minutes}m{seconds}s"
    if minutes:
        return f"{minutes}m{seconds}s"
    return f"{seconds}s"


def _headers(limits: list[Limit], values: list[int]) -> dict[str, str]:
    """Per dimension, the subject with the least remaining (ties: the smaller limit) speaks."""
    headers: dict[str, str] = {}
    for dim, name, attr in ((0, "requests", "requests_per_minute"), (1, "tokens", "tokens_per_minute")):
        best: tuple[int, int, int] | None = None
        for i, lim in enumerate(limits):
            limit = getattr(lim, attr)
            remaining, reset_ms = values[i * 4 + dim * 2], values[i * 4 + dim * 2 + 1]
            if limit is None or remaining < 0:
                continue
            candidate = (remaining, limit, reset_ms)
            if best is None or candidate[:2] < best[:2]:
                best = candidate
        if best is not None:
            headers[f"x-ratelimit-limit-{name}"] = str(best[1])
            headers[f"x-ratelimit-remaining-{name}"] = str(best[0])
            headers[f"x-ratelimit-reset-{name}"] = format_duration(best[2])
    return headers


def _arg(value: int | None) -> int:
    return _NO_LIMIT if value is None else max(0, int(value))


class RateLimiter:
    def __init__(
        self,
        redis: Multiplexed | None,
        *,
        fail_open: bool = True,
        key_prefix: str = "crosslogic:rl:",
        concurrency_ttl_s: float = 900.0,
        concurrency_retry_s: float = 1.0,
        timeout_s: float = 0.5,
        backoff_s: float = 1.0,
        unavailable_retry_s: float = 1.0,
        settle_window_s: float = 6 * 3600.0,
        seeder: Seeder | None = None,
    ) -> None:
        self.redis = redis
        self.seeder = seeder
        self._settles = SettleBatch(self._call_settle)
        self.fail_open = fail_open
        self.prefix = key_prefix
        self.concurrency_ttl_ms = int(concurrency_ttl_s * 1000)
        self.concurrency_retry_ms = int(concurrency_retry_s * 1000)
        self.timeout_s = timeout_s
        self.backoff_s = backoff_s
        self.unavailable_retry_s = unavailable_retry_s
        # How long an admitted request may take to be settled; far longer than any generation.
        self.settle_window_ms = int(settle_window_s * 1000)
        self.open_key = f"{key_prefix}open"
        self._key_cache: dict[str, list[str]] = {}
        self._down_until = 0.0
        self._last_warning = 0.0
        self._last_seed_warning = -1e9
        self._suppressed = 0

    def _keys(self, subject: str) -> list[str]:
        keys = self._key_cache.get(subject)
        if keys is None:
            if len(self._key_cache) > 100_000:  # bounded: subjects are keys, tenants and tenant-model pairs
                self._key_cache.clear()
            keys = [f"{self.prefix}rpm:{subject}", f"{self.prefix}tpm:{subject}", f"{self.prefix}conc:{subject}"]
            self._key_cache[subject] = keys
        return keys

    # --- Redis trouble: never raise, log rarely ----------------------------------------
    def _redis_usable(self) -> bool:
        return self.redis is not None and time.monotonic() >= self._down_until

    def _failed(self, exc: BaseException | None) -> None:
        now = time.monotonic()
        self._down_until = now + self.backoff_s
        if now - self._last_warning >= 30.0:
            extra = f" ({self._suppressed} more since the last warning)" if self._suppressed else ""
            what = "no Redis configured" if exc is None else f"Redis unavailable: {type(exc).__name__}: {exc}"
            log.warning(
                "rate limiter: %s; %s%s", what, "admitting (fail-open)" if self.fail_open else "refusing", extra
            )
            self._last_warning, self._suppressed = now, 0
        else:
            self._suppressed += 1

    def _unavailable(self) -> Admission:
        if self.fail_open:
            return Admission(allowed=True, retry_after_s=None, reason=None, headers={}, token=None)
        return Admission(
            allowed=False, retry_after_s=self.unavailable_retry_s, reason="unavailable", headers={}, token=None
        )

    async def _call(self, script: _Script, keys: list[str], args: list[object]) -> object:
        assert self.redis is not None
        try:
            return await self.redis.execute("EVALSHA", script.sha, len(keys), *keys, *args, timeout_s=self.timeout_s)
        except RedisReplyError as exc:
            if not str(exc).startswith("NOSCRIPT"):
                raise
        # First use on this Redis (or after SCRIPT FLUSH / a restart): load it, once.
        await self.redis.execute("SCRIPT", "LOAD", script.source, timeout_s=self.timeout_s)
        return await self.redis.execute("EVALSHA", script.sha, len(keys), *keys, *args, timeout_s=self.timeout_s)

    # --- the interface -------------------------------------------------------------------
    async def admit(
        self,
        *,
        limits: list[Limit],
        reserve_tokens: int,
        request_id: str,
        budgets: Sequence[Budget] = (),
        reserve_micros: int = 0,
    ) -> Admission:
        """Check and charge every limit and budget at once. ``reserve_tokens`` is charged to the
        tokens/min buckets and token budgets, ``reserve_micros`` (the worst-case cost) to the
        dollar budgets."""
        limits = [lim for lim in limits if not lim.unlimited]
        if not limits and not budgets:
            return Admission(allowed=True, retry_after_s=None, reason=None, headers={}, token=None)
        if not self._redis_usable():
            if self.redis is None:
                self._failed(None)
            return self._unavailable()
        reserve = max(0, int(reserve_tokens))
        micros = max(0, int(reserve_micros))
        budgets = tuple(budgets)
        try:
            result = await self._admit(limits, budgets, reserve, micros, request_id, seeded=())
            if result[1] == _MISSING:
                missing = [budgets[i] for i in result[3:]]
                usable = await self._seed(missing)
                # A counter that could not be seeded (database away) is left out of this request.
                budgets = tuple(b for b in budgets if b not in missing or b in usable)
                result = await self._admit(limits, budgets, reserve, micros, request_id, seeded=budgets)
        except Exception as exc:  # never raise to the caller: Redis down, slow or confused
            self._failed(exc)
            return self._unavailable()
        allowed, reason, retry_ms, *values = result
        headers = _headers(limits, values)
        if not allowed:
            if reason == 4:
                return Admission(
                    allowed=False,
                    retry_after_s=None,
                    reason="budget",
                    headers=headers,
                    token=None,
                    budget=budgets[retry_ms],
                )
            return Admission(
                allowed=False, retry_after_s=retry_ms / 1000, reason=_REASONS[reason], headers=headers, token=None
            )
        handle = Handle(
            request_id=request_id, reserve=reserve, limits=tuple(limits), budgets=budgets, reserve_micros=micros
        )
        return Admission(allowed=True, retry_after_s=None, reason=None, headers=headers, token=handle)

    async def _admit(
        self,
        limits: list[Limit],
        budgets: tuple[Budget, ...],
        reserve: int,
        micros: int,
        request_id: str,
        *,
        seeded: tuple[Budget, ...],
    ) -> list[int]:
        keys: list[str] = [self.open_key]
        args: list[object] = [
            request_id,
            reserve,
            self.concurrency_ttl_ms,
            len(limits),
            self.concurrency_retry_ms,
            BUDGET_TTL_MS,
            self.settle_window_ms,
        ]
        for lim in limits:
            keys += self._keys(lim.subject)
            args += [_arg(lim.requests_per_minute), _arg(lim.tokens_per_minute), _arg(lim.max_concurrent)]
        # Seeding is asked for once: a counter gone again by the second call counts from 0.
        seed = 0 if self.seeder is None or seeded else 1
        for budget in budgets:
            keys.append(budget.key)
            args += [budget.limit, micros if budget.unit == MICROS else reserve, seed]
        result = await self._call(_ADMIT_SCRIPT, keys, args)
        return [int(v) for v in cast("list[int]", result)]  # the script returns integers

    async def _seed(self, budgets: list[Budget]) -> list[Budget]:
        """Set each missing counter to the month's usage so far (SET NX: the first seeder wins)."""
        assert self.seeder is not None and self.redis is not None  # admit asks only then
        done = []
        for budget in budgets:
            try:
                used = max(0, int(await self.seeder(budget)))
            except Exception as exc:
                # Every request retries while the database is away: warn at most every 30 s.
                now = time.monotonic()
                if now - self._last_seed_warning >= 30.0:
                    log.warning("rate limiter: could not seed budget %s (%s); not enforced for now", budget.key, exc)
                    self._last_seed_warning = now
                continue
            await self.redis.execute("SET", budget.key, used, "NX", "PX", BUDGET_TTL_MS, timeout_s=self.timeout_s)
            done.append(budget)
        return done

    async def settle(self, admission: Admission, *, used_tokens: int, used_micros: int = 0) -> None:
        """Charge the real usage (tokens, and cost in micro-dollars) instead of the reservation,
        and free the concurrency slot. Idempotent."""
        if admission.settled or not admission.allowed or not admission.token:
            return
        admission.settled = True
        handle = admission.token
        keys = [self.open_key]
        args: list[object] = [handle.request_id, len(handle.limits), BUDGET_TTL_MS]
        used = max(0, int(used_tokens))
        for lim in handle.limits:
            _rpm_key, tpm_key, conc_key = self._keys(lim.subject)
            keys += [tpm_key, conc_key]
            tpm = lim.tokens_per_minute
            charged = min(handle.reserve, tpm) if tpm else 0
            args += [_arg(tpm), used - charged if tpm else 0, 0 if lim.max_concurrent is None else 1]
        cost = max(0, int(used_micros))
        for budget in handle.budgets:
            keys.append(budget.key)
            args.append(cost - handle.reserve_micros if budget.unit == MICROS else used - handle.reserve)
        if self.redis is None:
            return
        try:
            await self._settles.submit(keys, args)
        except Exception as exc:  # never raise to the caller: Redis down, slow or confused
            # The reservation stands and the slot expires by itself after concurrency_ttl_s.
            self._failed(exc)

    async def drain(self) -> None:
        """Send the settles still queued (shutdown)."""
        await self._settles.drain()

    async def _call_settle(self, keys: list[str], args: list[object]) -> object:
        return await self._call(_SETTLE_SCRIPT, keys, args)

    async def refresh(self, admission: Admission) -> None:
        """Extend a long-running request's concurrency slot by another ``concurrency_ttl_s``."""
        if admission.settled or not admission.allowed or not admission.token or self.redis is None:
            return
        handle = admission.token
        keys = [self._keys(lim.subject)[2] for lim in handle.limits if lim.max_concurrent is not None]
        if not keys:
            return
        try:
            await self._call(_REFRESH_SCRIPT, keys, [handle.request_id, self.concurrency_ttl_ms])
        except Exception as exc:  # never raise to the caller: Redis down, slow or confused
            self._failed(exc)
