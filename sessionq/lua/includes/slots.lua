-- Shared by every script that opens, ends or hands over session slots.
-- Per-worker, per-session and per-client keys are built from `base`, the task queue's key
-- prefix, which carries the queue's hash tag ({queue}); so they share the slot of the KEYS.
-- Every script that does so declares the `guard` key too (it never exists): during a slot
-- migration Redis refuses to start it, instead of it failing midway on a key that moved.
-- Layout mirrors sessionq/keys.py.
--
-- The waiting line: `waiters` is a sorted set of session ids in order of arrival (the
-- score only grows), `tickets` a hash with one field per ticket attribute, named
-- "<sid>:<attribute>" (no separator inside a value can ever be misread), and `deadlines`
-- a sorted set of what must happen at a time: "s:<sid>" a session's execution deadline,
-- "t:<sid>" a ticket's wait deadline. `lease:<client>` holds the time a client last
-- showed it was alive; a ticket whose client has been silent for WAITER_WINDOW_MS is
-- never granted (the caller crashed: its session would have nobody to complete it).

local WAITER_WINDOW_MS = 5000
-- client, exec_ms, wait deadline, target, owner, owner_ms, resources asked
local TICKET_FIELDS = {'c', 'x', 'd', 't', 'o', 'l', 'r'}

local function now_ms()
  local t = redis.call('TIME')
  return tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
end

-- A host (several worker processes sharing one session limit) is placed, counted and
-- watched under the id 'host=<host_id>', like one worker: its record, heartbeat key,
-- stream and session set are those of that id. Its heartbeat key outlives the last beat of
-- its processes by restart_grace; 'up:<host_id>' lives only while some process beats.
local HOST_MARK = 'host='

