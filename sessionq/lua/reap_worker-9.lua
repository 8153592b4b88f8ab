-- Declare a worker dead once its heartbeat key is gone (or on its own graceful stop):
-- fail its open sessions, refuse callers waiting to recreate a session on it, and remove
-- its registration and stream. Exactly one caller reaps a worker; the others get 0.
-- Plain activities it held are reclaimed separately (claim_orphans), by live workers.
-- A host ('host=<id>') is reaped once its heartbeat key lapsed, restart_grace after its
-- last process stopped beating; reaping one of its processes fails no session (they are
-- the host's), and what that process had read from the host's stream is claimed by
-- another process of the host.
-- KEYS[1] workers    set of registered worker ids
-- KEYS[2] worker     the worker's hash
-- KEYS[3] alive      the worker's heartbeat key
-- KEYS[4] stream     the worker's own stream
-- KEYS[5] sessions   set of the worker's open session ids
-- KEYS[6] wtickets   set of the session ids of tickets waiting for this very worker
-- KEYS[7] tickets    hash of the waiting tickets' attributes
-- KEYS[8] deadlines  sorted set of session and ticket deadlines
-- KEYS[9] guard      never exists: Redis will not start the script while the slot migrates (keys.py)
-- ARGV[1] base          the task queue's key prefix
-- ARGV[2] worker_id
-- ARGV[3] reason        stored on each failed session
-- ARGV[4] force         '1' on graceful stop: reap even though the heartbeat is present
-- ARGV[5] retention_ms  how long ended session records stay for inspect
-- Returns the number of sessions failed + 1, or 0 when there was nothing to reap.
-- Cost: O(its sessions + its waiting tickets + processes of its host).
-- @include slots

local base, w, reason = ARGV[1], ARGV[2], ARGV[3]
if ARGV[4] ~= '1' and redis.call('EXISTS', KEYS[3]) == 1 then return 0 end
local rec = redis.call('HMGET', KEYS[2], 'hid', 'grace_ms', 'hb_ms')
if redis.call('SREM', KEYS[1], w) == 0 and redis.call('EXISTS', KEYS[2]) == 0 then return 0 end
local now = now_ms()
if is_host(w) and ARGV[4] ~= '1' and rec[2] then
  reason = 'host ' .. string.sub(w, #HOST_MARK + 1) .. ' had no live worker process for restart_grace='
    .. tostring(tonumber(rec[2]) / 1000) .. 's (after heartbeat_timeout=' .. tostring((tonumber(rec[3]) or 0) / 1000) .. 's)'
end
local failed = fail_open_sessions(base, w, reason, now, tonumber(ARGV[5]))
-- Callers waiting for a slot on this very worker (recreate_session) will never get one.
for _, sid in ipairs(redis.call('SMEMBERS', KEYS[6])) do
  local client = redis.call('HGET', KEYS[7], sid .. ':c')
  drop_ticket(base, sid, w)
  if client then notify(base, client, {'x', sid, 'm', reason}) end
end
redis.call('DEL', KEYS[2], KEYS[3], KEYS[4], KEYS[5], KEYS[6])
redis.call('ZREM', base .. 'free', w)
if is_host(w) then
  redis.call('DEL', host_key(base, 'hprocs:', w), host_key(base, 'up:', w))
elseif rec[1] then
  local h = HOST_MARK .. rec[1]
  redis.call('SREM', host_key(base, 'hprocs:', h), w)
  if not host_has_live_process(base, h, w, true) then redis.call('DEL', host_key(base, 'up:', h)) end
end
return failed + 1
