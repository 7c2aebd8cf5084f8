#!lua flags=allow-oom
--[[ ack: remove a claim whose rows are all in ClickHouse.

Only the claim's own id acknowledges it, and only while the caller holds
the flush lock (or nobody does): a flusher whose lock expired and was taken
over cannot trim rows the new holder is working on.

KEYS[1]  the shard's flush lock (STRING holding the owner's token)
KEYS[2]  the shard's open claim (HASH: id, count, at, chunk, redrives, split:<token>; deleted)
KEYS[3]  the shard's queue (LIST)
KEYS[4]  the shard's dead letters (LIST)
KEYS[5]  the shard's flush stats (HASH: the last flush, and running totals
         rows_total / removed_total of rows inserted / taken off the queue)

ARGV[1]  the caller's lock token
ARGV[2]  the claim id being acknowledged
ARGV[3]  now, epoch ms
ARGV[4]  rows inserted into ClickHouse
ARGV[5]  pub/sub channel for the saved notice, or "" for none
ARGV[6]  the saved notice payload
ARGV[7..] dead-letter entries to append, for the claim's rejected rows

Returns 1 when acknowledged; 0 when that claim is no longer open (another
flusher acknowledged it; nothing is done); -1 when another token holds the
lock (nothing is done).

allow-oom: runs above maxmemory: it frees memory (trims the acknowledged rows), so it must run when Redis is full
(lua_scripts/__init__.py says which scripts may).
]]

local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then
  return -1
end
local open = redis.call('HMGET', KEYS[2], 'id', 'count')
if open[1] ~= ARGV[2] then
  return 0
end

-- Dead letters first: should storing them fail (a key of the wrong type), the
-- claimed rows are still in the queue and the claim still open.
local dead = #ARGV - 6
for start = 7, #ARGV, 1000 do
  redis.call('RPUSH', KEYS[4], unpack(ARGV, start, math.min(start + 999, #ARGV)))
end
redis.call('LTRIM', KEYS[3], tonumber(open[2]), -1)
redis.call('DEL', KEYS[2])
redis.call('HSET', KEYS[5], 'at', ARGV[3], 'rows', ARGV[4], 'dead', dead,
  'claim', ARGV[2], 'claimed', open[2])
redis.call('HINCRBY', KEYS[5], 'rows_total', ARGV[4])
redis.call('HINCRBY', KEYS[5], 'removed_total', open[2])
if ARGV[5] ~= '' then
  redis.call('PUBLISH', ARGV[5], ARGV[6])
end
return 1
