#!lua flags=allow-oom
--[[ release_held: apply the held session events whose reorder window has passed, by created_at.

With a reorder window (EVENT_BUFFER_REORDER_WINDOW_MS > 0) the apply does
not give screen_views and session_ends to their session at once: it appends
each to its session's pack of held events (KEYS[7 + i]) and keeps the
session's earliest deadline (arrival + window) in KEYS[1]. A flush runs this
first, for the sessions it found due. Per session still due, it releases
every held event created no later than the newest held event whose
deadline has passed, oldest created first (ties: arrival, then batch order),
applying OpenPanel's session rules to them:

- screen_view: the session's last view (stored in KEYS[3]) is queued with
  duration = this view's created - its created; this view becomes the
  session's last view (and its profile's, in KEYS[5], unless the profile
  has a newer one).
- session_end: the last view is queued with its own duration, then the
  session_end; the session is closed (recorded in KEYS[6]).

An event is late when it reaches its session after its place was passed:
created before the session's stored last view, or before the session_end
that closed the session (remembered in KEYS[6] for ARGV[3] ms after that).
A late view is queued at once with its own duration (its neighbours keep
theirs); a late session_end still closes the session. Late events are
counted in the reply. An event created after the session_end that closed
its session reopens it, as OpenPanel's buffer does with events in order.

A pack is records one after another (worker/held_pack.py): four fields each,
each ended by the byte 0x1f: <created ms, 15 digits><deadline ms, 15
digits><tag, 14 characters><kind: v or e>, the profile field (or empty), the
event's own duration, its head (the row without its duration field and
closing brace: every row queued is the head and a suffix). The first 44
characters order the records. Packs written by an earlier version hold
records framed "<length>:<header><profile field>|<stored form>", the stored
form (worker/stored_view.py) "<created ms>;<own duration>;<head>" or the
legacy "<created ms>|<own duration>|<row>", whose row ends with its own
duration; both are still read, in one pack too (byte 46 of a current record
is 0x1f, never so in a framed one).

KEYS[1]     sessions with held events (ZSET: session id -> earliest deadline, ms)
KEYS[2]     the shard's queue (LIST)
KEYS[3]     last views (HASH: session id -> stored view)
KEYS[4]     session index (ZSET: session id -> when its last view was set, ms)
KEYS[5]     profiles' last views (HASH: profile field -> stored view)
KEYS[6]     closed sessions (HASH: session id -> the created ms its session_end closed it at)
KEYS[7]     when each closed session was closed (ZSET: session id -> ms), to forget it
KEYS[7+i]   session i's held events (STRING: a pack)
KEYS[8+n]   optional, after the n sessions' keys: the release generation (STRING, a
            counter every release increments: worker/reorder_release.py WATCHes it)

ARGV[1]     now, epoch ms
ARGV[2]     TTL of KEYS[3] and KEYS[5], seconds (refreshed when written)
ARGV[3]     how long a closed session is remembered after its session_end was released, ms
ARGV[3+i]   session i's id

Returns {rows queued, late events}; an error reply, before anything is
written, when a key has the wrong type.

allow-oom: runs above maxmemory: held events move into the queue (no net growth), so a full Redis still drains
(lua_scripts/__init__.py says which scripts may).
]]

-- Every key's type first: a script's writes are not undone when a later command fails,
-- so a key of the wrong type must stop it before it takes any held event away.
for i = 1, #KEYS do
  local want = ({'zset', 'list', 'hash', 'zset', 'hash', 'hash', 'zset'})[i] or 'string'
  local found = redis.call('TYPE', KEYS[i])['ok']
  if found ~= 'none' and found ~= want then
    return redis.error_reply('WRONGTYPE ' .. KEYS[i] .. ' holds a ' .. found .. ', not a ' .. want)
  end
end

local now = tonumber(ARGV[1])
local forgotten = redis.call('ZRANGEBYSCORE', KEYS[7], '-inf', '(' .. (now - tonumber(ARGV[3])),
  'LIMIT', 0, 1000)
if #forgotten > 0 then
  redis.call('HDEL', KEYS[6], unpack(forgotten))
  redis.call('ZREM', KEYS[7], unpack(forgotten))
end

