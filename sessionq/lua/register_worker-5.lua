-- Register a worker (at start, and again after it lost Redis or was declared dead).
-- KEYS[1] workers  set of registered worker ids
-- KEYS[2] worker   this worker's hash
-- KEYS[3] alive    this worker's heartbeat key
-- KEYS[4] stream   this worker's own stream
-- KEYS[5] guard    never exists: Redis will not start the script while the slot migrates (keys.py)
-- ARGV[1] base          the task queue's key prefix
-- ARGV[2] worker_id
-- ARGV[3] hb_ms         heartbeat timeout: the alive key's TTL
-- ARGV[4] max_sessions  0 = unlimited, -1 = sessions disabled
-- ARGV[5..] field, value pairs describing the worker (host, pid, identity, ...)
-- Returns 'FRESH' when registered anew (any earlier sessions are gone), 'KNOWN' when the
-- registration survived (only the heartbeat was renewed).
-- @include slots

local base, w, hb_ms, cap = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
if redis.call('HEXISTS', KEYS[2], 'max_sessions') == 1 and redis.call('SISMEMBER', KEYS[1], w) == 1 then
  local was_alive = redis.call('EXISTS', KEYS[3])
  redis.call('SET', KEYS[3], '1', 'PX', hb_ms)
  -- Back before anyone reaped it: its free slots are visible again, serve who queued meanwhile.
  if was_alive == 0 and redis.call('ZCARD', base .. 'waiters') > 0 then grant_waiters(base, now_ms()) end
  return 'KNOWN'
end
local now = now_ms()
local fields = {}
for i = 5, #ARGV do fields[#fields + 1] = ARGV[i] end
redis.call('DEL', KEYS[2], KEYS[4], base .. 'wsessions:' .. w)
redis.call('HSET', KEYS[2], 'max_sessions', cap, 'hb_ms', hb_ms, 'open', 0,
  'registered', now, 'beat', now, (unpack or table.unpack)(fields))
redis.call('SADD', KEYS[1], w)
redis.call('SET', KEYS[3], '1', 'PX', hb_ms)
-- The stream must exist: callers send with NOMKSTREAM, so a reaped worker gets nothing.
redis.call('XADD', KEYS[4], '*', 't', 'h')
if cap >= 0 then
  redis.call('ZADD', base .. 'free', 0, w)
  if redis.call('ZCARD', base .. 'waiters') > 0 then grant_waiters(base, now) end
end
return 'FRESH'
