#!lua flags=allow-oom
--[[ broker_fetch: move the next task message out of its queue, into the consumer's keeping.

The reliable Redis transport's only way for a message to leave a queue.
Stock kombu senders LPUSH messages onto the queue lists; this takes the
oldest one (the right end) of the first non-empty source and, in the same
atomic step, moves it to a key of its own (a one-element list) and records
it in the consumer's in-flight index. From then until the ack (DEL of that
key, HDEL of its index entry) the message is in Redis, where whoever finds
the consumer dead puts it back.

The message never becomes a Lua string (a command's reply does, at about a
millisecond per MB): SORT ... STORE copies it inside Redis, LTRIM drops it
from the queue, and the caller reads it from its key with an LINDEX sent
right behind this call, in the same round trip.

The consumer is entered into the registry (if it is not there yet), with a
deadline of now + its timeout by the server's clock, so an index with
entries always has a registry entry that can expire.

Every write Redis may refuse (OOM under maxmemory) comes before the LTRIM,
so a refused call leaves the message in its queue.

KEYS[1]     consumer registry (ZSET: consumer id -> heartbeat deadline, epoch ms)
KEYS[2]     this consumer's in-flight index (HASH: seq -> the list its message came from)
KEYS[3]     the key for the message taken (LIST, absent before: its name carries the seq)
KEYS[4..n]  the source lists, in the order to try (priority levels, then queues)

ARGV[1]  consumer id
ARGV[2]  seq of the message taken (its index field)
ARGV[3]  consumer timeout, ms: the deadline of a consumer registered here
ARGV[4]  one character per source list, "1" for a no-ack source: its message
         is popped and handed over, nothing kept (and nothing to acknowledge)

Returns false when every source list is empty; {source number (1 for KEYS[4])}
when the message was moved to KEYS[3]; {source number, raw message} when it
came from a no-ack source.

allow-oom: runs above maxmemory: flush tasks must be fetched from a full broker (a message moves; its index entry is small)
(lua_scripts/__init__.py says which scripts may).
]]

for i = 4, #KEYS do
  if redis.call('LLEN', KEYS[i]) > 0 then
    local source = i - 3
    if string.sub(ARGV[4], source, source) == '1' then
      return {source, redis.call('RPOP', KEYS[i])}
    end
    local now = redis.call('TIME')
    local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
    redis.call('ZADD', KEYS[1], 'NX', now_ms + tonumber(ARGV[3]), ARGV[1])
    redis.call('HSET', KEYS[2], ARGV[2], KEYS[i])
    -- The oldest message: with BY nosort, DESC starts from the list's right end.
    redis.call('SORT', KEYS[i], 'BY', 'nosort', 'LIMIT', 0, 1, 'DESC', 'STORE', KEYS[3])
    redis.call('LTRIM', KEYS[i], 0, -2)
    return {source}
  end
end
return false
