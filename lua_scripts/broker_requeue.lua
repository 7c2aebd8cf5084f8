--[[ broker_requeue: put in-flight messages of a consumer back on their queues.

Three callers: a rejected message (requeue=True) goes to the back of its
queue; at shutdown a consumer returns everything it still holds to the
front; and any live consumer recovers a dead one's messages (to the front),
but only while that consumer's heartbeat deadline has passed, checked here
in the same atomic step.

Each message moves as a whole (push, then HDEL): never in two places, never
in none. The push comes first, so a push Redis refuses (OOM) leaves the
message where it was. A field already gone (acknowledged, or moved by
another recoverer) is skipped.

KEYS[1]     consumer registry (ZSET: consumer id -> heartbeat deadline, epoch ms)
KEYS[2]     the consumer's in-flight hash (HASH: "<seq>:<source list>" -> raw message)
KEYS[3..n]  the destination lists

ARGV[1]  consumer id
ARGV[2]  "front": RPUSH, fetched next (restore, recovery); "back": LPUSH (reject)
ARGV[3]  "1": only if the consumer's deadline has passed (recovery); "0": always
ARGV[4]  "1": remove the consumer from the registry once its hash is empty
ARGV[5..] pairs, one per message: its field, its destination (1 for KEYS[3])

Returns -1 when ARGV[3] is "1" and the consumer is alive (nothing moved),
else the number of messages moved.
]]

if ARGV[3] == '1' then
  local deadline = redis.call('ZSCORE', KEYS[1], ARGV[1])
  if deadline then
    local now = redis.call('TIME')
    local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
    if tonumber(deadline) >= now_ms then
      return -1
    end
  end
end

local push = 'RPUSH'
if ARGV[2] == 'back' then
  push = 'LPUSH'
end

local moved = 0
for i = 5, #ARGV, 2 do
  local raw = redis.call('HGET', KEYS[2], ARGV[i])
  if raw then
    redis.call(push, KEYS[2 + tonumber(ARGV[i + 1])], raw)
    redis.call('HDEL', KEYS[2], ARGV[i])
    moved = moved + 1
  end
end

if ARGV[4] == '1' and redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
end
return moved
