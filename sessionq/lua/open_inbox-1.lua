-- Make a client's inbox stream if it does not exist, and renew its TTL. Writers append
-- with NOMKSTREAM, so only its owner (the client) ever creates it, always with a TTL.
-- KEYS[1] inbox   the client's inbox stream on one task queue
-- ARGV[1] ttl_ms  how long the inbox outlives its client's last renewal
-- Returns 1 when the inbox was made now (first use, or it was lost), 0 when it was there.
local made = 0
if redis.call('EXISTS', KEYS[1]) == 0 then
  redis.call('XADD', KEYS[1], 'MAXLEN', '0', '*', 'o', '')  -- an empty stream
  made = 1
end
redis.call('PEXPIRE', KEYS[1], tonumber(ARGV[1]))
return made
