--[[ release_held: apply the held session events whose reorder window has passed, by created_at.

With a reorder window (EVENT_BUFFER_REORDER_WINDOW_MS > 0) the apply does
not give screen_views and session_ends to their session at once: it holds
them in KEYS[1], one member per event, ordered by session and created_at
(worker/reorder.py writes them; the member format is described there and
below). This script releases, per session listed in KEYS[2] as due, every
held event created no later than the newest held event whose deadline
(arrival + window) has passed, oldest created first, and applies OpenPanel's
session rules to them:

- screen_view: the session's last view (stored in KEYS[4]) is queued with
  duration = this view's created - its created; this view becomes the
  session's last view (and its profile's, in KEYS[6]).
- session_end: the last view is queued with its own duration, then the
  session_end; the session is closed (recorded in KEYS[7]).

An event is late when it reaches its session after its place was passed:
created before the session's stored last view, or before the session_end
that closed the session (remembered in KEYS[7] for ARGV[4] ms after that). A late view
is queued at once with its own duration (its neighbours keep theirs); a late
session_end still closes the session. Late events are counted in the reply.
An event created after the session_end that closed its session reopens it,
as OpenPanel's buffer does with events in order.

A held member: "<escaped session>|<created ms, 15 digits>|<deadline ms, 15
digits>|<tag>|<kind: v or e>|<profile field or empty>|<own duration>|<row>".
The escaped session contains no "|", so "[<esc>|" .. "(<esc>}" is exactly
its session's range; its row ends with its own duration (absent when 0).

KEYS[1]   held events (ZSET, all scores 0, ordered by member)
KEYS[2]   sessions with held events (ZSET: escaped session id -> earliest deadline, ms)
KEYS[3]   the shard's queue (LIST)
KEYS[4]   last views (HASH: session id -> "<created ms>|<own duration>|<row>")
KEYS[5]   session index (ZSET: session id -> when its last view was set, ms)
KEYS[6]   profiles' last views (HASH: profile field -> stored view)
KEYS[7]   closed sessions (HASH: session id -> the created ms its session_end closed it at)
KEYS[8]   when each closed session was closed (ZSET: session id -> ms), to forget it

ARGV[1]   now, epoch ms
ARGV[2]   at most this many sessions per call
ARGV[3]   TTL of KEYS[4] and KEYS[6], seconds (refreshed when written)
ARGV[4]   how long a closed session is remembered after its session_end was released, ms

Returns {rows queued, late events, 1 if more sessions are due else 0}; an error
reply, before anything is written, when a key has the wrong type.
]]

-- Every key's type first: a script's writes are not undone when a later command fails,
-- so a key of the wrong type must stop it before it takes any held event away.
local types = {'zset', 'zset', 'list', 'hash', 'zset', 'hash', 'hash', 'zset'}
for i, want in ipairs(types) do
  local found = redis.call('TYPE', KEYS[i])['ok']
  if found ~= 'none' and found ~= want then
    return redis.error_reply('WRONGTYPE ' .. KEYS[i] .. ' holds a ' .. found .. ', not a ' .. want)
  end
end

local now = tonumber(ARGV[1])
local forgotten = redis.call('ZRANGEBYSCORE', KEYS[8], '-inf', '(' .. (now - tonumber(ARGV[4])),
  'LIMIT', 0, 1000)
if #forgotten > 0 then
  redis.call('HDEL', KEYS[7], unpack(forgotten))
  redis.call('ZREM', KEYS[8], unpack(forgotten))
