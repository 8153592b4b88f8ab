-- Register a worker (at start, and again after it lost Redis or was declared dead). A
-- worker process that belongs to a host also registers the host, or joins it: the host is
-- placed, counted and watched like one worker under the id 'host=<host_id>' (slots.lua).
-- KEYS[1] workers  set of registered worker ids
-- KEYS[2] worker   this worker's hash
-- KEYS[3] alive    this worker's heartbeat key
-- KEYS[4] stream   this worker's own stream
-- KEYS[5] guard    never exists: Redis will not start the script while the slot migrates (keys.py)
-- ARGV[1] base          the task queue's key prefix
-- ARGV[2] worker_id
-- ARGV[3] hb_ms         heartbeat timeout: the alive key's TTL
-- ARGV[4] max_sessions  0 = unlimited, -1 = sessions disabled (a host's limit, for a host's process)
-- ARGV[5] host_id       '' for a worker that is its own host
-- ARGV[6] grace_ms      the host's restart grace (ignored without host_id)
-- ARGV[7] retention_ms  how long ended session records stay (of a record that was lost)
-- ARGV[8] audit_ms      when the queue's first audit is due, if none is planned (reap.lua)
-- ARGV[9..] field, value pairs describing the worker (host, pid, identity, ...)
-- Returns {status, host_status}. status: 'FRESH' when registered anew (any earlier
-- sessions are gone), 'KNOWN' when the registration survived (only the heartbeat was
-- renewed). host_status: '' (no host), 'NEW' (the host was made: no session of an earlier
-- one survives), 'JOINED'. Or {'CONFLICT', max_sessions, grace_ms, hb_ms, res}: a live process
-- of the host runs with other values (nothing was written); or {'REAP'}: the host's grace
-- passed and it awaits its reaper (reap it, then register again).
-- Either way the worker's heartbeat deadline ("w:<worker>" in `beats`, reap.lua) is set:
-- its heartbeats move it, the sweep reaps the worker once it passes; and takeover marks
-- of its own (made while it was declared dead) are dropped: it walks its pending list itself.
-- Cost: O(processes of the host + log n), plus granting waiters (slots.lua), plus O(sessions)
-- an earlier registration of the same identity still counted (none unless its record was lost).
-- @include slots

local base, w, hb_ms, cap = ARGV[1], ARGV[2], tonumber(ARGV[3]), tonumber(ARGV[4])
local hid, grace_ms, retention_ms = ARGV[5], tonumber(ARGV[6]), tonumber(ARGV[7])
local h = nil
if hid ~= '' then h = HOST_MARK .. hid end
local hk = h and (base .. 'worker:' .. h)

-- A field of the worker's description (ARGV[9..]), or ''.
local function field_of(name)
  for i = 9, #ARGV - 1, 2 do
    if ARGV[i] == name then return ARGV[i + 1] end
  end
  return ''
end

local host_known = false
if h and redis.call('EXISTS', hk) == 1 then
  if redis.call('EXISTS', base .. 'alive:' .. h) == 0 then return {'REAP'} end
  host_known = redis.call('HEXISTS', hk, 'max_sessions') == 1 and redis.call('SISMEMBER', KEYS[1], h) == 1
  if host_known then
    local was = redis.call('HMGET', hk, 'max_sessions', 'grace_ms', 'hb_ms', 'res')
    if (tonumber(was[1]) ~= cap or tonumber(was[2]) ~= grace_ms or tonumber(was[3]) ~= hb_ms
        or (was[4] or '') ~= field_of('res')) and host_has_live_process(base, h, w) then
      return {'CONFLICT', was[1], was[2], was[3], was[4] or ''}
    end
  end
end

local now = now_ms()
local own_cap = cap
if h then own_cap = -1 end  -- a host's process is never placed on by itself
local status = 'KNOWN'
local serve = false
if redis.call('HEXISTS', KEYS[2], 'max_sessions') == 1 and redis.call('SISMEMBER', KEYS[1], w) == 1 then
  -- Back before anyone reaped it: its free slots are visible again, serve who queued meanwhile.
  serve = redis.call('EXISTS', KEYS[3]) == 0
  redis.call('SET', KEYS[3], '1', 'PX', hb_ms)
