-- Do what is due, on Redis' clock (run by every live worker's housekeeping; idempotent):
-- fail sessions past their execution deadline (whether or not their worker's own timer
-- fired: its clock may be off, or it may be gone), drop tickets whose wait is over, reap
-- workers whose heartbeat deadline passed and whose heartbeat key is gone, and hand the
-- caller the takeover marks and the audit that are due (reap.lua says what they are).
-- KEYS[1] deadlines  sorted set of what is due when (reap.lua)
-- KEYS[2] guard      never exists: Redis will not start the script while the slot migrates (keys.py)
-- ARGV[1] base          the task queue's key prefix
-- ARGV[2] retention_ms  how long ended session records stay for inspect
-- ARGV[3] limit         most items handled in one call
-- ARGV[4] me            the calling worker (it never reaps itself)
-- ARGV[5] may_reap      '0' while the caller's own heartbeat fails: whatever cut it off
--                       likely cut the others off too, and they are about to beat again
-- ARGV[6] retry_ms      a takeover mark handed out comes due again this much later (in case
--                       its taker cannot finish it)
-- ARGV[7] audit_ms      the next audit is due this much after this one
-- Returns {sessions expired, Redis' time in ms, {worker, sessions failed, ...} reaped,
-- {mark, ...} takeover marks due, 1 if the audit is due (and now handed to the caller)}.
-- Cost: O(log n) when nothing is due (n: sessions + tickets + workers); else per item due
-- O(log n) plus, for a dead worker, what reaping it costs (reap.lua).
-- @include slots
-- @include reap

local base, retention_ms, me = ARGV[1], tonumber(ARGV[2]), ARGV[4]
local may_reap, retry_ms, audit_ms = ARGV[5] == '1', tonumber(ARGV[6]), tonumber(ARGV[7])
local deadlines = KEYS[1]
local now = now_ms()
local expired, released, audit = 0, false, 0
local reaped, marks = {}, {}
for _, item in ipairs(redis.call('ZRANGEBYSCORE', deadlines, '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))) do
  local kind, rest = string.sub(item, 1, 2), string.sub(item, 3)
  if kind == 's:' then
    redis.call('ZREM', deadlines, item)
    local rec = redis.call('HMGET', base .. 'session:' .. rest, 'state', 'worker', 'deadline')
    if rec[1] == 'OPEN' and tonumber(rec[3]) <= now then
      close_session(base, rest, rec[2], 'FAILED', 'execution timeout passed', now, retention_ms, 'expire')
      expired = expired + 1
    end
  elseif kind == 't:' then
    redis.call('ZREM', deadlines, item)
    if redis.call('ZSCORE', base .. 'waiters', rest) then
      local tickets = base .. 'tickets'
      local asked = redis.call('HGET', tickets, rest .. ':r')
      drop_ticket(base, rest, redis.call('HGET', tickets, rest .. ':t'))
      if asked and asked ~= '' then released = true end  -- what it kept is free for others
    end
  elseif kind == 'w:' then
    if rest ~= me and may_reap then
      local ttl = redis.call('PTTL', base .. 'alive:' .. rest)
      if ttl > 0 then
        redis.call('ZADD', deadlines, now + ttl, item)  -- beating (an older version does not move it)
      else
        local failed = reap(base, rest, '', false, now, retention_ms, marks)
        if failed > 0 then
          reaped[#reaped + 1] = rest
          reaped[#reaped + 1] = failed - 1
        end
        redis.call('ZREM', deadlines, item)
      end
    end
  elseif kind == 'o:' or kind == 'h:' then
    marks[#marks + 1] = item
  elseif item == 'scan' then
    audit = 1
    redis.call('ZADD', deadlines, now + audit_ms, item)
  else
    redis.call('ZREM', deadlines, item)
  end
end
for _, mark in ipairs(marks) do redis.call('ZADD', deadlines, now + retry_ms, mark) end
if (expired > 0 or released) and redis.call('ZCARD', base .. 'waiters') > 0 then grant_waiters(base, now) end
return {expired, now, reaped, marks, audit}
