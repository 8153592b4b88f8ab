-- Make a client's inbox stream if it does not exist, and renew its TTL. Writers append
-- with NOMKSTREAM, so only its owner (the client) ever creates it, always with a TTL.
-- KEYS[1] inbox   the client's inbox stream on one task queue
-- ARGV[1] ttl_ms  how long the inbox outlives its client's last renewal
-- ARGV[2] token   new for each opening the client attempts (the same when it resends one)
-- Returns 1 when this opening made the inbox (first use, or it was lost: a resent call
-- whose first reply was lost still says so, by the token of the marker it left), else 0.
-- Cost: O(1).
local made = 0
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('XADD', KEYS[1], '*', 'o', ARGV[2])  -- the marker: the reader skips it
  made = 1
else
  local first = redis.call('XRANGE', KEYS[1], '-', '+', 'COUNT', 1)[1]
  if first and first[2][1] == 'o' and first[2][2] == ARGV[2] then made = 1 end
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]))
return made
