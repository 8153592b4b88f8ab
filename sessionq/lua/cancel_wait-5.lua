-- A waiting caller gives up (creation timeout or cancellation): leave the line, unless
-- a slot was already granted, in which case the caller takes the session after all.
-- Leaving hands what it kept (session resources) to the requests behind it.
-- KEYS[1] waiters    sorted set of waiting session ids
-- KEYS[2] tickets    hash of the waiting tickets' attributes
-- KEYS[3] deadlines  sorted set of session and ticket deadlines (and, built from base,
--                    its earliest moment as 'd' in `beats`: slots.lua add_deadline)
-- KEYS[4] session    the hash of the session the ticket asked for
-- KEYS[5] guard      never exists: Redis will not start the script while the slot migrates (keys.py)
-- ARGV[1] base        the task queue's key prefix
-- ARGV[2] session_id  the ticket's session id
-- Returns 'LEFT' (no session was made), 'GRANTED' (session exists: the grant is in the
-- inbox) or 'GONE' (the ticket was dropped: expired, or its recreate target died).
-- Cost: O(log n); a ticket that kept resources also grants waiters (slots.lua).
-- @include slots

local base, sid = ARGV[1], ARGV[2]
if redis.call('ZSCORE', KEYS[1], sid) then
  local asked = redis.call('HGET', KEYS[2], sid .. ':r')
  drop_ticket(base, sid, redis.call('HGET', KEYS[2], sid .. ':t'))
  -- What it kept for itself (session resources) is free for the requests behind it now.
  if asked and asked ~= '' and redis.call('ZCARD', KEYS[1]) > 0 then grant_waiters(base, now_ms()) end
  return 'LEFT'
end
if redis.call('EXISTS', KEYS[4]) == 1 then return 'GRANTED' end
return 'GONE'
