-- Do what is due, on Redis' clock (run by every live worker's housekeeping; idempotent):
-- fail the indexed sessions past their execution deadline (a host's, which may have no
-- live process in its restart grace, and an earlier version's worker's; a worker whose
-- record says expiry=own ends its own on its timer, and its reap fails them), drop
-- tickets whose wait is over, reap workers whose heartbeat deadline passed and whose
-- heartbeat key is gone, and hand the caller the takeover marks and the audit that are
-- due (reap.lua says what they are).
-- KEYS[1] deadlines  sorted set of session and ticket deadlines
-- KEYS[2] beats      sorted set of heartbeat deadlines, takeover marks, the audit and 'd', the
--                    deadline index's earliest moment (reap.lua)
-- KEYS[3] guard      never exists: Redis will not start the script while the slot migrates (keys.py)
-- ARGV[1] base          the task queue's key prefix
-- ARGV[2] retention_ms  how long ended session records stay for inspect
-- ARGV[3] limit         most items of each index handled in one call
-- ARGV[4] me            the calling worker (it never reaps itself)
-- ARGV[5] may_reap      '0' while the caller's own heartbeat fails: whatever cut it off
--                       likely cut the others off too, and they are about to beat again
-- ARGV[6] retry_ms      a takeover mark handed out comes due again this much later (in case
--                       its taker cannot finish it)
-- ARGV[7] audit_ms      the next audit is due this much after this one
-- ARGV[8] host_id       the caller's host, '' for none: its host's takeover marks too
-- ARGV[9] max_reaps     most workers reaped in one call (each costs O(its sessions))
-- ARGV[10] free         the caller's free activity slots: with none, no mark is handed to it
--                       (they stay due for the next worker that sweeps)
-- ARGV[11] now_ms       Redis' time as the caller reckons it ('' or absent: ask Redis). It
--                       only finds what may be due: once anything is, Redis' own clock
--                       (TIME) decides, so a wrong guess acts late, never early
-- ARGV[12] deadlines    '1': look at the deadline index even if its earliest moment ('d'
--                       in `beats`) has not come (an earlier version's writer sets no 'd')
-- Returns {sessions expired, the time in ms it went by, {worker, sessions failed, ...}
-- reaped, {mark, ...} takeover marks for the caller ("o:<worker>", "h:<host_id>:<worker>"),
-- 1 if the audit is due (and now handed to the caller), 1 if that time is Redis' own}.
-- Cost: O(log n) when nothing is due (n: entries of the two indexes), 1 command (2 with
-- TIME, 3 more when the deadline index is looked at); per item due O(log n) plus, for a
-- dead worker, what reaping it costs (reap.lua), for a host's marks that come due O(marks).
-- @include slots
-- @include reap

local base, retention_ms, limit, me = ARGV[1], tonumber(ARGV[2]), tonumber(ARGV[3]), ARGV[4]
local may_reap, retry_ms, audit_ms = ARGV[5] == '1', tonumber(ARGV[6]), tonumber(ARGV[7])
local hid, max_reaps = ARGV[8] or '', tonumber(ARGV[9]) or 10
local can_take = (tonumber(ARGV[10]) or 1) > 0
local deadlines, beats = KEYS[1], KEYS[2]  -- the deadline index is looked at after the reaps
local now = tonumber(ARGV[11])
local timed = now == nil
if timed then now = now_ms() end
local expired, released, audit = 0, false, 0
local look_at_deadlines = ARGV[12] == '1'
local reaped, marks = {}, {}

-- The items of index `key` due now (at most `limit`; and whether there may be more). By
-- the caller's reckoning first (an idle queue's sweep then costs no TIME); once anything
-- is due, by Redis' clock, which decides from then on.
local function due(key)
  local found = redis.call('ZRANGEBYSCORE', key, '-inf', now, 'WITHSCORES', 'LIMIT', 0, limit)
  if #found > 0 and not timed then
    now, timed = now_ms(), true
  end
  local items = {}
  for i = 1, #found, 2 do
    if tonumber(found[i + 1]) <= now then items[#items + 1] = found[i] end
  end
  return items, #found >= 2 * limit
end

local due_beats, more = due(beats)
-- Items that stay due (marks nobody can take yet, reaps past max_reaps) must not hide 'd'.
if more and not look_at_deadlines then
  local d = redis.call('ZSCORE', beats, 'd')
  look_at_deadlines = d and tonumber(d) <= now or false
end
for _, item in ipairs(due_beats) do
  local kind, rest = string.sub(item, 1, 2), string.sub(item, 3)
  if kind == 'w:' then
    if rest ~= me and may_reap then
      local ttl = redis.call('PTTL', base .. 'alive:' .. rest)
      if ttl ~= -2 then
        -- Beating (or a key without a TTL, set by hand): not dead. Look again later.
        redis.call('ZADD', beats, now + math.max(ttl, retry_ms), item)
      elseif #reaped < 2 * max_reaps then
        local failed = reap(base, rest, '', false, now, retention_ms, can_take and marks or nil)
        if failed > 0 then
          reaped[#reaped + 1] = rest
          reaped[#reaped + 1] = failed - 1
        elseif not is_host(rest) then
          -- Reaped already, by a version that made no takeover mark: settle its consumer.
          local mark = settle_consumer(base, base .. 'tasks', rest, nil, now)
          if mark and can_take then marks[#marks + 1] = mark end
        end
        redis.call('ZREM', beats, item)
      end
    end
  elseif kind == 'o:' then
    -- Its own mark (it was declared dead, and is back) is left for another worker, whose
    -- claim sees it alive and drops the mark; registering again drops it too.
    if rest ~= me and can_take then marks[#marks + 1] = item end
  elseif kind == 'm:' then
    -- Its host's processes left entries of the host's stream (hmarks): handed to a process
    -- of that host only, and due again while any is left (claim_orphans drops each).
    if rest == hid and can_take then
      local left = redis.call('SMEMBERS', base .. 'hmarks:' .. hid)
      for _, w in ipairs(left) do
        if w ~= me then marks[#marks + 1] = 'h:' .. hid .. ':' .. w end
      end
      if #left == 0 then redis.call('ZREM', beats, item) else redis.call('ZADD', beats, now + retry_ms, item) end
    end
  elseif item == 'd' then
    look_at_deadlines = true  -- below, after the reaps (which may empty some of it)
  elseif item == 'scan' then
    audit = 1
    redis.call('ZADD', beats, now + audit_ms, item)
  else
    redis.call('ZREM', beats, item)
  end
end
-- What is due in the deadline index: looked at when its earliest moment ('d' in `beats`,
-- slots.lua add_deadline) came, or when the caller asks (every few passes: an entry an
-- earlier version wrote has no 'd'). Then 'd' is set to its next earliest moment.
if look_at_deadlines then
  for _, item in ipairs((due(deadlines))) do
    local kind, sid = string.sub(item, 1, 2), string.sub(item, 3)
    redis.call('ZREM', deadlines, item)
    if kind == 's:' then
      local rec = redis.call('HMGET', base .. 'session:' .. sid, 'state', 'worker', 'deadline')
      if rec[1] == 'OPEN' and tonumber(rec[3]) <= now then
        close_session(base, sid, rec[2], 'FAILED', 'execution timeout passed', now, retention_ms, 'expire')
        expired = expired + 1
      end
    elseif redis.call('ZSCORE', base .. 'waiters', sid) then
      local tickets = base .. 'tickets'
      local asked = redis.call('HGET', tickets, sid .. ':r')
      drop_ticket(base, sid, redis.call('HGET', tickets, sid .. ':t'))
      if asked and asked ~= '' then released = true end  -- what it kept is free for others
    end
  end
  local first = redis.call('ZRANGE', deadlines, 0, 0, 'WITHSCORES')
  if first[2] then redis.call('ZADD', beats, first[2], 'd') else redis.call('ZREM', beats, 'd') end
end

-- The marks handed out come due again later, for another worker if this one cannot finish
-- them (no free slot); claim_orphans removes each once nothing of its consumer is pending.
for _, mark in ipairs(marks) do
  if string.sub(mark, 1, 2) == 'o:' then redis.call('ZADD', beats, now + retry_ms, mark) end
end
if (expired > 0 or released) and redis.call('ZCARD', base .. 'waiters') > 0 then grant_waiters(base, now) end
return {expired, now, reaped, marks, audit, timed and 1 or 0}
