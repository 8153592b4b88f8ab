-- Declaring a worker dead (reap_worker, and the sweep when a heartbeat deadline passed).
-- Needs slots.lua. Keys are built from `base`: the scripts that include this declare the
-- `guard` key. Besides each worker's record, two indexes serve it (keys.py):
--   `beats`, a sorted set on Redis' clock (kept apart from `deadlines`, which an earlier
--   version's sweep empties of whatever is due):
--     "w:<worker>"  when its heartbeat key expires (each beat moves it), so the sweep finds
--                   a dead worker in O(log n), never by looking at every worker;
--     "o:<worker>"  a takeover mark: a reaped worker left entries of the shared stream in
--                   its pending list; a live worker takes them over (claim_orphans);
--     "scan"        when a worker next audits the whole queue (housekeeping.py);
--     "d"           the earliest moment in `deadlines` (slots.lua add_deadline), so the
--                   sweep looks at that index only when something there may be due;
--     "m:<host_id>" when a process of that host next looks at its `hmarks:<host_id>`, a
--                   set: the host's processes reaped with entries of the host's stream
--                   pending, taken over by another process of that host only.

-- Consumer w of `stream`'s group: marked for takeover if it left anything pending there
-- (`beats` member "o:<w>", or member w of a host's `hmarks` set), else dropped from the
-- group (a worker that comes back is made a consumer again by its next read). Returns the
-- mark made, or nil.
local function settle_consumer(base, stream, w, hid, now)
  local pending = redis.pcall('XPENDING', stream, 'workers', '-', '+', 1, w)
  if pending.err then return nil end  -- no stream or no group: nothing is pending
  if #pending == 0 then
    redis.call('XGROUP', 'DELCONSUMER', stream, 'workers', w)
    return nil
  end
  if hid then
    redis.call('SADD', base .. 'hmarks:' .. hid, w)
    redis.call('ZADD', base .. 'beats', now, 'm:' .. hid)
    return 'h:' .. hid .. ':' .. w
  end
  redis.call('ZADD', base .. 'beats', now, 'o:' .. w)
  return 'o:' .. w
end

-- Whether worker w was declared dead just now by this call. `force` (a graceful stop)
-- reaps a live worker too; `reason` '' names the missed heartbeat. Fails its open sessions,
-- refuses callers waiting to recreate a session on it, removes its registration, its stream
-- and its heartbeat deadline, and marks what it left pending for takeover (or, with nothing
-- pending, drops it from the consumer groups). The marks it makes are added to `marks` (a
-- table, or nil).
-- Returns the number of sessions failed + 1, or 0 when there was nothing to reap.
-- Cost: O(its sessions + its waiting tickets + processes of its host + log n).
local function reap(base, w, reason, force, now, retention_ms, marks)
  local wk, alive = base .. 'worker:' .. w, base .. 'alive:' .. w
  if not force and redis.call('EXISTS', alive) == 1 then return 0 end
  local rec = redis.call('HMGET', wk, 'hid', 'grace_ms', 'hb_ms', 'res')
  local beats = base .. 'beats'
  redis.call('ZREM', beats, 'w:' .. w)
  if redis.call('SREM', base .. 'workers', w) == 0 and redis.call('EXISTS', wk) == 0 then return 0 end
  if is_host(w) and not force and rec[2] then
    reason = 'host ' .. string.sub(w, #HOST_MARK + 1) .. ' had no live worker process for restart_grace='
      .. tostring(tonumber(rec[2]) / 1000) .. 's (after heartbeat_timeout=' .. tostring((tonumber(rec[3]) or 0) / 1000) .. 's)'
  elseif reason == '' and rec[3] then
    reason = 'worker ' .. w .. ' died (no heartbeat for ' .. tostring(tonumber(rec[3]) / 1000) .. 's)'
  elseif reason == '' then
    reason = 'worker ' .. w .. ' died (heartbeat expired)'
  end
  local failed = fail_open_sessions(base, w, reason, now, retention_ms)
  -- Callers waiting for a slot on this very worker (recreate_session) will never get one.
  local tickets = base .. 'tickets'
  for _, sid in ipairs(redis.call('SMEMBERS', base .. 'wtickets:' .. w)) do
    local client = redis.call('HGET', tickets, sid .. ':c')
    drop_ticket(base, sid, w)
    if client then notify(base, client, {'x', sid, 'm', reason}) end
  end
  index_resources(base, w, rec[4], false)
  redis.call('DEL', wk, alive, base .. 'w:' .. w, base .. 'wsessions:' .. w, base .. 'wtickets:' .. w)
  redis.call('ZREM', base .. 'free', w)
  if is_host(w) then
    -- Its stream is gone, and with it what its processes had left there.
    redis.call('DEL', host_key(base, 'hprocs:', w), host_key(base, 'up:', w), host_key(base, 'hmarks:', w))
    redis.call('ZREM', base .. 'beats', 'm:' .. string.sub(w, #HOST_MARK + 1))
  else
    local made = {settle_consumer(base, base .. 'tasks', w, nil, now)}
    if rec[1] then
      made[#made + 1] = settle_consumer(base, base .. 'w:' .. HOST_MARK .. rec[1], w, rec[1], now)
      local h = HOST_MARK .. rec[1]
      redis.call('SREM', host_key(base, 'hprocs:', h), w)
      if not host_has_live_process(base, h, w, true) then redis.call('DEL', host_key(base, 'up:', h)) end
    end
    if marks then
      for _, mark in ipairs(made) do marks[#marks + 1] = mark end
    end
  end
  -- The last worker gone: nobody is left to audit or to take anything over; the next to
  -- register audits at once (register_worker: `beats` is empty, and nothing refills it
  -- meanwhile, slots.lua add_deadline), which takes over what was marked here.
  if redis.call('SCARD', base .. 'workers') == 0 then redis.call('DEL', beats) end
  return failed + 1
end
