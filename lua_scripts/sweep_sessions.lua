--[[ sweep_sessions: queue the last screen_views of sessions that went quiet.

A session that never sends session_end would otherwise lose its last view
when the view's key expires. The caller lists candidate sessions (from the
session index, idle since before ARGV[1]); each is checked again here,
atomically, so a session that got a new view meanwhile is left alone.

KEYS[1]       the shard's queue (LIST)
KEYS[2]       the shard's session index (ZSET: session id -> last view set, ms)
KEYS[3..]     two keys per candidate session, in order: its last-view key, and
              its profile's last-view key (the session key again when the
              view has no profile)

ARGV[1]       cutoff, epoch ms: sessions whose index score is above it are active
ARGV[2..]     two values per candidate, in order: the session id, and "1" when
              the second key is a profile key, else "0"

Returns the number of views queued. Each is queued unchanged (as
session_end would), the session key is deleted and the session leaves the
index; the profile key is deleted only if it still holds this same view.
]]

local cutoff = tonumber(ARGV[1])
local queued = 0
for n = 0, (#ARGV - 1) / 2 - 1 do
  local session_id = ARGV[2 + 2 * n]
  local has_profile = ARGV[3 + 2 * n] == '1'
  local session_key = KEYS[3 + 2 * n]
  local profile_key = KEYS[4 + 2 * n]
  local score = redis.call('ZSCORE', KEYS[2], session_id)
  if score and tonumber(score) <= cutoff then
    local value = redis.call('GET', session_key)
    if value then
      local bar1 = string.find(value, '|', 1, true)
      local bar2 = string.find(value, '|', bar1 + 1, true)
      redis.call('RPUSH', KEYS[1], string.sub(value, bar2 + 1))
      queued = queued + 1
      redis.call('DEL', session_key)
      if has_profile and redis.call('GET', profile_key) == value then
        redis.call('DEL', profile_key)
      end
    end
    redis.call('ZREM', KEYS[2], session_id)
  end
end
return queued
