#!lua flags=allow-oom
--[[ dlq_remove: remove given entries from a shard's dead-letter list, atomically.

The caller read the entries (`eventbuffer dlq replay` or `purge`) and names
each by the index it was read at and its exact value. New dead letters are
only ever appended (RPUSH), so an entry normally still sits at its index:
it is overwritten there with a tombstone, and one LREM pass drops every
tombstone, a single scan of the list however many entries go. An entry no
longer at its index (entries before it were removed meanwhile) is removed
by value, once; one that is gone altogether is skipped.

KEYS[1]  the shard's dead letters (LIST: JSON header, newline, raw payload)

ARGV     pairs, one per entry to remove:
           index  where the caller read it (0-based)
           entry  its exact value

Returns the number of entries removed.

allow-oom: runs above maxmemory: it only removes entries
(lua_scripts/__init__.py says which scripts may).
]]

-- Entries start with their JSON header ('{'), so they never equal this.
local tombstone = '\0eventbuffer:dlq-removed'
local marked = 0
local moved = {}
for i = 1, #ARGV, 2 do
  local index = tonumber(ARGV[i])
  local entry = ARGV[i + 1]
  if redis.call('LINDEX', KEYS[1], index) == entry then
    redis.call('LSET', KEYS[1], index, tombstone)
    marked = marked + 1
  else
    moved[#moved + 1] = entry
  end
end

local removed = 0
if marked > 0 then
  removed = redis.call('LREM', KEYS[1], 0, tombstone)
end
for _, entry in ipairs(moved) do
  removed = removed + redis.call('LREM', KEYS[1], 1, entry)
end
return removed
