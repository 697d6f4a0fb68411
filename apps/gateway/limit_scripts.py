"""The rate limiter's Lua scripts (apps/gateway/limits.py explains the algorithm, leases.py the
slices a worker leases ahead of need). Kept apart so the limiter stays readable."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

# KEYS: the open-requests set, per subject [rpm, tpm, conc], then one counter per budget.
# ARGV: request_id, reserve_tokens, conc_ttl_ms, n_subjects, conc_retry_ms, budget_ttl_ms,
# settle_window_ms, lease_prefix, then per subject [rpm_limit, tpm_limit, conc_limit (-1 =
# unlimited), rpm_charge, tpm_charge, conc_charge (0: a lease of this worker covers it, skip),
# rpm_extra, tpm_extra, conc_extra (a slice to lease on top: requests, tokens, slots)], then per
# budget [limit, reserve, seed, charge, extra] (seed 1: a missing counter is reported, not taken
# as 0). A slice is granted only when the request and the whole slice fit; otherwise the request
# alone is charged (or refused), exactly as without leases.
# Returns {allowed, reason, retry_ms, per subject: rpm_remaining, rpm_reset_ms, tpm_remaining,
# tpm_reset_ms} and, when allowed, the granted slice per subject [rpm, tpm, conc] then per budget;
# for reason 4 (budget) retry_ms is the refusing budget's index; for reason 5 (counters to seed)
# the indexes of the missing budgets follow the first three values.
ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local window = 60000
local rid = ARGV[1]
local reserve = tonumber(ARGV[2])
local conc_ttl = tonumber(ARGV[3])
local n = tonumber(ARGV[4])
local lease = ARGV[8]
local m = #KEYS - 1 - n * 3
local bbase = 9 + n * 9
local missing = {0, 5, 0}
for j = 0, m - 1 do
  if ARGV[bbase + j * 5 + 2] == '1' and redis.call('EXISTS', KEYS[2 + n * 3 + j]) == 0 then
    table.insert(missing, j)
  end
end
if #missing > 3 then return missing end
local out = {1, 0, 0}
local before = {0, 0, 0}  -- what the headers say if nothing is charged
local grants = {}
local writes = {}
local worst_reason, worst_retry = 0, -1
local function report(pre_rem, pre_reset, post_rem, post_reset)
  table.insert(before, pre_rem); table.insert(before, pre_reset)
  table.insert(out, post_rem); table.insert(out, post_reset)
end
for i = 0, n - 1 do
  local a = 9 + i * 9
  local conc = tonumber(ARGV[a + 2])
  for d = 1, 2 do
    local limit = tonumber(ARGV[a + d - 1])
    local charge = ARGV[a + 2 + d] == '1'
    local extra = tonumber(ARGV[a + 5 + d])
    local granted = 0
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
      local pre_rem = math.max(0, math.floor((window - (tat - now)) / interval + 1e-9))
      local pre_reset = math.ceil(tat - now)
      if not charge then
        report(pre_rem, pre_reset, pre_rem, pre_reset)
      else
        local new_tat = tat + cost * interval
        if extra > 0 and new_tat + extra * interval - window <= now then
          new_tat = new_tat + extra * interval
          granted = extra
        end
        local allow_at = new_tat - window
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
    table.insert(grants, granted)
  end
  local cgrant = 0
  if conc >= 0 and ARGV[a + 5] == '1' then
    local key = KEYS[2 + i * 3 + 2]
    local extra = tonumber(ARGV[a + 8])
    redis.call('ZREMRANGEBYSCORE', key, '-inf', now)
    local held = redis.call('ZSCORE', key, rid) ~= false
    local card = redis.call('ZCARD', key)
    if not held and card >= conc then
      if worst_reason == 0 then worst_reason = 3; worst_retry = tonumber(ARGV[5]) end
    else
      if held then card = card - 1 end
      if extra > 0 and card + 1 + extra <= conc then cgrant = extra end
      table.insert(writes, {key, 'z', cgrant})
    end
  end
  table.insert(grants, cgrant)
end
for j = 0, m - 1 do
  local bkey = KEYS[2 + n * 3 + j]
  local b = bbase + j * 5
  local limit, res, extra = tonumber(ARGV[b]), tonumber(ARGV[b + 1]), tonumber(ARGV[b + 4])
  local bgrant = 0
  if ARGV[b + 3] == '1' then
    local used = tonumber(redis.call('GET', bkey) or '0')
    if used >= limit then
      if worst_reason ~= 4 then worst_reason = 4; worst_retry = j end
    else
      if extra > 0 and used + res + extra <= limit then bgrant = extra end
      table.insert(writes, {bkey, 'b', res + bgrant})
    end
  end
  table.insert(grants, bgrant)
end
if worst_reason ~= 0 then
  before[1] = 0; before[2] = worst_reason; before[3] = math.ceil(worst_retry)
  return before
end
for _, w in ipairs(writes) do
  if w[2] == 'z' then
    local deadline = now + conc_ttl
    local members = {deadline, rid}
    for s = 1, w[3] do table.insert(members, deadline); table.insert(members, lease .. ':' .. s) end
    redis.call('ZADD', w[1], unpack(members))
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
for _, g in ipairs(grants) do table.insert(out, g) end
return out
"""

