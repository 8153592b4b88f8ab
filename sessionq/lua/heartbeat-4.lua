-- Renew a worker's heartbeat, unless it was declared dead meanwhile. A heartbeat that
-- comes back after the key lapsed (a short partition nobody reaped) makes the worker's
-- free slots visible again, so the callers that queued meanwhile are served at once. A
-- host's process renews its host's keys too: the host's heartbeat key (its TTL adds the
-- restart grace) and 'up' (a process lives). Each beat also moves the worker's heartbeat
-- deadline in `beats` ("w:<worker>", reap.lua): that entry is the registration mark the
-- beat checks, and the sweep's way to find dead workers without looking at all.
-- An idle worker's beat runs 2 commands besides EVALSHA (ZADD, SET): the time comes from
-- the worker (Redis' clock as it last learnt it, on a monotonic clock), and a record that
-- lost its fields is found where it matters, when a session would be placed on it or give
-- its slot back, or by the queue's audit: each removes the heartbeat deadline (slots.lua).
-- KEYS[1] beats      sorted set of heartbeat deadlines (reap.lua)
-- KEYS[2] worker     this worker's hash
-- KEYS[3] alive      this worker's heartbeat key
-- KEYS[4] guard      never exists: Redis will not start the script while the slot migrates (keys.py)
-- ARGV[1] worker_id
-- ARGV[2] hb_ms     the alive key's TTL
-- ARGV[3] running   activities running now (for inspect); '' when unchanged since the last beat
-- ARGV[4] done      activities finished since start (for inspect)
-- ARGV[5] base      the task queue's key prefix
-- ARGV[6] host_id   '' for a worker that is its own host
-- ARGV[7] stopping  '1' once a host's process stops gracefully: it keeps the host's sessions
--                   alive while its activities finish, but no new session is placed for it
-- ARGV[8] now_ms    Redis' time as the worker reckons it (re-learnt every 6th sweep and after a failure)
-- ARGV[9] waiting   activities waiting inside the worker for a slot (for inspect; with ARGV[3])
-- ARGV[10] grace_ms a host's restart grace (its processes agree on it: register_worker.lua)
-- Returns 1, or 0 when the worker (or its host, past its grace) is no longer registered
-- and must register afresh (its record is checked when its key had lapsed: an earlier
-- version's reap leaves the heartbeat deadline behind). Cost: O(log n) (n: entries of
-- `beats`), plus granting waiters when it comes back (slots.lua). A host's process sends
-- one more command (PTTL of 'up'): the host's keys are renewed once per host, by the first
-- of its processes to beat when 'up' was renewed more than a quarter of hb_ms ago (or is
-- gone), so a host of K processes costs about what one process costs, not K times. That
-- beat sends 7 more (SCARD, HEXISTS, SET, ZADD, SET, SADD, HSET): its host's record is
-- checked, and the host's key (renewed only if there: SET XX), deadline, 'up' (SET GET:
-- was it there?), process set and record's beat are renewed. They are renewed together
-- (register_worker.lua too), so a fresh 'up' vouches for the rest; with more than one
-- process they last a quarter of hb_ms longer (slots.lua host_lease_ms), so they outlive
-- the heartbeat key of every process that beat meanwhile (a skipped renewal found more
-- than hb_ms left), and a lone process renews them on every beat, for hb_ms, as before. A
-- stopping process always takes the full path ('up' may have to go).
-- @include slots

local base, hb_ms, hid, stopping = ARGV[5], tonumber(ARGV[2]), ARGV[6] or '', ARGV[7] == '1'
local beats = KEYS[1]
local now = tonumber(ARGV[8]) or now_ms()
-- XX: only a registered worker has the entry (CH: 1 when moved; a beat within the same ms
-- as the last one moves nothing, so ask then).
if redis.call('ZADD', beats, 'XX', 'CH', now + hb_ms, 'w:' .. ARGV[1]) == 0
    and not redis.call('ZSCORE', beats, 'w:' .. ARGV[1]) then
  return 0
end
local h = nil
local grace_ms = tonumber(ARGV[10]) or 0
local up_ms = hb_ms
if hid ~= '' and (stopping or redis.call('PTTL', base .. 'up:' .. hid) <= hb_ms) then
  h = HOST_MARK .. hid
  up_ms = host_lease_ms(base, h, hb_ms)
  -- Its record lost its fields (evicted, deleted by hand), or its key lapsed (reaped, its
  -- grace passed): register again (the key is renewed only if it is there).
  if redis.call('HEXISTS', base .. 'worker:' .. h, 'max_sessions') == 0
      or not redis.call('SET', base .. 'alive:' .. h, '1', 'PX', up_ms + grace_ms, 'XX') then
    return 0
  end
end
local serve = not redis.call('SET', KEYS[3], '1', 'PX', hb_ms, 'GET')
if serve and (redis.call('HEXISTS', KEYS[2], 'max_sessions') == 0
    or redis.call('SISMEMBER', base .. 'workers', ARGV[1]) == 0) then
  -- Its key had lapsed and it was reaped meanwhile, by a version that left this entry.
  redis.call('ZREM', beats, 'w:' .. ARGV[1])
  redis.call('DEL', KEYS[3])
  return 0
end
if ARGV[3] ~= '' then
  redis.call('HSET', KEYS[2], 'beat', now, 'running', ARGV[3], 'done', ARGV[4], 'waiting', ARGV[9] or 0)
end
if h then
  local hk = base .. 'worker:' .. h
  redis.call('ZADD', beats, now + up_ms + grace_ms, 'w:' .. h)
  local up = host_key(base, 'up:', h)
  if stopping then
    redis.call('HSET', KEYS[2], 'stopping', 1)
    if not host_has_live_process(base, h, ARGV[1], true) then redis.call('DEL', up) end
  else
    if not redis.call('SET', up, '1', 'PX', up_ms, 'GET') then serve = true end
  end
  redis.call('SADD', host_key(base, 'hprocs:', h), ARGV[1])
  redis.call('HSET', hk, 'beat', now)
end
if serve and redis.call('ZCARD', base .. 'waiters') > 0 then grant_waiters(base, now_ms()) end
return 1
