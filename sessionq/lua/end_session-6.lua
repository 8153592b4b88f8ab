-- End a session: complete it, expire it (execution timeout), fail it, or fail it because
-- its owner went away. Releases its slot, tells its worker to cancel the session's
-- activities, and hands the slot to a waiter. Idempotent: a session no longer OPEN is left
-- as it is.
-- KEYS[1] session    the session's hash
-- KEYS[2] free       sorted set of session workers with a free slot
-- KEYS[3] waiters    sorted set of waiting session ids
-- KEYS[4] tickets    hash of the waiting tickets' attributes
-- KEYS[5] deadlines  sorted set of session and ticket deadlines (and, built from base,
--                    its earliest moment as 'd' in `beats`: slots.lua add_deadline)
-- KEYS[6] guard      never exists: Redis will not start the script while the slot migrates (keys.py)
-- ARGV[1] base          the task queue's key prefix
-- ARGV[2] session_id
-- ARGV[3] mode          'complete' | 'fail' | 'expire' (only once the deadline passed, on
--                       Redis' clock) | 'owner' (only once the owner's lease lapsed)
-- ARGV[4] reason        text stored with a FAILED session
-- ARGV[5] retention_ms  how long the ended session's record stays for inspect
-- Returns {state_after, reason, ms_left}: state 'MISSING' when there is no such session;
-- 'OPEN' with the ms left to the deadline when 'expire' came early (or 0 for 'owner').
-- Cost: O(log n), plus handing the slot to the next waiter (slots.lua grant_waiters).
-- @include slots

local base, sid, mode, reason = ARGV[1], ARGV[2], ARGV[3], ARGV[4]
local rec = redis.call('HMGET', KEYS[1], 'state', 'worker', 'deadline', 'reason', 'client', 'owner_ms')
local state, w, deadline = rec[1], rec[2], tonumber(rec[3])
if not state then return {'MISSING', '', 0} end
if state ~= 'OPEN' then return {state, rec[4] or '', 0} end
local now = now_ms()
if mode == 'expire' and now < deadline then return {'OPEN', '', deadline - now} end
if mode == 'owner' then
  local owner_ms = tonumber(rec[6]) or 0
  if owner_ms <= 0 or not rec[5] or lease_fresh(base, rec[5], now, owner_ms) then return {'OPEN', '', 0} end
end

local new_state = 'FAILED'
if mode == 'complete' then
  new_state = 'COMPLETED'
  reason = ''
end
close_session(base, sid, w, new_state, reason, now, tonumber(ARGV[5]), mode)
if redis.call('ZCARD', KEYS[3]) > 0 then grant_waiters(base, now) end
return {new_state, reason, 0}