local function is_host(w)
  return string.sub(w, 1, #HOST_MARK) == HOST_MARK
end

local function host_key(base, kind, w)  -- kind: 'up:', 'hprocs:' or 'hmarks:'
  return base .. kind .. string.sub(w, #HOST_MARK + 1)
end

-- How long a host's keys last from a renewal ('up'; its heartbeat key and deadline, plus
-- the restart grace). Its processes' beats renew them only once a quarter of hb_ms passed
-- since the last renewal (heartbeat.lua), so with more than one process they last that
-- quarter longer: they must outlive the heartbeat key of every process that beat in
-- between. A lone process renews them on every beat, for hb_ms, as a worker its own key.
local function host_lease_ms(base, h, hb_ms)
  if redis.call('SCARD', host_key(base, 'hprocs:', h)) > 1 then return hb_ms + math.floor(hb_ms / 4) end
  return hb_ms
end

-- Send a control message (session opened, ended) to worker w: to its own stream, or, for
-- a host, to the own stream of each of its processes. NOMKSTREAM: a worker gone takes nothing.
local function tell(base, w, fields)
  local targets = {w}
  if is_host(w) then targets = redis.call('SMEMBERS', host_key(base, 'hprocs:', w)) end
  for _, p in ipairs(targets) do
    redis.call('XADD', base .. 'w:' .. p, 'NOMKSTREAM', '*', (unpack or table.unpack)(fields))
  end
end

-- Whether some process of host h has its heartbeat key, other than `except`; with
-- `serving`, only one that is not stopping (a stopping process keeps the host's sessions
-- alive while its running activities finish, but takes no new session).
local function host_has_live_process(base, h, except, serving)
  for _, p in ipairs(redis.call('SMEMBERS', host_key(base, 'hprocs:', h))) do
    if p ~= except and redis.call('EXISTS', base .. 'alive:' .. p) == 1
        and not (serving and redis.call('HGET', base .. 'worker:' .. p, 'stopping') == '1') then
      return true
    end
  end
  return false
end

-- A worker whose record lost its fields (deleted or evicted) must register again: without
-- its heartbeat deadline, its next beat says it is not registered (heartbeat.lua).
local function make_register_again(base, w)
  redis.call('ZREM', base .. 'free', w)
  redis.call('ZREM', base .. 'beats', 'w:' .. w)
end

-- Whether worker w may take a session now: alive, and its registration whole (a hash
-- that lost its fields, deleted or evicted, must not pass for "unlimited": it leaves the
-- free set and registers again). A host only while one of its processes lives: in its
-- restart grace its sessions stay, but no new one comes.
local function placeable(base, w)
  if redis.call('EXISTS', base .. 'alive:' .. w) == 0 then return false end
  if is_host(w) and redis.call('EXISTS', host_key(base, 'up:', w)) == 0 then return false end
  if redis.call('HEXISTS', base .. 'worker:' .. w, 'max_sessions') == 0 then
    make_register_again(base, w)
    return false
  end
  return true
end

-- The load of worker w if it is alive and has a free slot, else nil.
local function free_load(base, w)
  local load = redis.call('ZSCORE', base .. 'free', w)
  if not load or not placeable(base, w) then return nil end
  return tonumber(load)
end

-- Session resources. A worker's (or host's) record holds 'res', its capacity, as
-- "name=amount,..." (names are [a-z0-9_.-]+), and a field 'u:<name>' per resource with the
-- amount its open sessions hold; a session's record ('res') and a ticket ('r') hold what
-- they asked for, in the same form. `req` below is the parsed form: {{name, amount}, ...}.
local function parse_resources(text)
  local out = {}
  if not text or text == '' then return out end
  for name, amount in string.gmatch(text, '([^,=]+)=(%d+)') do out[#out + 1] = {name, tonumber(amount)} end
  return out
end

local function capacity(base, w)
  local total = {}
  for _, pair in ipairs(parse_resources(redis.call('HGET', base .. 'worker:' .. w, 'res'))) do
    total[pair[1]] = pair[2]
  end
  return total
end

-- If worker w can hold `req` now, its load for it: the largest share of an asked resource
-- already taken (0 for a request without resources); else nil.
local function resource_load(base, w, req)
  if #req == 0 then return 0 end
  local total = capacity(base, w)
  local load = 0
  for _, ask in ipairs(req) do
    local t = total[ask[1]]
    if not t then return nil end
    local used = tonumber(redis.call('HGET', base .. 'worker:' .. w, 'u:' .. ask[1])) or 0
    if t - used < ask[2] then return nil end
    if used / t > load then load = used / t end
  end
  return load
end

-- Whether worker w could ever hold `req` (its capacity covers every amount).
local function could_hold(base, w, req)
  local total = capacity(base, w)
  for _, ask in ipairs(req) do
    if (total[ask[1]] or 0) < ask[2] then return false end
  end
  return true
end

-- `held`: the resources of workers kept for earlier waiting requests that fit nowhere yet
-- ({worker = {name = true}}): a later request asking for any of them there must not take
-- them, so a large request is never starved by a stream of smaller ones.
local function held_against(held, w, req)
  local kept = held and held[w]
  if not kept then return false end
  for _, ask in ipairs(req) do
    if kept[ask[1]] then return true end
  end
  return false
end

-- The index of who offers a resource: set `res:<name>` of the workers (and hosts) that may
-- take sessions and list `name` in their capacity (register_worker adds, reap removes), so
-- placing a session that asks for a resource looks at those only, not at the whole fleet.
local function index_resources(base, w, text, add)
  for _, pair in ipairs(parse_resources(text)) do
    redis.call(add and 'SADD' or 'SREM', base .. 'res:' .. pair[1], w)
  end
end

-- The workers with a free slot that might hold `req` (not empty), in the free set's order
-- (fewest open sessions first, then by id): those offering its scarcest resource, or the
-- whole free set when that is smaller (the caller checks each candidate anyway).
-- Cost: O(m log n), m = min(workers with a free slot, workers offering that resource).
local function offering(base, req)
  local name, fewest = nil, nil
  for _, ask in ipairs(req) do
    local n = redis.call('SCARD', base .. 'res:' .. ask[1])
    if fewest == nil or n < fewest then name, fewest = ask[1], n end
  end
  -- Nobody in the index (nobody offers it, or the index was lost: evicted, deleted by
  -- hand; the audit rebuilds it): the free set, as before there was an index.
  if fewest == 0 or redis.call('ZCARD', base .. 'free') <= fewest then
    return redis.call('ZRANGE', base .. 'free', 0, -1)
  end
  local out, loads = {}, {}
  for _, w in ipairs(redis.call('SMEMBERS', base .. 'res:' .. name)) do
    local load = redis.call('ZSCORE', base .. 'free', w)
    if load then
      out[#out + 1] = w
      loads[w] = tonumber(load)
    elseif redis.call('EXISTS', base .. 'worker:' .. w) == 0 then
      redis.call('SREM', base .. 'res:' .. name, w)  -- gone (indexed again by a late audit)
    end
  end
  table.sort(out, function(a, b)
    if loads[a] ~= loads[b] then return loads[a] < loads[b] end
    return a < b
  end)
  return out
end

-- The live worker with a free slot to place a session asking for `req` on, else nil: the
-- first in the free set's order (fewest open sessions) without resources; with resources,
-- the one whose asked resources are least taken among those they fit now. Workers whose
-- heartbeat is gone but who are not reaped yet are skipped, however many there are.
-- Cost: without resources O(log n) plus the dead not yet reaped (those that died within a
-- heartbeat timeout); with resources O(m log n), m = min(workers with a free slot,
-- workers offering the scarcest asked resource) (offering).
local function pick_worker(base, req, held)
  req = req or {}
  local best, best_load = nil, nil
  if #req > 0 then
    for _, w in ipairs(offering(base, req)) do
      if placeable(base, w) and not held_against(held, w, req) then
        local load = resource_load(base, w, req)
        if load and (best == nil or load < best_load) then
          best, best_load = w, load
          if load == 0 then return best end
        end
      end
    end
    return best
  end
  local offset = 0
  while true do
    local candidates = redis.call('ZRANGE', base .. 'free', offset, offset + 63)
    if #candidates == 0 then return nil end
    for _, w in ipairs(candidates) do
      if placeable(base, w) then return w end
    end
    offset = offset + 64
  end
end

-- Keep the resources `req` asks for on the workers that could ever hold it, for as long as
-- the pass lasts (a later request may only take what nobody earlier needs). Only workers
-- with a free slot count: nobody can take anything on the others in this pass, and every
-- pass starts afresh. Cost: O(m log n) (offering).
local function hold_for(base, req, held)
  for _, w in ipairs(offering(base, req)) do
    if could_hold(base, w, req) then
      held[w] = held[w] or {}
      for _, ask in ipairs(req) do held[w][ask[1]] = true end
    end
  end
end

local function hold_on(held, w, req)
  held[w] = held[w] or {}
  for _, ask in ipairs(req) do held[w][ask[1]] = true end
end

-- Whether client has renewed its lease within `window` ms.
local function lease_fresh(base, client, now, window)
  local renewed = tonumber(redis.call('GET', base .. 'lease:' .. client))
  return renewed ~= nil and now - renewed <= window
end

-- A ticket's attributes: {client, exec_ms, wait_deadline, target, owner, owner_ms, resources}.
local function read_ticket(base, sid)
  local names = {}
  for i, f in ipairs(TICKET_FIELDS) do names[i] = sid .. ':' .. f end
  return redis.call('HMGET', base .. 'tickets', (unpack or table.unpack)(names))
end

local function drop_ticket(base, sid, target)
  redis.call('ZREM', base .. 'waiters', sid)
  local names = {}
  for i, f in ipairs(TICKET_FIELDS) do names[i] = sid .. ':' .. f end
  redis.call('HDEL', base .. 'tickets', (unpack or table.unpack)(names))
  redis.call('ZREM', base .. 'deadlines', 't:' .. sid)
  if target and target ~= '' then redis.call('SREM', base .. 'wtickets:' .. target, sid) end
end

-- Put `item` in the deadline index at `at`. The index's earliest moment is mirrored in
-- `beats` as item 'd' (only ever moved earlier here: LT), so a sweep looks at `deadlines`
-- only when something there may be due, not on every pass (sweep.lua). Not while `beats`
-- is gone (no worker is registered): the first worker to register must find it empty, to
-- audit at once (register_worker.lua), and its first sweep looks at the index anyway.
local function add_deadline(base, at, item)
  redis.call('ZADD', base .. 'deadlines', at, item)
  if redis.call('EXISTS', base .. 'beats') == 1 then redis.call('ZADD', base .. 'beats', 'LT', at, 'd') end
end

-- Queue a ticket at the end of the line.
local function queue_ticket(base, sid, client, exec_ms, deadline, target, owner, owner_ms, now, res)
  local waiters = base .. 'waiters'
  local score = now * 1000
  local last = redis.call('ZRANGE', waiters, -1, -1, 'WITHSCORES')
  if last[2] and tonumber(last[2]) >= score then score = tonumber(last[2]) + 1 end
  redis.call('ZADD', waiters, score, sid)
  redis.call('HSET', base .. 'tickets', sid .. ':c', client, sid .. ':x', exec_ms, sid .. ':d', deadline,
    sid .. ':t', target, sid .. ':o', owner, sid .. ':l', owner_ms, sid .. ':r', res or '')
  add_deadline(base, deadline, 't:' .. sid)
  if target ~= '' then redis.call('SADD', base .. 'wtickets:' .. target, sid) end
end

-- Open session sid on worker w: count the slot, claim the resources asked (`res`, text),
-- write the record, tell the worker. Returns {host, deadline, hb_ms}.
local function open_session(base, w, sid, exec_ms, now, owner, client, owner_ms, res)
  local wk = base .. 'worker:' .. w
  res = res or ''
  for _, ask in ipairs(parse_resources(res)) do redis.call('HINCRBY', wk, 'u:' .. ask[1], ask[2]) end
  local info = redis.call('HMGET', wk, 'max_sessions', 'host', 'hb_ms', 'expiry')
  local cap = tonumber(info[1]) or 0
  local open = redis.call('HINCRBY', wk, 'open', 1)
  if cap > 0 and open >= cap then
    redis.call('ZREM', base .. 'free', w)
  else
    redis.call('ZADD', base .. 'free', open, w)
  end
  local deadline = now + exec_ms
  -- Nothing derivable (created = deadline - exec_ms): a hundred thousand open sessions
  -- must fit in a few tens of MB. hb_ms stays: an earlier version's create_session returns it.
  local skey = base .. 'session:' .. sid
  local record = {'worker', w, 'host', info[2] or '', 'state', 'OPEN', 'deadline', deadline,
    'exec_ms', exec_ms, 'hb_ms', info[3] or 0, 'owner', owner, 'client', client, 'owner_ms', owner_ms}
  if res ~= '' then
    record[#record + 1] = 'res'
    record[#record + 1] = res
  end
  redis.call('HSET', skey, (unpack or table.unpack)(record))
  redis.call('SADD', base .. 'wsessions:' .. w, sid)
  -- A worker whose record says expiry=own ends its sessions at their deadline itself (its
  -- timer asks end_session, Redis' clock decides; reconcile ends one it does not hold), and
  -- its reap fails them when it dies: no deadline entry, 120 bytes less a session. A host,
  -- which may have no live process for its restart grace, and an earlier version's worker
  -- are swept as before.
  if info[4] ~= 'own' then add_deadline(base, deadline, 's:' .. sid) end
  tell(base, w, {'t', 'o', 's', sid, 'x', exec_ms, 'd', deadline, 'c', client, 'l', owner_ms, 'r', res})
  return {info[2] or '', deadline, info[3] or 0}
end

-- Give a slot back on worker w (if it is still registered), and the resources session
-- sid held there.
local function release_slot(base, w, sid)
  local wk = base .. 'worker:' .. w
  if redis.call('HEXISTS', wk, 'max_sessions') == 0 then
    -- A live worker whose record lost its fields registers again; a dead one is the sweep's.
    if redis.call('EXISTS', base .. 'alive:' .. w) == 1 then make_register_again(base, w) end
    return
  end
  for _, ask in ipairs(parse_resources(redis.call('HGET', base .. 'session:' .. sid, 'res'))) do
    if redis.call('HINCRBY', wk, 'u:' .. ask[1], -ask[2]) < 0 then redis.call('HSET', wk, 'u:' .. ask[1], 0) end
  end
  local open = redis.call('HINCRBY', wk, 'open', -1)
  if open < 0 then
    redis.call('HSET', wk, 'open', 0)
    open = 0
  end
  if tonumber(redis.call('HGET', wk, 'max_sessions') or '-1') >= 0 then
    redis.call('ZADD', base .. 'free', open, w)
  end
end

-- End an OPEN session: record the outcome, give its slot back, tell its worker.
local function close_session(base, sid, w, new_state, reason, now, retention_ms, mode)
  local skey = base .. 'session:' .. sid
  redis.call('HSET', skey, 'state', new_state, 'reason', reason, 'ended', now)
  redis.call('PEXPIRE', skey, retention_ms)
  redis.call('ZREM', base .. 'deadlines', 's:' .. sid)
  -- Only a session the worker's registration counted gives a slot back (one of an earlier
  -- registration of the same identity was never counted by this one).
  if redis.call('SREM', base .. 'wsessions:' .. w, sid) == 1 then release_slot(base, w, sid) end
  tell(base, w, {'t', 'c', 's', sid, 'r', mode, 'm', reason})
end

-- Fail every OPEN session worker w holds (it was declared dead, or its host's record was
-- lost): they end FAILED with `reason`; a host's processes are told. Returns how many.
local function fail_open_sessions(base, w, reason, now, retention_ms)
  local failed = 0
  for _, sid in ipairs(redis.call('SMEMBERS', base .. 'wsessions:' .. w)) do
    local skey = base .. 'session:' .. sid
    if redis.call('HGET', skey, 'state') == 'OPEN' then
      redis.call('HSET', skey, 'state', 'FAILED', 'reason', reason, 'ended', now)
      redis.call('PEXPIRE', skey, retention_ms)
      failed = failed + 1
      if is_host(w) then tell(base, w, {'t', 'c', 's', sid, 'r', 'fail', 'm', reason}) end
    end
    redis.call('ZREM', base .. 'deadlines', 's:' .. sid)
  end
  return failed
end

-- Tell a waiting caller, through its inbox stream, that it got a session or why it
-- cannot: fields is {'g', sid, 'w', worker, ...} or {'x', sid, 'm', reason}. NOMKSTREAM:
-- the inbox belongs to its client (which made it, with a TTL); a client gone takes nothing.
local function notify(base, client, fields)
  redis.call('XADD', base .. 'inbox:' .. client, 'NOMKSTREAM', '*', (unpack or table.unpack)(fields))
end

-- Hand free slots to waiting callers, first come first served, over the whole line.
-- A request for resources that fit nowhere now waits without blocking later requests
-- that fit elsewhere, but keeps what it asks for on every worker that could ever hold it
-- (`held`), so later requests cannot starve it; a recreate ticket keeps what it asks for on
-- its own worker, and respects what earlier ones keep. Stops as soon as no live worker
-- has a free slot (then no ticket can be served). Returns `held`, for the caller's own
-- request (create_session). Cost: for a line of requests without resources or target,
-- O(log n) per ticket served and one more look (at the first that nothing can take: the
-- pass stops there), however long the line; tickets that wait for their own worker or for
-- resources are stepped over, O(log n) each, plus per distinct request that waits
-- O(m log n) (offering): requests already found to fit nowhere in this pass are
-- not looked at again (granting only takes capacity, so they still fit nowhere).
local function grant_waiters(base, now)
  local held = {}
  local nowhere = {}  -- request texts that fit on no worker in this pass
  local offset = 0
  while true do
    local sids = redis.call('ZRANGE', base .. 'waiters', offset, offset + 99)
    if #sids == 0 then return held end
    for _, sid in ipairs(sids) do
      local t = read_ticket(base, sid)
      local client, exec_ms, deadline, target = t[1], tonumber(t[2]), tonumber(t[3]), t[4]
      local req = parse_resources(t[7])
      if not client or not exec_ms or not deadline or deadline < now then
        drop_ticket(base, sid, target)  -- expired (its caller gives up by itself) or broken
      elseif not lease_fresh(base, client, now, WAITER_WINDOW_MS) then
        drop_ticket(base, sid, target)  -- its caller went silent: crashed, or stalled
        notify(base, client, {'x', sid, 'm', 'its client stopped renewing its lease while it waited',
          'k', 'lease'})
      else
        local w = nil
        if target == '' then
          if not nowhere[t[7]] then
            w = pick_worker(base, req, held)
            if not w then
              if #req == 0 or not pick_worker(base) then return held end  -- no free slot anywhere
              -- Only a request that fits nowhere keeps anything (one held back by an earlier
              -- request's keep does not extend it to what that request never asked for).
              if not pick_worker(base, req, nil) then
                nowhere[t[7]] = true
                hold_for(base, req, held)
              end
            end
          end
        elseif free_load(base, target) and resource_load(base, target, req) and not held_against(held, target, req) then
          w = target
        elseif not pick_worker(base) then
          return held
        else
          hold_on(held, target, req)  -- what it waits for on its worker is not for later requests
        end
        if w then
          local opened = open_session(base, w, sid, exec_ms, now, t[5] or '', client, tonumber(t[6]) or 0, t[7])
          drop_ticket(base, sid, target)
          notify(base, client, {'g', sid, 'w', w, 'h', opened[1], 'd', opened[2], 'b', opened[3]})
        else
          offset = offset + 1  -- waits (for its own worker, or for resources); later tickets may be served
        end
      end
    end
  end
end
