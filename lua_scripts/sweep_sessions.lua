#!lua flags=allow-oom
--[[ sweep_sessions: queue the last screen_views of sessions that went quiet.

A session that never sends session_end would otherwise keep its last view
waiting for good (the last-view hashes have no per-field expiry). The
caller lists candidate sessions (from the session index, idle since before
ARGV[1]); each is checked again here, atomically, so a session that got a
new view meanwhile is left alone.

KEYS[1]   the shard's queue (LIST)
KEYS[2]   the shard's session index (ZSET: session id -> last view set, ms)
KEYS[3]   the shard's last views (HASH: session id -> stored view, worker/stored_view.py:
          "<created ms>;<own duration>;<head>", or the legacy "<created ms>|<own>|<row>")
KEYS[4]   the shard's profiles' last views (HASH: profile field -> stored view)

ARGV[1]   cutoff, epoch ms: sessions whose index score is above it are active
ARGV[2..] two values per candidate, in order: the session id, and its view's
          profile field in KEYS[4] ("" when the view has no profile)

Returns the number of views queued. Each is queued unchanged (as
session_end would), its session leaves the hash and the index; the
profile's copy is removed only if it still holds this same view.

allow-oom: runs above maxmemory: waiting views move into the queue (no net growth), so a full Redis still drains
(lua_scripts/__init__.py says which scripts may).
]]

-- The row of a stored view as it is (its own duration), in either form (worker/stored_view.py).
local function as_is(value)
  local sep, own, at = string.match(value, '^-?%d+([;|])(-?%d+)[;|]()')
  if sep == '|' then
    return string.sub(value, at)  -- legacy: the row, with its own duration
  elseif own == '0' then
    return string.sub(value, at) .. '}'
  end
  return string.sub(value, at) .. ',"duration":' .. own .. '}'
end

local cutoff = tonumber(ARGV[1])
local queued = 0
for i = 2, #ARGV, 2 do
  local session, profile = ARGV[i], ARGV[i + 1]
  local score = redis.call('ZSCORE', KEYS[2], session)
  if score and tonumber(score) <= cutoff then
    local value = redis.call('HGET', KEYS[3], session)
    if value then
      redis.call('RPUSH', KEYS[1], as_is(value))
      queued = queued + 1
      redis.call('HDEL', KEYS[3], session)
      if profile ~= '' and redis.call('HGET', KEYS[4], profile) == value then
        redis.call('HDEL', KEYS[4], profile)
      end
    end
    redis.call('ZREM', KEYS[2], session)
  end
end
return queued
