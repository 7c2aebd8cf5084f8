--[[ resolve_views: queue the views sessions were waiting with, for their first event of a batch.

Runs inside the transaction that applies a batch (worker/apply.py). For
each session of the batch it reads the view the session was waiting with
(if any) and queues it: with duration = max(0, first view's created -
stored view's created) when the session's first event in the batch is a
screen_view, unchanged (its own duration) when it is a session_end. The
rest of the batch, new last views included, is written by the plain
commands after this one, so this script never sees the batch's own rows.

KEYS[1]   the shard's queue (LIST of JSON rows)
KEYS[2]   the shard's last views (HASH: session id -> stored view)

A stored view is "<created ms>;<own duration>;<head>", head being the view's
row without its duration field and closing brace; the rows queued for it are
built from the head and a suffix. worker/stored_view.py describes the form,
and the legacy "<created ms>|<own duration>|<row>" still read here.

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

-- A stored view's created ms, own duration (text) and head (its first and last
-- position), in either form (worker/stored_view.py).
local function parse(value)
  local created, sep, own, at = string.match(value, '^(-?%d+)([;|])(-?%d+)[;|]()')
  local stop = #value
  if sep == '|' then  -- legacy: the row ends with its own duration (absent when 0)
    stop = stop - ((own == '0') and 1 or (13 + #own))
  end
  return tonumber(created), own, at, stop
end

local out = {}
for start = 1, #sessions, 1000 do
  local last = math.min(start + 999, #sessions)
  local stored = redis.call('HMGET', KEYS[2], unpack(sessions, start, last))
  for j = start, last do
    local value = stored[j - start + 1]
    if value then
      local created, own, at, stop = parse(value)
      local first = ARGV[2 * j]
      local ms = own
      if first ~= '' then
        ms = string.format('%d', math.max(0, tonumber(first) - created))
      end
      if ms == '0' and first == '' then
        out[#out + 1] = string.sub(value, at, stop) .. '}'
      else
        out[#out + 1] = string.sub(value, at, stop) .. ',"duration":' .. ms .. '}'
      end
    end
  end
end
for start = 1, #out, 1000 do
  redis.call('RPUSH', KEYS[1], unpack(out, start, math.min(start + 999, #out)))
end
return #out
