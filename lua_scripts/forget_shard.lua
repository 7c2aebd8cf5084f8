#!lua flags=allow-oom
--[[ forget_shard: erase one person's events from one shard, atomically.

`eventbuffer forget` (worker/privacy/buffer_erasure.py) found the entries in Python
(rows are JSON: matching them here would hold Redis for a whole queue) and
names each one by where it read it and its exact value. This script removes
exactly those that are still there and unchanged; whatever moved or changed
meanwhile is counted as missed and the caller looks again.

The caller holds the shard's flush lock, so no claim is acknowledged and no
rows are read ahead while queue rows are removed from the middle of the
queue. Rows of the open claim (the first `count` rows) are never removed:
the claim's chunks and dedup tokens must stay what they were. The flusher
drops them right before its insert instead (worker/privacy/tombstones.py), and
its ack trims them.

KEYS[1]  the shard's queue (LIST of JSON rows)
KEYS[2]  the shard's open claim (HASH; count: rows of the queue's head it holds)
KEYS[3]  the shard's dead letters (LIST: JSON header, newline, raw payload)
KEYS[4]  the shard's last views (HASH: session id -> a stored view: worker/stored_view.py)
KEYS[5]  the shard's profiles' last views (HASH: "<proj>:<pid>" -> same format)
KEYS[6]  the shard's sessions with a last view (ZSET: session id -> when set)
KEYS[7]  the shard's active visitors of the person's project (ZSET: profile id -> last seen)

ARGV[1]  a member to remove from KEYS[7] ("" for none)
ARGV[2]  q: how many queue rows follow, then q pairs:
           index  where the row was read (0-based), in descending order
           row    its exact value
ARGV     then d: how many dead letters follow, then d triples:
           index        where the entry was read (0-based), in descending order
           entry        its exact value
           replacement  the entry without the person's events ("" removes it whole)
ARGV     then v: how many session views follow, then v pairs (session id, exact value)
ARGV     then p: how many profile views follow, then p pairs (field, exact value)

Returns {queue rows removed, queue rows left in the open claim, dead letters removed,
dead letters rewritten, session views removed, profile views removed, visitors
removed, entries missed (moved or changed since they were read)}.

allow-oom: runs above maxmemory: it only removes entries or shortens them (a
dead letter rewritten without some of its events), and erasure must work on a
full Redis (lua_scripts/__init__.py says which scripts may).
]]

-- Rows and dead letters start with '{': they never equal this.
local marker = '\0eventbuffer:forgotten'
local claimed = tonumber(redis.call('HGET', KEYS[2], 'count') or '0')
local missed = 0
local at = 3

local queue_marked, in_claim = 0, 0
for _ = 1, tonumber(ARGV[2]) do
  local index, row = tonumber(ARGV[at]), ARGV[at + 1]
  at = at + 2
  if index < claimed then
    in_claim = in_claim + 1
  elseif redis.call('LINDEX', KEYS[1], index) == row then
    redis.call('LSET', KEYS[1], index, marker)
    queue_marked = queue_marked + 1
  else
    missed = missed + 1
  end
end
local queue_removed = 0
if queue_marked > 0 then
  queue_removed = redis.call('LREM', KEYS[1], 0, marker)
end

local dead_marked, rewritten = 0, 0
local count = tonumber(ARGV[at])
at = at + 1
for _ = 1, count do
  local index, entry, replacement = tonumber(ARGV[at]), ARGV[at + 1], ARGV[at + 2]
  at = at + 3
  if redis.call('LINDEX', KEYS[3], index) == entry then
    if replacement == '' then
      redis.call('LSET', KEYS[3], index, marker)
      dead_marked = dead_marked + 1
    else
      redis.call('LSET', KEYS[3], index, replacement)
      rewritten = rewritten + 1
    end
  else
    missed = missed + 1
  end
end
local dead_removed = 0
if dead_marked > 0 then
  dead_removed = redis.call('LREM', KEYS[3], 0, marker)
end

-- The views named at ARGV[from]: a count n, then n pairs (field, exact value).
-- Removes each field `hash` still holds with that value (and from `index`, a
-- ZSET, when given); counts the others as missed. Returns how many it removed
-- and the ARGV position after the pairs.
local function remove_views(hash, index, from)
  local removed = 0
  local n = tonumber(ARGV[from])
  local pos = from + 1
  for _ = 1, n do
    local field, value = ARGV[pos], ARGV[pos + 1]
    pos = pos + 2
    if redis.call('HGET', hash, field) == value then
      redis.call('HDEL', hash, field)
      if index then
        redis.call('ZREM', index, field)
      end
      removed = removed + 1
    else
      missed = missed + 1
    end
  end
  return removed, pos
end

local views, profile_views
views, at = remove_views(KEYS[4], KEYS[6], at)
profile_views, at = remove_views(KEYS[5], nil, at)

local visitors = 0
if ARGV[1] ~= '' then
  visitors = redis.call('ZREM', KEYS[7], ARGV[1])
end

return {queue_removed, in_claim, dead_removed, rewritten, views, profile_views, visitors, missed}
