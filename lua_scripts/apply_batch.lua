--[[ apply_batch: apply a batch of events to one buffer shard, atomically.

KEYS[1]   the shard's queue (LIST of JSON rows; the flush sorts them by time)
KEYS[2]   the marker of this batch id (STRING, kept ARGV[2] seconds)
KEYS[3]   the shard's dead letters (LIST), for the batch's invalid events
KEYS[4]   the shard's session index (ZSET: session id -> when its last view was set, ms)
KEYS[5]   the shard's last views (HASH: session id -> stored view)
KEYS[6]   the shard's profiles' last views (HASH: profile field -> stored view)
KEYS[7..] the visitors ZSET of every project the batch touches, each once

ARGV[1]   now, epoch ms (visitor scores, session index scores)
ARGV[2]   TTL of the batch marker, seconds
ARGV[3]   TTL of a visitors ZSET, seconds (the active-visitor window and a margin)
ARGV[4]   TTL of the two last-view hashes, seconds (refreshed by every batch)
ARGV[5]   pub/sub channel to publish ARGV[6] on, or "" for no publish
ARGV[6]   the payload to publish
then four sections, each starting with its count:
  D, then D dead-letter entries (events of the batch that failed validation)
  R, then R rows of regular events (queued as they are)
  V, then V visitor sets: KEYS index of a project's visitors ZSET, member
     count M, then M profile ids (each once)
  the rest: 4 values per screen_view / session_end with a session, in order:
     meta        a screen_view's "<created ms>|<own duration>|" (the prefix of
                 its stored form), "" for a session_end
     session     the session id (field of KEYS[5], member of KEYS[4])
     profile     the profile's field in KEYS[6], or "" without a profile
     row         the event's JSON row, whose last field is `duration` unless
                 its own duration is 0

Returns {appended, queue_length}: appended is -1 when this batch id was
applied before (then nothing is done, dead letters included), otherwise the
rows appended. Returns {-2, key name} when a key holds a value of the wrong
type (nothing is done).

A last view is stored as "<created>|<own duration>|<row>", for its session
and a copy for its profile. When the session's next view arrives, the
stored row goes to the queue with duration = max(0, new created - old
created); a session_end queues it with its own duration, then itself, and
clears both copies. Every session's stored view is read with one HMGET and
written back with one HSET (one HDEL for ended ones), so events of one
session inside a batch see each other in order. The session index lets the
sweep find quiet sessions (the hashes have no per-field expiry).

Reads and checks come first, writes last: Redis does not roll a script back
when a command fails, so every command that can fail on a key (a wrong
type) runs before the first write, and a failed call leaves nothing behind.
]]

-- The queue's length, 0 when it is not a list (then this batch writes no rows to it).
local function queue_length()
  local length = redis.pcall('LLEN', KEYS[1])
  return type(length) == 'number' and length or 0
end

if redis.call('EXISTS', KEYS[2]) == 1 then
  return {-1, queue_length()}
end

local now = ARGV[1]

