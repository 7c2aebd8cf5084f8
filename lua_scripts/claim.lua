#!lua flags=allow-oom
--[[ claim: hand the flusher a batch of the oldest queued rows.

A claim is the head of the queue: its first `count` rows, recorded with an
id. The rows stay in the queue until ack.lua removes them, so nothing is
lost if the flusher dies; the next flush gets the same claim back (same id,
same rows) and re-drives it with the same ClickHouse dedup tokens.

The chunk size is part of the claim: every flusher re-driving it cuts the
same chunks (and so uses the same dedup tokens), whatever its own setting.

KEYS[1]  the shard's queue (LIST)
KEYS[2]  the shard's open claim (HASH: id, count, at, chunk; redrives: how many times it
         was handed back)
KEYS[3]  the shard's flush stats (HASH; removed_total: rows ack.lua has taken off the
         queue's head, ever)

ARGV[1]  id for a new claim
ARGV[2]  the most rows a new claim may take
ARGV[3]  now, epoch ms
ARGV[4]  rows per chunk for a new claim

Returns {} when there is no open claim and the queue is empty, otherwise
{claim id, redriven (1 for an open claim handed back, else 0), claimed at
(ms), rows per chunk, rows claimed, position}. The claim is the first
`rows claimed` rows of the queue; `position` is removed_total, the number
of rows removed from the head before them.

The rows themselves are not returned: the caller reads them with LRANGE
(a Lua string of every row would cost Redis a copy per row), between two
reads of removed_total that must equal `position`. Only ack.lua trims the
queue, always from the head, and adds what it trimmed to removed_total;
rows are only ever appended at the tail. So a row's position
(removed_total + its index) names it for good, and rows read at the right
positions, even ahead of the claim, are the claim's rows (worker/claims.py
holds the whole protocol).

allow-oom: runs above maxmemory: the drain must start when Redis is full (a claim adds one small hash)
(lua_scripts/__init__.py says which scripts may).
]]

local open = redis.call('HMGET', KEYS[2], 'id', 'count', 'at', 'chunk')
local position = redis.call('HGET', KEYS[3], 'removed_total') or 0
if open[1] then
  -- A write even for a re-drive: a WAIT after this call then covers the claim too.
  redis.call('HINCRBY', KEYS[2], 'redrives', 1)
  return {open[1], 1, open[3], open[4] or ARGV[4], tonumber(open[2]), tonumber(position)}
end

local count = math.min(redis.call('LLEN', KEYS[1]), tonumber(ARGV[2]))
if count == 0 then
  return {}
end
redis.call('HSET', KEYS[2], 'id', ARGV[1], 'count', count, 'at', ARGV[3], 'chunk', ARGV[4])
return {ARGV[1], 0, ARGV[3], ARGV[4], count, tonumber(position)}
