-- Renew a worker's heartbeat, unless it was declared dead meanwhile.
-- KEYS[1] workers  set of registered worker ids
-- KEYS[2] worker   this worker's hash
-- KEYS[3] alive    this worker's heartbeat key
-- ARGV[1] worker_id
-- ARGV[2] hb_ms     the alive key's TTL
-- ARGV[3] running   activities running now (for inspect)
-- ARGV[4] done      activities finished since start (for inspect)
-- Returns 1, or 0 when the worker is no longer registered and must register afresh.
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 or redis.call('EXISTS', KEYS[2]) == 0 then
  return 0
end
local t = redis.call('TIME')
redis.call('SET', KEYS[3], '1', 'PX', tonumber(ARGV[2]))
redis.call('HSET', KEYS[2], 'beat', tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000),
  'running', ARGV[3], 'done', ARGV[4])
return 1
