-- A waiting caller gives up (creation timeout or cancellation): leave the queue, unless
-- a slot was already granted, in which case the caller takes the session after all.
-- KEYS[1] waiters  list of waiting tickets
-- KEYS[2] session  the hash of the session the ticket asked for
-- ARGV[1] ticket   exactly as create_session returned it
-- Returns 'LEFT' (no session was made), 'GRANTED' (session exists: the grant is in the
-- inbox) or 'GONE' (ticket was dropped, e.g. its recreate target died).
if redis.call('LREM', KEYS[1], 1, ARGV[1]) == 1 then return 'LEFT' end
if redis.call('EXISTS', KEYS[2]) == 1 then return 'GRANTED' end
return 'GONE'
