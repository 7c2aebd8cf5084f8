--[[ release_rewrite: what stays of each released session's held events (worker/reorder_release.py).

Runs inside the transaction of a release decided in Python. For each session
it was given, the pack read (its length then) loses what was released: the
records that stay replace the pack's first `read` bytes, and whatever an
apply appended since is kept after them (an apply only ever appends). The
records that stay come either as their frames, joined (`kept`), or, when
they are the pack's tail as read (every released record before every kept
one: events arrived in created_at order, the common case), as the offset
they start at (`from`): the pack is then cut inside Redis, and the kept
bytes never travel back and forth. The session's deadline in KEYS[1] becomes
the earliest of what stays; the pack and the deadline go when nothing
stays (the deadlines and removals of all sessions in a few calls at the
end). Packs released whole, the common case, come last, as their id and
length only. A pack shorter than what was read was rewritten by someone
else: left alone (the release's WATCH makes that a race that cannot happen).

KEYS[1]     sessions with held events (ZSET: session id -> earliest deadline, ms)
KEYS[1+i]   session i's held events (STRING: a pack, release_held.lua's header has it,
            of records of the current form or framed by an earlier version)

ARGV        five values per session, in KEYS' order: its id, the pack's length read,
            the earliest deadline of the records that stay ("" when none), `from` (the
            offset in the pack read where the records that stay start, or "" when they
            are given), `kept` (those records, or "" when `from` is given); then, for
            the last sessions of KEYS, packs whose every record was released, two
            values each: its id and the pack's length read (the pack goes, unless an
            apply appended meanwhile: as five values id, read, "", read, ""). With n
            sessions of five values and m of two, #ARGV = 5n + 2m and #KEYS = 1 + n + m.

Returns the number of packs rewritten.
]]

-- The deadlines and removals of every session, written in a few calls at the end.
local deadlines, gone, gone_keys = {}, {}, {}
local function due_at(session, deadline)
  deadlines[#deadlines + 1] = deadline
  deadlines[#deadlines + 1] = session
end
-- What stays of the pack read: from an offset (cut inside Redis), or as given.
local function keep(key, from, kept, read)
  if from then
    if from > 0 then
      redis.call('SET', key, redis.call('GETRANGE', key, from, -1))
    end
  elseif #kept ~= read then
    redis.call('SET', key, kept)
  end
end

local rewritten = 0
local function rewrite(key, session, read, deadline, from, kept)
  local size = redis.call('STRLEN', key)
  if size > read then
    -- An apply appended records meanwhile: they stay, and their deadlines count.
    local added = redis.call('GETRANGE', key, read, -1)
    local earliest = (deadline ~= '') and tonumber(deadline) or nil
    local at = 1
    while at <= #added do
      local due
      if string.byte(added, at + 45) == 31 then
        -- A current record: a 45-byte header and four fields, each ended by 0x1f.
        due = tonumber(string.sub(added, at + 15, at + 29))
        local stop = at + 45
        for _ = 1, 3 do stop = string.find(added, '\31', stop + 1, true) end
        at = stop + 1
      else
        -- One an earlier version framed: "<length>:<record>".
        local colon = string.find(added, ':', at, true)
        due = tonumber(string.sub(added, colon + 16, colon + 30))
        at = colon + tonumber(string.sub(added, at, colon - 1)) + 1
      end
      if earliest == nil or due < earliest then earliest = due end
    end
    if from then
      keep(key, from, kept, read)
    else
      redis.call('SET', key, kept .. added)
    end
    due_at(session, earliest)
    rewritten = rewritten + 1
  elseif size == read then
    if deadline == '' then
      gone[#gone + 1] = session
      gone_keys[#gone_keys + 1] = key
    else
      keep(key, from, kept, read)
      due_at(session, tonumber(deadline))
    end
    rewritten = rewritten + 1
  end
end
-- The sessions of five values (`rewrites` of them), then those of two (packs released whole).
local rewrites = (#ARGV - 2 * (#KEYS - 1)) / 3
for i = 2, rewrites + 1 do
  local a = (i - 2) * 5 + 1
  rewrite(KEYS[i], ARGV[a], tonumber(ARGV[a + 1]), ARGV[a + 2], tonumber(ARGV[a + 3]),
    ARGV[a + 4])
end
for i = rewrites + 2, #KEYS do
  local a = rewrites * 5 + (i - rewrites - 2) * 2 + 1
  local read = tonumber(ARGV[a + 1])
  rewrite(KEYS[i], ARGV[a], read, '', read, '')
end
-- Commands with many arguments, sent 1000 at a time (Lua's unpack has a stack limit).
local function call_many(command, key, args)
  for first = 1, #args, 1000 do
    local last = math.min(first + 999, #args)
    if key then
      redis.call(command, key, unpack(args, first, last))
    else
      redis.call(command, unpack(args, first, last))
    end
  end
end
call_many('DEL', nil, gone_keys)
call_many('ZREM', KEYS[1], gone)
call_many('ZADD', KEYS[1], deadlines)
return rewritten