end
local due = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now, 'LIMIT', 0, tonumber(ARGV[2]) + 1)
local more = 0
if #due > tonumber(ARGV[2]) then
  more = 1
  due[#due] = nil
end
if #due == 0 then
  return {0, 0, 0}
end

local function unescape(text)
  return (string.gsub(text, '%%(%x%x)', function(h) return string.char(tonumber(h, 16)) end))
end

-- A row whose own duration (its last field, absent when 0) is replaced by `ms`.
local function with_duration(row, own, ms)
  local cut = (own == '0') and 1 or (13 + #own)
  return string.sub(row, 1, -1 - cut) .. ',"duration":' .. string.format('%d', ms) .. '}'
end

local queue = {}
local late = 0
local views_set, views_ended = {}, {}
-- Profile field -> {created, deadline, stored view or false (a session_end)}: the profile's
-- newest event by created_at, then arrival, among the released ones.
local profiles = {}
local profile_order = {}
local function profile_event(pfield, created, deadline, value)
  local known = profiles[pfield]
  if known == nil then
    profile_order[#profile_order + 1] = pfield
  elseif created < known[1] or (created == known[1] and deadline < known[2]) then
    return
  end
  profiles[pfield] = {created, deadline, value}
end

for _, esc in ipairs(due) do
  local members = redis.call('ZRANGEBYLEX', KEYS[1], '[' .. esc .. '|', '(' .. esc .. '}')
  local p = #esc + 2  -- where the created ms starts
  local cut = nil
  for _, m in ipairs(members) do
    if tonumber(string.sub(m, p + 16, p + 30)) <= now then
      local created = tonumber(string.sub(m, p, p + 14))
      if cut == nil or created > cut then cut = created end
    end
  end
  local last = 0  -- members[1..last] are released
  local next_deadline = nil
  for i, m in ipairs(members) do
    if cut ~= nil and tonumber(string.sub(m, p, p + 14)) <= cut then
      last = i
    else
      local deadline = tonumber(string.sub(m, p + 16, p + 30))
      if next_deadline == nil or deadline < next_deadline then next_deadline = deadline end
    end
  end
  if last > 0 then
    redis.call('ZREMRANGEBYLEX', KEYS[1], '[' .. esc .. '|', '[' .. members[last])
  end
  if next_deadline == nil then
    redis.call('ZREM', KEYS[2], esc)
  else
    redis.call('ZADD', KEYS[2], next_deadline, esc)
  end

  if last > 0 then
    local session = unescape(esc)
    -- A closed session: the created ms its session_end closed it at (false when open).
    local closed = redis.call('HGET', KEYS[7], session)
    closed = closed and tonumber(closed)
    local stored = redis.call('HGET', KEYS[4], session)
    -- The session's last view: created ms, own duration (text), row.
    local view_created, view_own, view_row = nil, nil, nil
    if stored then
      local bar1 = string.find(stored, '|', 1, true)
      local bar2 = string.find(stored, '|', bar1 + 1, true)
      view_created = tonumber(string.sub(stored, 1, bar1 - 1))
      view_own = string.sub(stored, bar1 + 1, bar2 - 1)
      view_row = string.sub(stored, bar2 + 1)
    end
    local view_changed, closed_changed = false, false
    for i = 1, last do
      local m = members[i]
      local created = tonumber(string.sub(m, p, p + 14))
      local deadline = tonumber(string.sub(m, p + 16, p + 30))
      local kind_at = string.find(m, '|', p + 32, true) + 1
      local kind = string.sub(m, kind_at, kind_at)
      local pf_end = string.find(m, '|', kind_at + 2, true)
      local pfield = string.sub(m, kind_at + 2, pf_end - 1)
      local own_end = string.find(m, '|', pf_end + 1, true)
      local own = string.sub(m, pf_end + 1, own_end - 1)
      local row = string.sub(m, own_end + 1)
      local is_late = (closed and created < closed) or (view_created and created < view_created)
      if is_late then
        late = late + 1
      elseif closed then
        closed, closed_changed = false, true  -- an event after the session_end reopens it
      end
      if kind == 'v' then
        if is_late then
          queue[#queue + 1] = row
        else
          if view_row then
            queue[#queue + 1] = with_duration(view_row, view_own, math.max(0, created - view_created))
          end
          view_created, view_own, view_row = created, own, row
          view_changed = true
          if pfield ~= '' then
            profile_event(pfield, created, deadline, created .. '|' .. own .. '|' .. row)
          end
        end
      else
        -- A session_end closes its session, late or not: the waiting view goes first.
        if view_row then
          queue[#queue + 1] = view_row
        end
        queue[#queue + 1] = row
        closed = math.max(created, view_created or 0, closed or 0)
        closed_changed = true
        view_created, view_own, view_row = nil, nil, nil
        view_changed = true
        if pfield ~= '' then
          profile_event(pfield, created, deadline, false)
        end
      end
    end
    if view_changed then
      if view_row then
        views_set[#views_set + 1] = {session, view_created .. '|' .. view_own .. '|' .. view_row}
      else
        views_ended[#views_ended + 1] = session
      end
    end
    if closed_changed then
      if closed then
        redis.call('HSET', KEYS[7], session, closed)
        redis.call('ZADD', KEYS[8], now, session)
      else
        redis.call('HDEL', KEYS[7], session)
        redis.call('ZREM', KEYS[8], session)
      end
    end
  end
end

for start = 1, #queue, 1000 do
  redis.call('RPUSH', KEYS[3], unpack(queue, start, math.min(start + 999, #queue)))
end
for _, pair in ipairs(views_set) do
  redis.call('HSET', KEYS[4], pair[1], pair[2])
  redis.call('ZADD', KEYS[5], now, pair[1])
end
if #views_set > 0 then
  redis.call('EXPIRE', KEYS[4], tonumber(ARGV[3]))
end
for _, session in ipairs(views_ended) do
  redis.call('HDEL', KEYS[4], session)
  redis.call('ZREM', KEYS[5], session)
end
-- A profile's stored view is replaced (or cleared) only by an event not older than it.
local profiles_set = false
for _, pfield in ipairs(profile_order) do
  local event = profiles[pfield]
  local stored = redis.call('HGET', KEYS[6], pfield)
  if not stored or event[1] >= tonumber(string.sub(stored, 1, string.find(stored, '|', 1, true) - 1)) then
    if event[3] then
      redis.call('HSET', KEYS[6], pfield, event[3])
      profiles_set = true
    elseif stored then
      redis.call('HDEL', KEYS[6], pfield)
    end
  end
end
if profiles_set then
  redis.call('EXPIRE', KEYS[6], tonumber(ARGV[3]))
end
return {#queue, late, more}
