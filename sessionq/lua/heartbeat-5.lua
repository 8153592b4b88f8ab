-- Renew a worker's heartbeat, unless it was declared dead meanwhile. A heartbeat that
-- comes back after the key lapsed (a short partition nobody reaped) makes the worker's
-- free slots visible again, so the callers that queued meanwhile are served at once. A
-- host's process renews its host's keys too: the host's heartbeat key (its TTL adds the
-- restart grace) and 'up' (a process lives).
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
-- ARGV[6] host_id   '' for a worker that is its own host
-- ARGV[7] stopping  '1' once a host's process stops gracefully: it keeps the host's sessions
--                   alive while its activities finish, but no new session is placed for it
-- Returns 1, or 0 when the worker (or its host, past its grace) is no longer registered
-- (or its registration lost its fields) and must register afresh. Cost: O(1).
-- @include slots

local base, hb_ms, hid, stopping = ARGV[5], tonumber(ARGV[2]), ARGV[6] or '', ARGV[7] == '1'
if redis.call('SISMEMBER', KEYS[1], ARGV[1]) == 0 or redis.call('HEXISTS', KEYS[2], 'max_sessions') == 0 then
  return 0
end
local h = nil
if hid ~= '' then
  h = HOST_MARK .. hid
  local hk = base .. 'worker:' .. h
  if redis.call('SISMEMBER', KEYS[1], h) == 0 or redis.call('HEXISTS', hk, 'max_sessions') == 0
      or redis.call('EXISTS', base .. 'alive:' .. h) == 0 then
    return 0
  end
end
local serve = redis.call('EXISTS', KEYS[3]) == 0
local now = now_ms()
redis.call('SET', KEYS[3], '1', 'PX', hb_ms)
redis.call('HSET', KEYS[2], 'beat', now, 'running', ARGV[3], 'done', ARGV[4])
if h then
  local hk = base .. 'worker:' .. h
  local grace_ms = tonumber(redis.call('HGET', hk, 'grace_ms')) or 0
  redis.call('SET', base .. 'alive:' .. h, '1', 'PX', hb_ms + grace_ms)
  local up = host_key(base, 'up:', h)
  if stopping then
    redis.call('HSET', KEYS[2], 'stopping', 1)
    if not host_has_live_process(base, h, ARGV[1], true) then redis.call('DEL', up) end
  else
    if redis.call('EXISTS', up) == 0 then serve = true end
    redis.call('SET', up, '1', 'PX', hb_ms)
  end
  redis.call('SADD', host_key(base, 'hprocs:', h), ARGV[1])
  redis.call('HSET', hk, 'beat', now)
end
if serve and redis.call('ZCARD', KEYS[4]) > 0 then grant_waiters(base, now) end
return 1
