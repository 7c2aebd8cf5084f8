--[[ broker_fetch: move the next task message into the consumer's in-flight hash.

The reliable Redis transport's only way for a message to leave a queue.
Stock kombu senders LPUSH messages onto the queue lists; this takes the
oldest one (the right end) of the first non-empty source and, in the same
atomic step, stores it under a field of the consumer's in-flight hash that
names its source list. From then until the ack (an HDEL of that field) the
message is in Redis, where whoever finds the consumer dead puts it back.

The consumer is also entered into the registry (if it is not there yet),
with a deadline of now + its timeout by the server's clock, so an in-flight
hash with fields always has a registry entry that can expire.

Every write Redis may refuse (OOM under maxmemory) is made before the pop,
so a refused call leaves the message in its queue.

KEYS[1]     consumer registry (ZSET: consumer id -> heartbeat deadline, epoch ms)
KEYS[2]     this consumer's in-flight hash (HASH: "<seq>:<source list>" -> raw message)
KEYS[3..n]  the source lists, in the order to try (priority levels, then queues)

ARGV[1]  consumer id
ARGV[2]  seq: the message taken is stored under the field "<seq>:<its source list>"
ARGV[3]  consumer timeout, ms: the deadline of a consumer registered here
ARGV[4]  one character per source list, "1" for a no-ack source: its message
         is handed over without being kept (nothing to acknowledge)

Returns false when every source list is empty, else {source number (1 for
KEYS[3]), the raw message bytes}.
]]

for i = 3, #KEYS do
  local raw = redis.call('LINDEX', KEYS[i], -1)
  if raw then
    if string.sub(ARGV[4], i - 2, i - 2) ~= '1' then
      local now = redis.call('TIME')
      local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
      redis.call('ZADD', KEYS[1], 'NX', now_ms + tonumber(ARGV[3]), ARGV[1])
      redis.call('HSET', KEYS[2], ARGV[2] .. ':' .. KEYS[i], raw)
    end
    redis.call('RPOP', KEYS[i])
    return {i - 2, raw}
  end
end
return false
