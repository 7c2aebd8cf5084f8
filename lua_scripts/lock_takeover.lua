#!lua flags=allow-oom
--[[ lock_takeover: take a shard's flush lock from a holder judged dead.

Compare and swap: the lock passes to the new token only if it still holds
the token the caller judged dead, and, for a holder judged dead by a stale
heartbeat, only if it has still not been extended since (its remaining TTL
is at most ARGV[4]). A holder that came back to life in between (a frozen
process resumed, and its watchdog extended the lock) keeps it. The old
holder is fenced from then on: its watchdog's next extension fails (the
lock holds another token), and ack.lua refuses its acknowledgement.

KEYS[1]  the shard's flush lock (STRING holding the owner's token)

ARGV[1]  the token of the holder judged dead
ARGV[2]  the new holder's token
ARGV[3]  the new holder's TTL, ms
ARGV[4]  the most time (ms) the lock may have left for the takeover; -1 for
         no condition (the holder's process is known to be gone)

Returns 1 when taken over; 0 when the lock no longer holds ARGV[1], has no
expiry, or was extended since (more than ARGV[4] ms left): nothing is done.

allow-oom: runs above maxmemory: the drain must start when Redis is full (one small string)
(lua_scripts/__init__.py says which scripts may).
]]

if redis.call('GET', KEYS[1]) ~= ARGV[1] then
  return 0
end
local most = tonumber(ARGV[4])
if most >= 0 then
  local left = redis.call('PTTL', KEYS[1])
  if left < 0 or left > most then
    return 0
  end
end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
return 1
