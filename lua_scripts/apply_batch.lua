--[[ apply_batch: apply a batch of events to one buffer shard, atomically.

KEYS[1]   the shard's queue (LIST of JSON rows, oldest first)
KEYS[2]   the marker of this batch id (STRING, kept ARGV[3] seconds)
KEYS[3]   the shard's dead letters (LIST), for the batch's invalid events
KEYS[4]   the shard's session index (ZSET: session id -> when its last view was set, ms)
KEYS[5..] every session, profile and visitors key the events touch,
          each once; events refer to them by index into KEYS

ARGV[1]   now, epoch ms (visitor scores, session index scores)
ARGV[2]   TTL of a last screen_view, seconds
ARGV[3]   TTL of the batch marker, seconds
ARGV[4]   TTL of a visitors ZSET, seconds (the active-visitor window and a margin)
ARGV[5]   pub/sub channel to publish ARGV[6] on, or "" for no publish
ARGV[6]   the payload to publish
ARGV[7]   D, the number of dead-letter entries that follow
ARGV[8..7+D]  dead-letter entries (events of the batch that failed validation)
ARGV[8+D..]   8 values per event, in order:
            kind        "r" regular, "v" screen_view, "e" session_end
            session     index into KEYS of the session's last-view key, or 0
            profile     index into KEYS of the profile's last-view key, or 0
            visitors    index into KEYS of the project's visitors ZSET, or 0
            session_id  the session id (member of the session index), "" for regular
            profile_id  the profile id recorded as a visitor ("" without one)
            created     created_at, epoch ms
            row         the event's JSON row; `duration` is its last field

Returns {appended, queue_length}: appended is -1 when this batch id was
applied before (then nothing is done, dead letters included), otherwise the
rows appended.

A last screen_view is stored as "<created ms>|<row>". When the session's
next view arrives, the stored row goes to the queue with
duration = max(0, new created - old created) written over its last field.
Each session key is read at most once, and every key written at most once,
per call, so events of one session inside a batch see each other in order.
The session index lets the sweep find views whose session went quiet.
]]

if redis.call('EXISTS', KEYS[2]) == 1 then
  return {-1, redis.call('LLEN', KEYS[1])}
end

local out = {}
local n_out = 0
local state = {}         -- key index -> stored value, or false once cleared
local touched = {}       -- key indexes, in first-touch order
local session_of = {}    -- session key index -> session id
local members = {}       -- visitors key index -> {score, member, score, member ...}
local visitor_keys = {}  -- visitors key indexes, in first-touch order

local function load(idx)
  local value = state[idx]
  if value == nil then
    value = redis.call('GET', KEYS[idx])
    state[idx] = value
    touched[#touched + 1] = idx
  end
  return value
end

local function store(idx, value)
  if state[idx] == nil then touched[#touched + 1] = idx end
  state[idx] = value
end

local function with_duration(row, ms)
  local cut = string.find(row, ',"duration":%d+}$')
  local body = cut and string.sub(row, 1, cut - 1) or string.sub(row, 1, -2)
  return body .. ',"duration":' .. string.format('%d', ms) .. '}'
end

local n_dead = tonumber(ARGV[7])
local first_event = 8 + n_dead

for i = first_event, #ARGV, 8 do
  local kind = ARGV[i]
  local session = tonumber(ARGV[i + 1])
  local profile = tonumber(ARGV[i + 2])
  local visitors = tonumber(ARGV[i + 3])
  local created = ARGV[i + 6]
  local row = ARGV[i + 7]

  if kind == 'v' then
    local previous = load(session)
    if previous then
      local bar = string.find(previous, '|', 1, true)
      local elapsed = tonumber(created) - tonumber(string.sub(previous, 1, bar - 1))
      n_out = n_out + 1
      out[n_out] = with_duration(string.sub(previous, bar + 1), math.max(0, elapsed))
    end
    local stored = created .. '|' .. row
    store(session, stored)
    session_of[session] = ARGV[i + 4]
    if profile > 0 then store(profile, stored) end
  elseif kind == 'e' then
    local previous = load(session)
    if previous then
      n_out = n_out + 1
      out[n_out] = string.sub(previous, string.find(previous, '|', 1, true) + 1)
    end
    n_out = n_out + 1
    out[n_out] = row
    store(session, false)
    session_of[session] = ARGV[i + 4]
    if profile > 0 then store(profile, false) end
  else
    n_out = n_out + 1
    out[n_out] = row
  end

  if visitors > 0 then
    local list = members[visitors]
    if not list then
      list = {}
      members[visitors] = list
      visitor_keys[#visitor_keys + 1] = visitors
    end
    list[#list + 1] = ARGV[1]
    list[#list + 1] = ARGV[i + 5]
  end
end

for _, idx in ipairs(touched) do
  local value = state[idx]
  local session_id = session_of[idx]
  if value then
    redis.call('SET', KEYS[idx], value, 'EX', ARGV[2])
    if session_id then redis.call('ZADD', KEYS[4], ARGV[1], session_id) end
  else
    redis.call('DEL', KEYS[idx])
    if session_id then redis.call('ZREM', KEYS[4], session_id) end
  end
end

for _, idx in ipairs(visitor_keys) do
  local list = members[idx]
  for start = 1, #list, 1000 do
    redis.call('ZADD', KEYS[idx], unpack(list, start, math.min(start + 999, #list)))
  end
  redis.call('EXPIRE', KEYS[idx], ARGV[4])
end

local length = redis.call('LLEN', KEYS[1])
for start = 1, n_out, 1000 do
  length = redis.call('RPUSH', KEYS[1], unpack(out, start, math.min(start + 999, n_out)))
end

for start = 8, first_event - 1, 1000 do
  redis.call('RPUSH', KEYS[3], unpack(ARGV, start, math.min(start + 999, first_event - 1)))
end

redis.call('SET', KEYS[2], '1', 'EX', ARGV[3])
if ARGV[5] ~= '' then
  redis.call('PUBLISH', ARGV[5], ARGV[6])
end
return {n_out, length}
