-- Shared by every script that opens, ends or hands over session slots.
-- Per-worker and per-session keys are built from `base`, the task queue's key prefix,
-- which carries the queue's hash tag ({queue}); so they share the slot of the KEYS.
-- Layout mirrors sessionq/keys.py.

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- Split s on a one-character plain separator, keeping empty pieces.
local function split(s, sep)
  local out, start = {}, 1
  while true do
    local i = string.find(s, sep, start, true)
    if not i then
      out[#out + 1] = string.sub(s, start)
      return out
    end
    out[#out + 1] = string.sub(s, start, i - 1)
    start = i + 1
  end
end

-- The load of worker w if it is alive and has a free slot, else nil.
local function free_load(base, w)
  local load = redis.call('ZSCORE', base .. 'free', w)
  if not load then return nil end
  if redis.call('EXISTS', base .. 'alive:' .. w) == 0 then return nil end
  return tonumber(load)
end

-- The least loaded live worker with a free slot, else nil.
local function pick_worker(base)
  local candidates = redis.call('ZRANGE', base .. 'free', 0, 63)
  for _, w in ipairs(candidates) do
    if redis.call('EXISTS', base .. 'alive:' .. w) == 1 then return w end
  end
  return nil
end

-- Open session sid on worker w: count the slot, write the record, tell the worker.
-- Returns {host, deadline, hb_ms}.
local function open_session(base, w, sid, exec_ms, now, owner)
  local wk = base .. 'worker:' .. w
  local info = redis.call('HMGET', wk, 'max_sessions', 'host', 'hb_ms')
  local cap = tonumber(info[1]) or 0
  local open = redis.call('HINCRBY', wk, 'open', 1)
  if cap > 0 and open >= cap then
    redis.call('ZREM', base .. 'free', w)
  else
    redis.call('ZADD', base .. 'free', open, w)
  end
  local deadline = now + exec_ms
  redis.call('HSET', base .. 'session:' .. sid,
    'worker', w, 'host', info[2], 'state', 'OPEN', 'created', now,
    'deadline', deadline, 'exec_ms', exec_ms, 'hb_ms', info[3], 'owner', owner)
  redis.call('SADD', base .. 'wsessions:' .. w, sid)
  redis.call('XADD', base .. 'w:' .. w, 'NOMKSTREAM', '*', 't', 'o', 's', sid, 'x', exec_ms)
  return {info[2] or '', deadline, info[3] or 0}
end

-- Give a slot back on worker w (if it is still registered).
local function release_slot(base, w)
  local wk = base .. 'worker:' .. w
  if redis.call('EXISTS', wk) == 0 then return end
  local open = redis.call('HINCRBY', wk, 'open', -1)
  if open < 0 then
    redis.call('HSET', wk, 'open', 0)
    open = 0
  end
  if tonumber(redis.call('HGET', wk, 'max_sessions') or '-1') >= 0 then
    redis.call('ZADD', base .. 'free', open, w)
  end
end

-- Tell a waiting caller, through its inbox stream, that it got a session or why it
-- cannot: fields is {'g', sid, 'w', worker, ...} or {'x', sid, 'm', reason}. NOMKSTREAM:
-- the inbox belongs to its client (which made it, with a TTL); a client gone takes nothing.
local function notify(base, client, fields)
  redis.call('XADD', base .. 'inbox:' .. client, 'NOMKSTREAM', '*', (unpack or table.unpack)(fields))
end

-- Hand free slots to waiting callers, first come first served.
-- Ticket: sid|client|exec_ms|wait_deadline_ms|target_worker|owner (target '' = any worker).
local function grant_waiters(base, now)
  local waiters = base .. 'waiters'
  local tickets = redis.call('LRANGE', waiters, 0, 255)
  local any_blocked = false
  for _, ticket in ipairs(tickets) do
    local f = split(ticket, '|')
    local sid, client, exec_ms, deadline, target = f[1], f[2], tonumber(f[3]), tonumber(f[4]), f[5]
    if deadline < now then
      redis.call('LREM', waiters, 1, ticket)
    else
      local w = nil
      if target == '' then
        if not any_blocked then
          w = pick_worker(base)
          if not w then any_blocked = true end
        end
      elseif free_load(base, target) then
        w = target
      end
      if w then
        local opened = open_session(base, w, sid, exec_ms, now, f[6] or '')
        redis.call('LREM', waiters, 1, ticket)
        notify(base, client, {'g', sid, 'w', w, 'h', opened[1], 'd', opened[2], 'b', opened[3]})
      end
    end
  end
end
