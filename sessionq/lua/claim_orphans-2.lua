-- Take over the plain activities a dead worker had read but not finished (at-least-once).
-- Checks, in the same call that claims, that the consumer's heartbeat key is gone, so an
-- activity still running on a healthy worker is never handed out twice, however long it runs.
-- KEYS[1] tasks  the shared stream
-- KEYS[2] alive  the dead consumer's heartbeat key
-- ARGV[1] group     consumer group name
-- ARGV[2] consumer  the (possibly dead) consumer
-- ARGV[3] me        the claiming consumer
-- ARGV[4] count     most entries to claim in one call
-- Returns {{id, delivery_count, {field, value, ...}}, ...}; empty when the consumer lives.
if redis.call('EXISTS', KEYS[2]) == 1 then return {} end
local pending = redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', tonumber(ARGV[4]), ARGV[2])
local out = {}
if #pending == 0 then
  redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
  return out
end
for _, p in ipairs(pending) do
  local claimed = redis.call('XCLAIM', KEYS[1], ARGV[1], ARGV[3], 0, p[1])
  if claimed[1] then
    out[#out + 1] = {claimed[1][1], p[4], claimed[1][2]}
  else
    -- The entry's data was deleted: nothing to run; drop it from the pending list.
    redis.call('XACK', KEYS[1], ARGV[1], p[1])
  end
end
if #pending < tonumber(ARGV[4]) then
  redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
end
return out
