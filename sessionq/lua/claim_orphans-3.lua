-- Take over the activities a dead worker had read from a stream but not finished
-- (at-least-once): the shared stream's plain ones, or a host's session ones. Checks, in the
-- same call that claims, that the consumer's heartbeat key is gone, so an activity still
-- running on a healthy worker is never handed out twice, however long it runs. Once the
-- consumer has nothing pending it is dropped from the group, and its takeover mark with it.
-- KEYS[1] stream     the stream read through the group
-- KEYS[2] alive      the (possibly dead) consumer's heartbeat key
-- KEYS[3] marks      where its takeover mark is: `beats` (sorted set) or a host's `hmarks` (set)
-- ARGV[1] group     consumer group name
-- ARGV[2] consumer  the (possibly dead) consumer
-- ARGV[3] me        the claiming consumer
-- ARGV[4] count     most entries to claim in one call
-- ARGV[5] mark      its takeover mark (the member of KEYS[3]), or '' (the audit claims without one)
-- ARGV[6] in_set    '1' when KEYS[3] is a set
-- Returns {{id, delivery_count, {field, value, ...}}, ...}; empty when the consumer lives.
-- Cost: O(count + log n).
local out = {}
local function done()
  if ARGV[5] ~= '' then redis.call(ARGV[6] == '1' and 'SREM' or 'ZREM', KEYS[3], ARGV[5]) end
  return out
end
if redis.call('EXISTS', KEYS[2]) == 1 then return done() end  -- alive again: it reads its own
if redis.call('EXISTS', KEYS[1]) == 0 then return done() end  -- the stream is gone (its host was reaped)
local pending = redis.pcall('XPENDING', KEYS[1], ARGV[1], '-', '+', tonumber(ARGV[4]), ARGV[2])
if pending.err then return done() end  -- no group: nothing is pending
if #pending == 0 then
  redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
  return done()
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
  return done()
end
-- More may be left: the mark is due again at once, for the next worker with a free slot.
if ARGV[5] ~= '' and ARGV[6] ~= '1' then redis.call('ZADD', KEYS[3], 0, ARGV[5]) end
return out
