--[[ release_rewrite: what stays of each released session's held events (worker/reorder_release.py).

Runs inside the transaction of a release decided in Python. For each session
it was given, the pack read (its length then) loses what was released, and
whatever an apply appended since is kept after what stays (an apply only
ever appends). The records that stay never pass through this script: Lua
hashes every byte of every string it is given or reads (Redis' Lua interns
them), which cost several µs per pack cut here. Earlier in the same
transaction the release wrote them (MSET) to a key of their own per session,
KEYS[1+2i] beside the pack KEYS[2i]; here that key replaces the pack
(RENAME), once the pack is found unchanged since it was read, or after the
records appended meanwhile are added to it (only those pass through Lua).
The session's deadline in KEYS[1] becomes the earliest of what stays; the
pack and the deadline go when nothing stays (the deadlines and removals of
all sessions in a few calls at the end). A pack shorter than what was read
was rewritten by someone else: left alone, its replacement dropped (the
release's WATCH makes that a race that cannot happen).

KEYS[1]     sessions with held events (ZSET: session id -> earliest deadline, ms)
then, per session, in three runs (ARGV[1] and ARGV[2] count the first two):
            packs cut: the pack (STRING: release_held.lua's header has the format,
            of records of the current form or framed by an earlier version), then
            what stays of it (STRING, written earlier in the transaction);
            packs of which nothing went (a deadline listed earlier than any of
            their records'): the pack;
            packs released whole: the pack.

ARGV[1], ARGV[2]  how many packs are cut (n), and how many nothing went from (k)
then, per session in KEYS' order: for the n + k of the first two runs three values,
            its id, the pack's length read and the earliest deadline of the records
            that stay; for the packs released whole (m) two, its id and the pack's
            length read (the pack goes, unless an apply appended meanwhile: then that
            stays). #KEYS = 1 + 2n + k + m and #ARGV = 2 + 3(n + k) + 2m.

Returns the number of packs rewritten (or whose deadline was written).
]]

-- The deadlines and removals of every session, written in a few calls at the end.
local deadlines, gone, gone_keys = {}, {}, {}
local function due_at(session, deadline)
  deadlines[#deadlines + 1] = deadline
  deadlines[#deadlines + 1] = session
end

-- The records an apply appended to `key` after its first `read` bytes were read, and
-- the earliest of their deadlines and `earliest` (nil: none).
local function appended(key, read, earliest)
  local added = redis.call('GETRANGE', key, read, -1)
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
  return added, earliest
end

local rewritten = 0
-- `kept`: the key holding what stays (packs cut), or nil (packs nothing went from, and
-- packs released whole: `deadline` '').
local function rewrite(key, kept, session, read, deadline)
  local size = redis.call('STRLEN', key)
  if size == read then
    if deadline == '' then
      gone[#gone + 1] = session
      gone_keys[#gone_keys + 1] = key
    else
      if kept then redis.call('RENAME', kept, key) end
      due_at(session, tonumber(deadline))
    end
    rewritten = rewritten + 1
  elseif size > read then
    -- An apply appended records meanwhile: they stay, and their deadlines count.
    local added, earliest = appended(key, read, (deadline ~= '') and tonumber(deadline) or nil)
    if kept then
      redis.call('APPEND', kept, added)
      redis.call('RENAME', kept, key)
    elseif deadline == '' then
      redis.call('SET', key, added)
    end
    due_at(session, earliest)
    rewritten = rewritten + 1
  elseif kept then
    redis.call('DEL', kept)
  end
end

local cut, unchanged = tonumber(ARGV[1]), tonumber(ARGV[2])
local a = 3
for i = 1, cut do
  rewrite(KEYS[2 * i], KEYS[2 * i + 1], ARGV[a], tonumber(ARGV[a + 1]), ARGV[a + 2])
  a = a + 3
end
for i = 2 * cut + 2, 2 * cut + 1 + unchanged do
  rewrite(KEYS[i], nil, ARGV[a], tonumber(ARGV[a + 1]), ARGV[a + 2])
  a = a + 3
end
for i = 2 * cut + 2 + unchanged, #KEYS do
  rewrite(KEYS[i], nil, ARGV[a], tonumber(ARGV[a + 1]), '')
  a = a + 2
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