else
  status = 'FRESH'
  local fields = {}
  for i = 9, #ARGV do fields[#fields + 1] = ARGV[i] end
  index_resources(base, w, redis.call('HGET', KEYS[2], 'res'), false)  -- what an earlier record offered
  -- Sessions an earlier registration of this identity still counts (its record was lost:
  -- evicted, deleted by hand) fail here: nothing else would end them (slots.lua open_session).
  fail_open_sessions(base, w, 'worker ' .. w .. ' registered anew (its record in Redis was lost)', now,
    retention_ms)
  redis.call('DEL', KEYS[2], KEYS[4], base .. 'wsessions:' .. w)
  redis.call('HSET', KEYS[2], 'max_sessions', own_cap, 'hb_ms', hb_ms, 'open', 0,
    'registered', now, 'beat', now, (unpack or table.unpack)(fields))
  if h then redis.call('HSET', KEYS[2], 'hid', hid) end
  redis.call('SADD', KEYS[1], w)
  redis.call('SET', KEYS[3], '1', 'PX', hb_ms)
  -- The stream must exist: callers send with NOMKSTREAM, so a reaped worker gets nothing.
  redis.call('XADD', KEYS[4], '*', 't', 'h')
  if own_cap >= 0 then
    redis.call('ZADD', base .. 'free', 0, w)
    serve = true
  end
end

-- Placement with resources looks at the workers offering them (slots.lua index_resources),
-- as the record says (a KNOWN registration keeps its record).
local mine = redis.call('HMGET', KEYS[2], 'max_sessions', 'res')
if (tonumber(mine[1]) or -1) >= 0 then index_resources(base, w, mine[2], true) end

local beats = base .. 'beats'
-- The queue's first worker (again) audits at once: what the last one left is taken over.
if redis.call('ZCARD', beats) == 0 then redis.call('ZADD', beats, now, 'scan') end
redis.call('ZADD', beats, now + hb_ms, 'w:' .. w)
redis.call('ZADD', beats, 'NX', now + tonumber(ARGV[8]), 'scan')
redis.call('ZREM', beats, 'o:' .. w)
if hid ~= '' then redis.call('SREM', base .. 'hmarks:' .. hid, w) end

local host_status = ''
if h then
  if host_known then
    host_status = 'JOINED'
    -- The same values, or no live process disagrees.
    index_resources(base, h, redis.call('HGET', hk, 'res'), false)  -- indexed again below
    redis.call('HSET', hk, 'max_sessions', cap, 'grace_ms', grace_ms, 'hb_ms', hb_ms, 'res', field_of('res'))
  else
    host_status = 'NEW'
    local machine = field_of('host')
    -- A record that lost its fields (evicted, deleted by hand) leaves sessions nobody counts.
    fail_open_sessions(base, h, 'the record of host ' .. hid .. ' was lost from Redis', now, retention_ms)
    index_resources(base, h, redis.call('HGET', hk, 'res'), false)
    -- Its live processes stay its processes (they hear of its sessions, their cancels and
    -- ends: slots.lua tell); their beats add them only when they renew the host's keys.
    local procs = host_key(base, 'hprocs:', h)
    local live = {}
    for _, p in ipairs(redis.call('SMEMBERS', procs)) do
      if p ~= w and redis.call('EXISTS', base .. 'alive:' .. p) == 1
          and redis.call('HGET', base .. 'worker:' .. p, 'hid') == hid then
        live[#live + 1] = p
      end
    end
    redis.call('DEL', hk, base .. 'w:' .. h, base .. 'wsessions:' .. h, procs)
    if #live > 0 then redis.call('SADD', procs, (unpack or table.unpack)(live)) end
    redis.call('HSET', hk, 'max_sessions', cap, 'hb_ms', hb_ms, 'open', 0, 'registered', now, 'beat', now,
      'grace_ms', grace_ms, 'host', machine, 'host_id', hid, 'identity', h, 'res', field_of('res'))
    redis.call('SADD', KEYS[1], h)
    -- The host's stream: its sessions' activities, read through the group by its processes.
    redis.call('XGROUP', 'CREATE', base .. 'w:' .. h, 'workers', '0', 'MKSTREAM')
  end
  redis.call('SADD', host_key(base, 'hprocs:', h), w)
  local up_ms = host_lease_ms(base, h, hb_ms)  -- as heartbeat.lua renews them
  redis.call('SET', base .. 'alive:' .. h, '1', 'PX', up_ms + grace_ms)
  redis.call('ZADD', beats, now + up_ms + grace_ms, 'w:' .. h)
  redis.call('SET', host_key(base, 'up:', h), '1', 'PX', up_ms)
  redis.call('HSET', hk, 'beat', now)
  if cap >= 0 then
    index_resources(base, h, field_of('res'), true)
    local open = tonumber(redis.call('HGET', hk, 'open')) or 0
    if cap == 0 or open < cap then redis.call('ZADD', base .. 'free', open, h) else redis.call('ZREM', base .. 'free', h) end
  end
  serve = true
end
if serve and redis.call('ZCARD', base .. 'waiters') > 0 then grant_waiters(base, now) end
return {status, host_status}
