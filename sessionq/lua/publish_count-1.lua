-- Add to how many activities an open session ran (for inspect), only if the session's
-- record still exists: a plain HINCRBY would re-create a record Redis lost, without a TTL.
-- Each process of a host adds what it ran. Cost: O(1).
-- KEYS[1] session  the session's hash
-- ARGV[1] delta    activities the session ran here since the last call
-- Returns 1 when recorded, 0 when the record is gone.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HINCRBY', KEYS[1], 'activities', ARGV[1])
return 1
