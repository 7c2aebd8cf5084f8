#!lua flags=allow-oom
--[[ broker_publish: publish a message on a queue that must work when the broker is full.

kombu publishes with LPUSH, which Redis refuses at maxmemory. A flush task
published then would never arrive, and the flush is what frees the memory
(the broker is often the buffer's Redis). So a message to such a queue
(the flush queue) that a plain LPUSH could not write is pushed here,
unless the queue already holds ARGV[2] messages: more flush requests than
that add nothing but bytes to a full Redis.

KEYS[1]  the queue (LIST; kombu's key for the message's priority)

ARGV[1]  the message, as kombu serialized it
ARGV[2]  the most messages the queue may already hold for this one to be pushed

Returns the queue's length after the push, or 0 when it already held
ARGV[2] messages (nothing was pushed).

allow-oom: runs above maxmemory: a bounded number of small flush requests
(lua_scripts/__init__.py says which scripts may).
]]

if redis.call('LLEN', KEYS[1]) >= tonumber(ARGV[2]) then
  return 0
end
return redis.call('LPUSH', KEYS[1], ARGV[1])
