-- Renew a worker's heartbeat, unless it was declared dead meanwhile. A heartbeat that
-- comes back after the key lapsed (a short partition nobody reaped) makes the worker's
-- free slots visible again, so the callers that queued meanwhile are served at once.
-- KEYS[1] workers  set of registered worker ids
-- KEYS[2] worker   this worker's hash
-- KEYS[3] alive    this worker's heartbeat key
-- KEYS[4] waiters  sorted set of waiting session ids
-- KEYS[5] guard    never exists: Redis will not start the script while the slot migrates (keys.py)
-- ARGV[1] worker_id
-- ARGV[2] hb_ms     the alive key's TTL
-- ARGV[3] running   activities running now (for inspect)
-- ARGV[4] done      activities finished since start (for inspect)
-- ARGV[5] base      the task queue's key prefix
-- Returns 1, or 0 when the worker is no longer registered (or its registration lost its
-- fields) and must register afresh.
-- @include slots

if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 or redis.call('HEXISTS', KEYS[2], 'max_sessions') == 0 then
  return 0
end
local was_alive = redis.call('EXISTS', KEYS[3])
local now = now_ms()
redis.call('SET', KEYS[3], '1', 'PX', tonumber(ARGV[2]))
redis.call('HSET', KEYS[2], 'beat', now, 'running', ARGV[3], 'done', ARGV[4])
if was_alive == 0 and redis.call('ZCARD', KEYS[4]) > 0 then grant_waiters(ARGV[5], now) end
return 1
