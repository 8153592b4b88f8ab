-- A client shows it is alive: its waiting tickets stay in line, and the sessions it owns
-- (those with an owner_timeout) stay open. One key per client and task queue.
-- KEYS[1] lease   the client's lease key on this task queue
-- ARGV[1] ttl_ms  how long the key outlives this renewal
-- Returns the renewal time (ms, Redis' clock). Cost: O(1).
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
redis.call('SET', KEYS[1], now, 'PX', tonumber(ARGV[1]))
return now
