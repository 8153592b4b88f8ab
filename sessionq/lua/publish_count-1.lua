-- Record how many activities an open session ran (for inspect), only if the session's
-- record still exists: a plain HSET would re-create a record Redis lost, without a TTL.
-- KEYS[1] session  the session's hash
-- ARGV[1] count    activities the session ran so far
-- Returns 1 when recorded, 0 when the record is gone.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], 'activities', ARGV[1])
return 1
