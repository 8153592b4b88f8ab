-- Claim a session slot (and the resources the session asks for) atomically, or join the
-- FIFO line of waiting callers.
-- Idempotent per session id: a retried call (its reply was lost) gets the session it made,
-- or its place in the line, never a second ticket.
-- KEYS[1] free       sorted set of session workers with a free slot (score = open sessions)
-- KEYS[2] waiters    sorted set of waiting session ids, in order of arrival
-- KEYS[3] tickets    hash of the waiting tickets' attributes ("<sid>:<attribute>")
-- KEYS[4] deadlines  sorted set of session and ticket deadlines (and, built from base,
--                    its earliest moment as 'd' in `beats`: slots.lua add_deadline)
-- KEYS[5] session    the new session's hash
-- KEYS[6] lease      the calling client's lease (its last sign of life)
-- KEYS[7] guard      never exists: Redis will not start the script while the slot migrates (keys.py)
-- ARGV[1] base        the task queue's key prefix (carries the hash tag)
-- ARGV[2] session_id  new, unique
-- ARGV[3] client_id   whose inbox gets the grant if the caller has to wait
-- ARGV[4] exec_ms     the session's execution timeout
-- ARGV[5] wait_ms     how long the caller waits for a slot (0 = answer now)
-- ARGV[6] target      worker id for recreate_session, '' for any worker
-- ARGV[7] owner       caller description, for inspect
-- ARGV[8] owner_ms    the session's owner timeout (0 = no owner lease)
-- ARGV[9] lease_ms    TTL of the client's lease key
-- ARGV[10] resources  what the session asks for, "name=amount,..." ('' for none)
-- Returns {'OK', worker, host, deadline_ms, hb_ms} | {'WAIT', session_id} | {'FULL'} | {'DEAD'}
-- Cost: O(log n) to place a session without resources (the first live worker of the free
-- set; the dead not yet reaped are skipped, at most those that died within a heartbeat
-- timeout), or to queue it; with resources O(m log n), m = min(workers with a free slot,
-- workers offering the scarcest asked resource) (slots.lua offering); plus, when
-- callers wait, granting them first (slots.lua grant_waiters: O(1) per ticket served).
-- @include slots

local base, sid, client = ARGV[1], ARGV[2], ARGV[3]
local exec_ms, wait_ms, target, owner = tonumber(ARGV[4]), tonumber(ARGV[5]), ARGV[6], ARGV[7]
local owner_ms = tonumber(ARGV[8])
local res = ARGV[10] or ''
local req = parse_resources(res)
local now = now_ms()
redis.call('SET', KEYS[6], now, 'PX', tonumber(ARGV[9]))  -- the caller is alive: it is calling

local made = redis.call('HMGET', KEYS[5], 'worker', 'host', 'deadline', 'hb_ms')
if made[1] then return {'OK', made[1], made[2], made[3], made[4] or 0} end
if redis.call('ZSCORE', KEYS[2], sid) then return {'WAIT', sid} end

if target ~= '' then
  if redis.call('EXISTS', base .. 'worker:' .. target) == 0
      or redis.call('EXISTS', base .. 'alive:' .. target) == 0 then
    return {'DEAD'}
  end
end

-- Earlier waiters go first: serve them before this caller.
local held = nil
if redis.call('ZCARD', KEYS[2]) > 0 then held = grant_waiters(base, now) end

-- Any waiter still queued is blocked (nothing free fits it), so what is free here is fair
-- game, except the resources kept for an earlier request that fits nowhere yet.
local w = nil
if target == '' then
  w = pick_worker(base, req, held)
elseif free_load(base, target) and resource_load(base, target, req) and not held_against(held, target, req) then
  w = target
end
if w then
  local opened = open_session(base, w, sid, exec_ms, now, owner, client, owner_ms, res)
  return {'OK', w, opened[1], opened[2], opened[3]}
end
if wait_ms <= 0 then return {'FULL'} end
queue_ticket(base, sid, client, exec_ms, now + wait_ms, target, owner, owner_ms, now, res)
return {'WAIT', sid}