-- The sessions still due (another flush may have released some since they were listed).
local sessions, held_keys = {}, {}
local deadlines = #ARGV > 3 and redis.call('ZMSCORE', KEYS[1], unpack(ARGV, 4)) or {}
for i, deadline in ipairs(deadlines) do
  if deadline and tonumber(deadline) <= now then
    sessions[#sessions + 1] = ARGV[i + 3]
    held_keys[#held_keys + 1] = KEYS[i + 7]
  end
end
if #sessions == 0 then
  return {0, 0}
end

local queue = {}
local late = 0
-- Profile field -> {created, order key, its view or false (a session_end)}: the profile's
-- newest event by created_at, then arrival, then batch order (the record's order key),
-- among the released ones. Sessions are released one after another: a tie on created_at
-- and arrival between two sessions of one profile goes by the key, not to the session
-- released last.
local profiles = {}
local profile_order = {}
local function profile_event(pfield, created, order, value)
  local known = profiles[pfield]
  if known == nil then
    profile_order[#profile_order + 1] = pfield
  elseif created < known[1] or (created == known[1] and order < known[2]) then
    return
  end
  profiles[pfield] = {created, order, value}
end

-- Commands with many arguments, sent 1000 at a time (Lua's unpack has a stack limit).
local function call_many(command, key, args)
  for first = 1, #args, 1000 do
    redis.call(command, key, unpack(args, first, math.min(first + 999, #args)))
  end
end

-- 1. Reads: each due session's held events, what it releases now, its stored state.
local packs = redis.call('MGET', unpack(held_keys))
local closed_at = redis.call('HMGET', KEYS[6], unpack(sessions))
local stored_views = redis.call('HMGET', KEYS[3], unpack(sessions))
local released = {}  -- {session index, pack, records, how many go}
local done, done_keys, later = {}, {}, {}  -- sessions with nothing left; deadlines left
for n, session in ipairs(sessions) do
  local pack = packs[n] or ''
  -- Records stay in the pack: each is {order key, created, deadline, first, last, framed,
  -- end of the profile field, end of the own duration (both only for a current record)}.
  local records = {}
  local at = 1
  while at <= #pack do
    if string.byte(pack, at + 45) == 31 then  -- a current record
      local pf_end = string.find(pack, '\31', at + 46, true)
      local own_end = string.find(pack, '\31', pf_end + 1, true)
      local stop = string.find(pack, '\31', own_end + 1, true)
      local key = string.sub(pack, at, at + 43)
      records[#records + 1] = {
        key, tonumber(string.sub(key, 1, 15)), tonumber(string.sub(key, 16, 30)), at, stop, at,
        pf_end, own_end
      }
      at = stop + 1
    else  -- framed by an earlier version
      local colon = string.find(pack, ':', at, true)
      local stop = colon + tonumber(string.sub(pack, at, colon - 1))
      local key = string.sub(pack, colon + 1, colon + 44)
      records[#records + 1] = {
        key, tonumber(string.sub(key, 1, 15)), tonumber(string.sub(key, 16, 30)), colon + 1, stop,
        at
      }
      at = stop + 1
    end
  end
  if #records > 1 then
    table.sort(records, function(x, y) return x[1] < y[1] end)
  end
  -- The newest created_at among the due events; every event created no later goes.
  local cut = nil
  for _, r in ipairs(records) do
    if r[3] <= now and (cut == nil or r[2] > cut) then cut = r[2] end
  end
  local last = 0
  local next_deadline = nil
  local rest = {}
  for i, r in ipairs(records) do
    if cut ~= nil and r[2] <= cut then
      last = i
    else
      if next_deadline == nil or r[3] < next_deadline then next_deadline = r[3] end
      rest[#rest + 1] = string.sub(pack, r[6], r[5])
    end
  end
  if next_deadline == nil then
    done[#done + 1] = session
    done_keys[#done_keys + 1] = held_keys[n]
  else
    later[#later + 1] = next_deadline
    later[#later + 1] = session
    redis.call('SET', held_keys[n], table.concat(rest))
  end
  if last > 0 then
    released[#released + 1] = {n, pack, records, last}
  end
end

-- 2. OpenPanel's rules over each session's released events, oldest created first.
-- A view is {text, where its head starts, where it ends, own duration (text), created,
-- where its stored form starts, where that ends, created (text), legacy form?}: rows are
-- built from the head once, when queued, and never copied on the way.
local function view_of(text, from, stop)
  local created, sep, own, at = string.match(text, '^(-?%d+)([;|])(-?%d+)[;|]()', from)
  local legacy = sep == '|'
  local head_stop = stop
  if legacy then  -- the row ends with its own duration (absent when 0)
    head_stop = stop - ((own == '0') and 1 or (13 + #own))
  end
  return {text, at, head_stop, own, tonumber(created), from, stop, created, legacy}
end
local function with_duration(view, ms)
  return string.sub(view[1], view[2], view[3]) .. ',"duration":' .. string.format('%d', ms) .. '}'
end
local function as_is(view)
  if view[4] == '0' then
    return string.sub(view[1], view[2], view[3]) .. '}'
  end
  return string.sub(view[1], view[2], view[3]) .. ',"duration":' .. view[4] .. '}'
end
local function stored_form(view)
  if view[9] then  -- written anew in the current form (a legacy view, a current record)
    return view[8] .. ';' .. view[4] .. ';' .. string.sub(view[1], view[2], view[3])
  end
  if view[6] == 1 and view[7] == #view[1] then return view[1] end
  return string.sub(view[1], view[6], view[7])
end

local views_set, views_ended, indexed = {}, {}, {}
local closed_set, closed_index, reopened = {}, {}, {}
for _, entry in ipairs(released) do
  local n, pack, records, last = entry[1], entry[2], entry[3], entry[4]
  local session = sessions[n]
  -- A closed session: the created ms its session_end closed it at (false when open).
  local closed = closed_at[n] and tonumber(closed_at[n])
  local stored = stored_views[n]
  local view = stored and view_of(stored, 1, #stored) or nil  -- the session's last view
  local view_changed, closed_changed = false, false
  for i = 1, last do
    local r = records[i]
    local created = r[2]
    local kind = string.sub(pack, r[4] + 44, r[4] + 44)
    local pfield, this
    if r[7] then  -- a current record: its head, own duration and created at hand
      pfield = string.sub(pack, r[4] + 46, r[7] - 1)
      local own = string.sub(pack, r[7] + 1, r[8] - 1)
      -- stored (stored_form) as "<created>;<own>;<head>", written anew
      this = {pack, r[8] + 1, r[5] - 1, own, created, nil, nil, string.format('%d', created), true}
    else
      local pf_end = string.find(pack, '|', r[4] + 45, true)
      pfield = string.sub(pack, r[4] + 45, pf_end - 1)
      this = view_of(pack, pf_end + 1, r[5])
    end
    local is_late = (closed and created < closed) or (view and created < view[5])
    if is_late then
      late = late + 1
    elseif closed then
      closed, closed_changed = false, true  -- an event after the session_end reopens it
    end
    if kind == 'v' then
      if is_late then
        queue[#queue + 1] = as_is(this)
      else
        if view then
          queue[#queue + 1] = with_duration(view, math.max(0, created - view[5]))
        end
        view = this
        view_changed = true
        if pfield ~= '' then
          profile_event(pfield, created, r[1], this)
        end
      end
    else
      -- A session_end closes its session, late or not: the waiting view goes first.
      if view then
        queue[#queue + 1] = as_is(view)
      end
      queue[#queue + 1] = as_is(this)
      closed = math.max(created, view and view[5] or 0, closed or 0)
      closed_changed = true
      view = nil
      view_changed = true
      if pfield ~= '' then
        profile_event(pfield, created, r[1], false)
      end
    end
  end
  if view_changed then
    if view then
      views_set[#views_set + 1] = session
      views_set[#views_set + 1] = stored_form(view)
      indexed[#indexed + 1] = now
      indexed[#indexed + 1] = session
    else
      views_ended[#views_ended + 1] = session
    end
  end
  if closed_changed then
    if closed then
      closed_set[#closed_set + 1] = session
      closed_set[#closed_set + 1] = closed
      closed_index[#closed_index + 1] = now
      closed_index[#closed_index + 1] = session
    else
      reopened[#reopened + 1] = session
    end
  end
end
-- A profile's stored view is replaced (or cleared) only by an event not older than it.
local profiles_set, profiles_ended = {}, {}
if #profile_order > 0 then
  local stored = redis.call('HMGET', KEYS[5], unpack(profile_order))
  for i, pfield in ipairs(profile_order) do
    local event = profiles[pfield]
    local value = stored[i]
    if not value or event[1] >= tonumber(string.match(value, '^-?%d+')) then
      if event[3] then
        profiles_set[#profiles_set + 1] = pfield
        profiles_set[#profiles_set + 1] = stored_form(event[3])
      elseif value then
        profiles_ended[#profiles_ended + 1] = pfield
      end
    end
  end
end

-- 3. Writes, a few commands each for every session of this call.
if #done_keys > 0 then
  redis.call('DEL', unpack(done_keys))
end
call_many('ZREM', KEYS[1], done)
call_many('ZADD', KEYS[1], later)
call_many('RPUSH', KEYS[2], queue)
call_many('HSET', KEYS[3], views_set)
call_many('ZADD', KEYS[4], indexed)
call_many('HDEL', KEYS[3], views_ended)
call_many('ZREM', KEYS[4], views_ended)
if #views_set > 0 then
  redis.call('EXPIRE', KEYS[3], tonumber(ARGV[2]))
end
call_many('HSET', KEYS[6], closed_set)
call_many('ZADD', KEYS[7], closed_index)
call_many('HDEL', KEYS[6], reopened)
call_many('ZREM', KEYS[7], reopened)
call_many('HSET', KEYS[5], profiles_set)
call_many('HDEL', KEYS[5], profiles_ended)
if #profiles_set > 0 then
  redis.call('EXPIRE', KEYS[5], tonumber(ARGV[2]))
end
if #KEYS > 7 + #ARGV - 3 then
  redis.call('INCR', KEYS[#KEYS])
end
return {#queue, late}
