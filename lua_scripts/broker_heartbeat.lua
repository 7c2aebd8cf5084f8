#!lua flags=allow-oom
--[[ broker_heartbeat: a consumer says it is alive, and learns who is not.

Sets the consumer's deadline to now + its timeout, by the server's clock
(one clock for every worker, whatever their own), and lists consumers whose
deadline has passed: their in-flight messages are to be put back
(broker_requeue.lua re-checks each deadline as it moves them).

KEYS[1]  consumer registry (ZSET: consumer id -> heartbeat deadline, epoch ms)

ARGV[1]  consumer id
ARGV[2]  consumer timeout, ms
ARGV[3]  the most dead consumers to list

Returns {1 if the consumer was registered already, 0 if this call entered
it (its first beat, or its entry was removed as dead meanwhile), dead
consumer id, ...}.

allow-oom: runs above maxmemory: a consumer's liveness must not depend on free memory (one sorted-set score)
(lua_scripts/__init__.py says which scripts may).
]]

local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
local added = redis.call('ZADD', KEYS[1], now_ms + tonumber(ARGV[2]), ARGV[1])
local reply = {1 - added}
local dead = redis.call('ZRANGE', KEYS[1], '-inf', '(' .. now_ms, 'BYSCORE', 'LIMIT', 0,
  tonumber(ARGV[3]))
for i = 1, #dead do
  reply[i + 1] = dead[i]
end
return reply
