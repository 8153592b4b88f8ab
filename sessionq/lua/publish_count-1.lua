-- Record how many activities an open session ran (for inspect), only if the session's
-- record still exists: a plain HSET would re-create a record Redis lost, without a TTL.
-- Each process of a host records its own count in a field of its own (inspect adds them
-- up), so a resent call never counts twice. Cost: O(1).
-- KEYS[1] session  the session's hash
-- ARGV[1] count    activities the session ran here so far
-- ARGV[2] field    'activities', or 'activities:<worker_id>' for a host's process
-- Returns 1 when recorded, 0 when the record is gone.
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
redis.call('HSET', KEYS[1], ARGV[2] or 'activities', ARGV[1])
return 1
