-- Do what is due, on Redis' clock: fail sessions past their execution deadline (whether or
-- not their worker's own timer fired: its clock may be off, or it may be gone) and drop
-- tickets whose wait is over. Run by every live worker's housekeeping; idempotent.
-- KEYS[1] deadlines  sorted set: "s:<sid>" at a session's deadline, "t:<sid>" at a ticket's
-- KEYS[2] free       sorted set of session workers with a free slot
-- KEYS[3] waiters    sorted set of waiting session ids
-- KEYS[4] tickets    hash of the waiting tickets' attributes
-- KEYS[5] guard      never exists: Redis will not start the script while the slot migrates (keys.py)
-- ARGV[1] base          the task queue's key prefix
-- ARGV[2] retention_ms  how long ended session records stay for inspect
-- ARGV[3] limit         most items handled in one call
-- Returns the number of sessions expired.
-- @include slots

local base = ARGV[1]
local now = now_ms()
local expired = 0
local released = false
for _, item in ipairs(redis.call('ZRANGEBYSCORE', KEYS[1], '-inf', now, 'LIMIT', 0, tonumber(ARGV[3]))) do
  local kind, sid = string.sub(item, 1, 1), string.sub(item, 3)
  redis.call('ZREM', KEYS[1], item)
  if kind == 's' then
    local rec = redis.call('HMGET', base .. 'session:' .. sid, 'state', 'worker', 'deadline')
    if rec[1] == 'OPEN' and tonumber(rec[3]) <= now then
      close_session(base, sid, rec[2], 'FAILED', 'execution timeout passed', now, tonumber(ARGV[2]), 'expire')
      expired = expired + 1
    end
  elseif redis.call('ZSCORE', KEYS[3], sid) then
    local asked = redis.call('HGET', KEYS[4], sid .. ':r')
    drop_ticket(base, sid, redis.call('HGET', KEYS[4], sid .. ':t'))
    if asked and asked ~= '' then released = true end  -- what it kept is free for others
  end
end
if (expired > 0 or released) and redis.call('ZCARD', KEYS[3]) > 0 then grant_waiters(base, now) end
return expired
