--[[ key_types: which of the keys an apply writes hold another type than it needs.

Read-only; called by the apply (worker/apply.py) before its transaction, in
place of one TYPE command (and one reply) per key: with a reorder window a
batch writes a key per session it holds events of.

KEYS      the keys, in runs of keys that must have the same type
ARGV      per run, two values: the type its keys must have when they exist ("list",
          "hash", "zset", "string"), and how many keys it holds (the runs in KEYS' order)

A key that must be a string is checked with STRLEN (an integer for a string or no
key, an error for another type: no status reply made into a table per key, as
TYPE's is), and its TYPE read only when that fails.

Returns {} when every key is absent or of its type, else {i, the type found} of the first
that is not.
]]

local call, pcall = redis.call, redis.pcall
local k = 0
for r = 1, #ARGV, 2 do
  local want = ARGV[r]
  local strings = want == 'string'
  local stop = k + tonumber(ARGV[r + 1])
  for i = k + 1, stop do
    if not strings or type(pcall('STRLEN', KEYS[i])) == 'table' then
      local found = call('TYPE', KEYS[i])['ok']
      if found ~= 'none' and found ~= want then
        return {i, found}
      end
    end
  end
  k = stop
end
return {}
