#!lua flags=allow-oom
--[[ broker_requeue: put in-flight messages of a consumer back on their queues.

Three callers: a rejected message (requeue=True) goes to the back of its
queue; at shutdown a consumer returns everything it still holds to the
front; and any live consumer recovers a dead one's messages (to the front),
but only while that consumer's heartbeat deadline has passed, checked here
in the same atomic step.

Each message moves with one LMOVE out of its own key: never in two places,
never in none (LMOVE is atomic). Its index entry goes
after it. A message already gone (acknowledged, or moved by another
recoverer) only has its index entry removed. (LMOVE's reply makes the
message a Lua string, the cost broker_fetch.lua avoids: these are the rare
paths.)

Index entries are data anyone who can write to the broker can forge, and a
recovery must not be blocked by them: a destination that is not a list
(WRONGTYPE) gets the message parked on KEYS[3] instead, and a message key
that is not a list (no message a fetch moved) only loses its index entry.

KEYS[1]     consumer registry (ZSET: consumer id -> heartbeat deadline, epoch ms)
KEYS[2]     the consumer's in-flight index (HASH: seq -> the list its message came from)
KEYS[3]     the unparsable list (parked messages), for a destination that is not a list
KEYS[4..n]  the messages' keys and their destination lists

ARGV[1]  consumer id
ARGV[2]  "front": to the right end, fetched next (restore, recovery); "back": left end (reject)
ARGV[3]  "1": only if the consumer's deadline has passed (recovery); "0": always
ARGV[4]  "1": remove the consumer from the registry once its index is empty
ARGV[5..] triples, one per message: its seq, its key, its destination (numbers: 1 for
          KEYS[3], 2 for KEYS[4] ...)

Returns -1 when ARGV[3] is "1" and the consumer is alive (nothing moved),
else the number of messages moved (parked ones included).

allow-oom: runs above maxmemory: messages move back to their queues (no net growth): a dead worker's tasks are recovered and a held task is requeued in place on a full broker
(lua_scripts/__init__.py says which scripts may).
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

local side = 'RIGHT'
if ARGV[2] == 'back' then
  side = 'LEFT'
end

local moved = 0
for i = 5, #ARGV, 3 do
  local key = KEYS[2 + tonumber(ARGV[i + 1])]
  local destination = KEYS[2 + tonumber(ARGV[i + 2])]
  local reply = redis.pcall('LMOVE', key, destination, 'LEFT', side)
  if type(reply) == 'table' and reply.err and destination ~= KEYS[3] then
    reply = redis.pcall('LMOVE', key, KEYS[3], 'LEFT', 'LEFT')
  end
  if reply and not (type(reply) == 'table' and reply.err) then
    moved = moved + 1
  end
  redis.call('HDEL', KEYS[2], ARGV[i])
end

if ARGV[4] == '1' and redis.call('EXISTS', KEYS[2]) == 0 then
  redis.call('ZREM', KEYS[1], ARGV[1])
end
return moved
