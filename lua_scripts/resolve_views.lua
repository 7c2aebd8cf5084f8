--[[ resolve_views: queue the views sessions were waiting with, for their first event of a batch.

Runs inside the transaction that applies a batch (worker/apply.py). For
each session of the batch it reads the view the session was waiting with
(if any) and queues it: with duration = max(0, first view's created -
stored view's created) when the session's first event in the batch is a
screen_view, unchanged (its own duration) when it is a session_end. The
rest of the batch, new last views included, is written by the plain
commands after this one, so this script never sees the batch's own rows.

KEYS[1]   the shard's queue (LIST of JSON rows)
KEYS[2]   the shard's last views (HASH: session id -> "<created ms>|<own duration>|<row>")

ARGV      two values per session: its id, and the created ms of its first
          screen_view of the batch ("" when its first event is a session_end)

Returns the number of views queued.
]]

if #ARGV == 0 then
  return 0
end
local sessions = {}
for i = 1, #ARGV, 2 do
  sessions[#sessions + 1] = ARGV[i]
end

local out = {}
for start = 1, #sessions, 1000 do
  local last = math.min(start + 999, #sessions)
  local stored = redis.call('HMGET', KEYS[2], unpack(sessions, start, last))
  for j = start, last do
    local value = stored[j - start + 1]
    if value then
      local bar1 = string.find(value, '|', 1, true)
      local bar2 = string.find(value, '|', bar1 + 1, true)
      local first = ARGV[2 * j]
      if first == '' then
        out[#out + 1] = string.sub(value, bar2 + 1)
      else
        local ms = math.max(0, tonumber(first) - tonumber(string.sub(value, 1, bar1 - 1)))
        -- Cut the row's own duration (its last field, absent when 0) and append the new one.
        local own = bar2 - bar1 - 1
        local cut = (own == 1 and string.byte(value, bar1 + 1) == 48) and 1 or (13 + own)
        out[#out + 1] = string.sub(value, bar2 + 1, -1 - cut)
          .. ',"duration":' .. string.format('%d', ms) .. '}'
      end
    end
  end
end
for start = 1, #out, 1000 do
  redis.call('RPUSH', KEYS[1], unpack(out, start, math.min(start + 999, #out)))
end
return #out