-- The sections' positions in ARGV.
local dead_at = 7
local n_dead = tonumber(ARGV[dead_at])
local regular_at = dead_at + n_dead + 1
local n_regular = tonumber(ARGV[regular_at])
local visitors_at = regular_at + n_regular + 1
local n_sets = tonumber(ARGV[visitors_at])
local at = visitors_at + 1
local visitor_sets = {}  -- {key index, first profile's ARGV index, count}
for _ = 1, n_sets do
  local count = tonumber(ARGV[at + 1])
  visitor_sets[#visitor_sets + 1] = {tonumber(ARGV[at]), at + 2, count}
  at = at + 2 + count
end
local views_at = at
local has_views = views_at <= #ARGV

-- The keys this batch writes must be of their type (or absent). Only those:
-- a batch of dead letters alone still lands when another key is broken.
local function wrong_type(idx, expected)
  local kind = redis.call('TYPE', KEYS[idx])['ok']
  return kind ~= 'none' and kind ~= expected
end
local checks = {{3, 'list', n_dead > 0}, {1, 'list', n_regular > 0 or has_views},
  {4, 'zset', has_views}, {5, 'hash', has_views}, {6, 'hash', has_views}}
for _, check in ipairs(checks) do
  if check[3] and wrong_type(check[1], check[2]) then return {-2, KEYS[check[1]]} end
end
for idx = 7, #KEYS do
  if wrong_type(idx, 'zset') then return {-2, KEYS[idx]} end
end

-- Every session's stored view, read at once.
local sessions, seen = {}, {}
for i = views_at + 1, #ARGV, 4 do
  local session = ARGV[i]
  if not seen[session] then
    seen[session] = true
    sessions[#sessions + 1] = session
  end
end
local state = {}  -- session id -> stored view, or false once cleared
for start = 1, #sessions, 1000 do
  local last = math.min(start + 999, #sessions)
  local values = redis.call('HMGET', KEYS[5], unpack(sessions, start, last))
  for j = start, last do state[sessions[j]] = values[j - start + 1] end
end

-- The stored row with `duration` set to ms: cut its own duration field (known
-- length, no scan) and append the new one; without ms, the row as stored.
local function queued_row(stored, ms)
  local bar1 = string.find(stored, '|', 1, true)
  local bar2 = string.find(stored, '|', bar1 + 1, true)
  if ms == nil then
    return string.sub(stored, bar2 + 1)
  end
  local own = bar2 - bar1 - 1  -- digits of the own duration
  local cut = (own == 1 and string.byte(stored, bar1 + 1) == 48) and 1 or (13 + own)
  return string.sub(stored, bar2 + 1, -1 - cut) .. ',"duration":' .. string.format('%d', ms) .. '}'
end

local function created_of(stored)
  return tonumber(string.sub(stored, 1, string.find(stored, '|', 1, true) - 1))
end

-- Screen views and session ends, in order.
local out = {}
local profiles = {}  -- profile field -> stored view, or false once cleared
for i = views_at, #ARGV, 4 do
  local meta, session, profile, row = ARGV[i], ARGV[i + 1], ARGV[i + 2], ARGV[i + 3]
  local previous = state[session]
  if meta ~= '' then
    if previous then
      out[#out + 1] = queued_row(previous, math.max(0, created_of(meta) - created_of(previous)))
    end
    local stored = meta .. row
    state[session] = stored
    if profile ~= '' then profiles[profile] = stored end
  else
    if previous then out[#out + 1] = queued_row(previous, nil) end
    out[#out + 1] = row
    state[session] = false
    if profile ~= '' then profiles[profile] = false end
  end
end

-- Writes: none of them can fail on a key's type any more.
local length = 0

local function call_in_chunks(command, key, items, from, to)
  for start = from, to, 1000 do
    length = redis.call(command, key, unpack(items, start, math.min(start + 999, to)))
  end
end

-- Dead letters.
for start = dead_at + 1, dead_at + n_dead, 1000 do
  redis.call('RPUSH', KEYS[3], unpack(ARGV, start, math.min(start + 999, dead_at + n_dead)))
end

-- Regular events.
call_in_chunks('RPUSH', KEYS[1], ARGV, regular_at + 1, regular_at + n_regular)
local n_out = n_regular

-- Active visitors.
for _, set in ipairs(visitor_sets) do
  local key, first, count = KEYS[set[1]], set[2], set[3]
  local pairs_ = {}
  for i = 1, count do
    pairs_[2 * i - 1] = now
    pairs_[2 * i] = ARGV[first + i - 1]
  end
  for start = 1, #pairs_, 1000 do
    redis.call('ZADD', key, unpack(pairs_, start, math.min(start + 999, #pairs_)))
  end
  redis.call('EXPIRE', key, ARGV[3])
end

-- Last views and the session index.
local stored, ended, indexed = {}, {}, {}
for _, session in ipairs(sessions) do
  local value = state[session]
  if value then
    stored[#stored + 1] = session
    stored[#stored + 1] = value
    indexed[#indexed + 1] = now
    indexed[#indexed + 1] = session
  else
    ended[#ended + 1] = session
  end
end
for start = 1, #stored, 1000 do
  redis.call('HSET', KEYS[5], unpack(stored, start, math.min(start + 999, #stored)))
end
for start = 1, #ended, 1000 do
  redis.call('HDEL', KEYS[5], unpack(ended, start, math.min(start + 999, #ended)))
  redis.call('ZREM', KEYS[4], unpack(ended, start, math.min(start + 999, #ended)))
end
for start = 1, #indexed, 1000 do
  redis.call('ZADD', KEYS[4], unpack(indexed, start, math.min(start + 999, #indexed)))
end
local profile_set, profile_ended = {}, {}
for profile, value in pairs(profiles) do
  if value then
    profile_set[#profile_set + 1] = profile
    profile_set[#profile_set + 1] = value
  else
    profile_ended[#profile_ended + 1] = profile
  end
end
for start = 1, #profile_set, 1000 do
  redis.call('HSET', KEYS[6], unpack(profile_set, start, math.min(start + 999, #profile_set)))
end
for start = 1, #profile_ended, 1000 do
  redis.call('HDEL', KEYS[6], unpack(profile_ended, start, math.min(start + 999, #profile_ended)))
end
if #stored > 0 then redis.call('EXPIRE', KEYS[5], ARGV[4]) end
if #profile_set > 0 then redis.call('EXPIRE', KEYS[6], ARGV[4]) end

call_in_chunks('RPUSH', KEYS[1], out, 1, #out)
n_out = n_out + #out
if n_out == 0 then
  length = queue_length()
end

redis.call('SET', KEYS[2], '1', 'EX', ARGV[2])
if ARGV[5] ~= '' then
  redis.call('PUBLISH', ARGV[5], ARGV[6])
end
return {n_out, length}