# Settles of many requests, and returns of unused slices, in one call: all issued in one pass of
# the event loop (apps/gateway/batching.py). KEYS: every entry's keys, in order. ARGV: count, then
# per entry [n_keys, n_args], then every entry's args, in order.
# A settle ('s'): KEYS the open-requests set, then per subject [tpm, conc], then one counter per
# budget; ARGV 's', request_id ('' for a request admitted from leases: it has no open entry, and
# the worker's Admission.settled flag is what makes its settle happen once), n_subjects,
# budget_ttl_ms, then per subject [tpm_limit (-1 = none), token difference, concurrency member to
# remove ('' = none)], then per budget its difference (used - reserved).
# A return ('r'): KEYS the one key; ARGV 'r', what ('t' bucket, 'z' slots, 'b' budget), limit,
# unused units, then (slots) the members to remove. A bucket's TAT moves back by the unused
# part but never before now (the bucket never holds more than its capacity).
# Returns per entry 1, or 0 for a settle already applied (or admitted so long ago that the
# request's entry expired).
SETTLE = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local function give_back(k, a, na)
  local what, key = ARGV[a + 2], KEYS[k + 1]
  if what == 'z' then
    for i = a + 5, a + na do redis.call('ZREM', key, ARGV[i]) end
  elseif what == 'b' then
    if redis.call('EXISTS', key) == 1 then redis.call('INCRBY', key, -tonumber(ARGV[a + 4])) end
  else
    local limit, units = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
    local tat = tonumber(redis.call('GET', key) or now) - units * 60000 / limit
    if tat <= now then
      redis.call('DEL', key)
    else
      redis.call('SET', key, string.format('%.3f', tat), 'PX', math.ceil(tat - now) + 1000)
    end
  end
  return 1
end
local function settle(k, a, nk)
  local rid = ARGV[a + 2]
  if rid ~= '' and redis.call('ZREM', KEYS[k + 1], rid) == 0 then return 0 end
  local n = tonumber(ARGV[a + 3])
  for i = 0, n - 1 do
    local limit, diff, member = tonumber(ARGV[a + 5 + i * 3]), tonumber(ARGV[a + 6 + i * 3]), ARGV[a + 7 + i * 3]
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
    if member ~= '' then redis.call('ZREM', ckey, member) end
  end
  for j = 0, nk - 2 - n * 2 do
    local bkey, diff = KEYS[k + 2 + n * 2 + j], tonumber(ARGV[a + 5 + n * 3 + j])
    if diff ~= 0 then redis.call('INCRBY', bkey, diff) end
    redis.call('PEXPIRE', bkey, tonumber(ARGV[a + 4]))
  end
  return 1
end
local count = tonumber(ARGV[1])
local k, a = 0, 1 + 2 * count
local out = {}
for e = 1, count do
  local nk, na = tonumber(ARGV[2 * e]), tonumber(ARGV[2 * e + 1])
  if ARGV[a + 1] == 'r' then out[e] = give_back(k, a, na) else out[e] = settle(k, a, nk) end
  k = k + nk
  a = a + na
end
return out
"""

# KEYS: per subject conc key. ARGV: ttl_ms, then per key the member to extend. Live entries only (XX).
REFRESH = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
for i, key in ipairs(KEYS) do
  if redis.call('ZADD', key, 'XX', now + tonumber(ARGV[1]), ARGV[i + 1]) ~= false then
    redis.call('PEXPIRE', key, math.ceil(tonumber(ARGV[1])) + 1000)
  end
end
return 1
"""


@dataclass(frozen=True)
class Script:
    source: str
    sha: str

    @classmethod
    def of(cls, source: str) -> Script:
        return cls(source=source, sha=hashlib.sha1(source.encode()).hexdigest())  # noqa: S324 - Redis's script id


ADMIT_SCRIPT, SETTLE_SCRIPT, REFRESH_SCRIPT = Script.of(ADMIT), Script.of(SETTLE), Script.of(REFRESH)
