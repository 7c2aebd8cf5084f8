--[[ apply_batch: apply a batch of events to one buffer shard, atomically.

KEYS[1]   the shard's queue (LIST of JSON rows; the flush sorts them by time)
KEYS[2]   the marker of this batch id (STRING, kept ARGV[3] seconds)
KEYS[3]   the shard's dead letters (LIST), for the batch's invalid events
KEYS[4]   the shard's session index (ZSET: session id -> when its last view was set, ms)
KEYS[5..] every session, profile and visitors key the batch touches, each
          once; the sections below refer to them by index into KEYS

ARGV[1]   now, epoch ms (visitor scores, session index scores)
ARGV[2]   TTL of a last screen_view, seconds
ARGV[3]   TTL of the batch marker, seconds
ARGV[4]   TTL of a visitors ZSET, seconds (the active-visitor window and a margin)
ARGV[5]   pub/sub channel to publish ARGV[6] on, or "" for no publish
ARGV[6]   the payload to publish
then four sections, each starting with its count:
  D, then D dead-letter entries (events of the batch that failed validation)
  R, then R rows of regular events (queued as they are)
  V, then V visitor sets: KEYS index of a project's visitors ZSET, member
     count M, then M profile ids (each once)
  the rest: 7 values per screen_view / session_end with a session, in order:
     kind        "v" screen_view, "e" session_end
     session     KEYS index of the session's last-view key
     profile     KEYS index of the profile's last-view key, or 0
     session_id  the session id (member of the session index)
     created     created_at, epoch ms
     duration    the event's own duration, ms ("0": the row has no duration field)
     row         the event's JSON row, whose last field is `duration` unless 0

Returns {appended, queue_length}: appended is -1 when this batch id was
applied before (then nothing is done, dead letters included), otherwise the
rows appended. Returns {-2, key name} when a key holds a value of the wrong type
(nothing is done).

Reads and checks come first, writes last: Redis does not roll a script back
when a command fails, so every command that can fail on a key (a wrong
type) runs before the first write, and a failed call leaves nothing behind.

A last view (of a session, and a copy for its profile) is stored as
"<created>|<own duration>|<row>". When the
session's next view arrives, the stored row goes to the queue with
duration = max(0, new created - old created); session_end queues it with
its own duration. Each session key is read at most once and every key
written at most once per call, so events of one session inside a batch see
each other in order. The session index lets the sweep find quiet sessions.
]]

if redis.call('EXISTS', KEYS[2]) == 1 then
  return {-1, redis.call('LLEN', KEYS[1])}
end

local now = ARGV[1]
local queue = KEYS[1]

-- The lists and sorted sets written below must be of their type (or absent).
local function wrong_type(idx, expected)
  local kind = redis.call('TYPE', KEYS[idx])['ok']
  return kind ~= 'none' and kind ~= expected
end
if wrong_type(1, 'list') then return {-2, KEYS[1]} end
if wrong_type(3, 'list') then return {-2, KEYS[3]} end
if wrong_type(4, 'zset') then return {-2, KEYS[4]} end

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
  local idx = tonumber(ARGV[at])
  if wrong_type(idx, 'zset') then return {-2, KEYS[idx]} end
  local count = tonumber(ARGV[at + 1])
  visitor_sets[#visitor_sets + 1] = {idx, at + 2, count}
  at = at + 2 + count
end

-- Screen views and session ends, in order: reads only, writes are collected.
local out = {}
local state = {}         -- key index -> stored value, or false once cleared
local touched = {}       -- key indexes, in first-touch order
local session_of = {}    -- session key index -> session id

local function load(idx)
  local value = state[idx]
  if value == nil then
    value = redis.pcall('GET', KEYS[idx])
    if type(value) == 'table' and value['err'] then return nil, true end
    state[idx] = value
    touched[#touched + 1] = idx
  end
  return value, false
end

local function store(idx, value)
  if state[idx] == nil then touched[#touched + 1] = idx end
  state[idx] = value
end

-- The stored row with `duration` set to ms: cut its own duration field (known
-- length, no scan) and append the new one.
local function queued_row(stored, ms)
  local bar1 = string.find(stored, '|', 1, true)
  local bar2 = string.find(stored, '|', bar1 + 1, true)
  local own = string.sub(stored, bar1 + 1, bar2 - 1)
  if ms == nil then
    return string.sub(stored, bar2 + 1)
  end
  local cut = own == '0' and 1 or (13 + #own)  -- '}' or ',"duration":<own>}'
  return string.sub(stored, bar2 + 1, -1 - cut) .. ',"duration":' .. string.format('%d', ms) .. '}'
end

for i = at, #ARGV, 7 do
  local kind = ARGV[i]
  local session = tonumber(ARGV[i + 1])
  local profile = tonumber(ARGV[i + 2])
  local session_id = ARGV[i + 3]
  local created = ARGV[i + 4]
  local previous, failed = load(session)
  if failed then return {-2, KEYS[session]} end

  if kind == 'v' then
    if previous then
      local elapsed = tonumber(created) - tonumber(string.sub(previous, 1, string.find(previous, '|', 1, true) - 1))
      out[#out + 1] = queued_row(previous, math.max(0, elapsed))
    end
    local stored = created .. '|' .. ARGV[i + 5] .. '|' .. ARGV[i + 6]
    store(session, stored)
    if profile > 0 then store(profile, stored) end
  else
    if previous then out[#out + 1] = queued_row(previous, nil) end
    out[#out + 1] = ARGV[i + 6]
    store(session, false)
    if profile > 0 then store(profile, false) end
  end
  session_of[session] = session_id
end

-- Writes: none of them can fail on a key's type any more.
local length = 0
local n_out = 0

local function push_args(key, from, to)
  for start = from, to, 1000 do
    length = redis.call('RPUSH', key, unpack(ARGV, start, math.min(start + 999, to)))
  end
end

-- Dead letters.
for start = dead_at + 1, dead_at + n_dead, 1000 do
  redis.call('RPUSH', KEYS[3], unpack(ARGV, start, math.min(start + 999, dead_at + n_dead)))
end

-- Regular events.
push_args(queue, regular_at + 1, regular_at + n_regular)
n_out = n_regular

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
  redis.call('EXPIRE', key, ARGV[4])
end

-- Last views (SET replaces whatever a key held), and the session index.
local indexed, ended = {}, {}  -- session index changes, sent in one call each
for _, idx in ipairs(touched) do
  local value = state[idx]
  local session_id = session_of[idx]
  if value then
    redis.call('SET', KEYS[idx], value, 'EX', ARGV[2])
    if session_id then
      indexed[#indexed + 1] = now
      indexed[#indexed + 1] = session_id
    end
  else
    redis.call('DEL', KEYS[idx])
    if session_id then ended[#ended + 1] = session_id end
  end
end
for start = 1, #indexed, 1000 do
  redis.call('ZADD', KEYS[4], unpack(indexed, start, math.min(start + 999, #indexed)))
end
for start = 1, #ended, 1000 do
  redis.call('ZREM', KEYS[4], unpack(ended, start, math.min(start + 999, #ended)))
end

for start = 1, #out, 1000 do
  length = redis.call('RPUSH', queue, unpack(out, start, math.min(start + 999, #out)))
end
n_out = n_out + #out
if n_out == 0 then
  length = redis.call('LLEN', queue)
end

redis.call('SET', KEYS[2], '1', 'EX', ARGV[3])
if ARGV[5] ~= '' then
  redis.call('PUBLISH', ARGV[5], ARGV[6])
end
return {n_out, length}
