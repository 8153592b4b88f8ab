-- End a session: complete it, expire it (execution timeout) or fail it. Releases its slot,
-- tells its worker to cancel the session's activities, and hands the slot to a waiter.
-- Idempotent: a session that is no longer OPEN is left as it is.
-- KEYS[1] session  the session's hash
-- KEYS[2] free     sorted set of session workers with a free slot
-- KEYS[3] waiters  list of waiting tickets
-- ARGV[1] base          the task queue's key prefix
-- ARGV[2] session_id
-- ARGV[3] mode          'complete' | 'expire' (only once the deadline passed) | 'fail'
-- ARGV[4] reason        text stored with a FAILED session
-- ARGV[5] retention_ms  how long the ended session's record stays for inspect
-- Returns {state_after, reason}; state 'MISSING' when there is no such session.
-- @include slots

local base, sid, mode, reason = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local rec = redis.call('HMGET', KEYS[1], 'state', 'worker', 'deadline', 'reason')
local state, w, deadline = rec[1], rec[2], tonumber(rec[3])
if not state then return {'MISSING', ''} end
if state ~= 'OPEN' then return {state, rec[4] or ''} end
local now = now_ms()
if mode == 'expire' and now < deadline then return {'OPEN', ''} end

local new_state = 'FAILED'
if mode == 'complete' then
  new_state = 'COMPLETED'
  reason = ''
end
redis.call('HSET', KEYS[1], 'state', new_state, 'reason', reason, 'ended', now)
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[5]))
redis.call('SREM', base .. 'wsessions:' .. w, sid)
release_slot(base, w)
redis.call('XADD', base .. 'w:' .. w, 'NOMKSTREAM', '*', 't', 'c', 's', sid, 'r', mode)
if redis.call('LLEN', KEYS[3]) > 0 then grant_waiters(base, now) end
return {new_state, reason}
