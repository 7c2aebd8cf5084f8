--[[ key_types: which of the keys an apply writes hold another type than it needs.

Read-only; called by the apply (worker/apply.py) before its transaction, in
place of one TYPE command (and one reply) per key: with a reorder window a
batch writes a key per session it holds events of.

KEYS      the keys
ARGV[i]   the type KEYS[i] must have when it exists ("list", "hash", "zset", "string")

Returns {} when every key is absent or of its type, else {i, the type found} of the first
that is not.
]]

for i = 1, #KEYS do
  local found = redis.call('TYPE', KEYS[i])['ok']
  if found ~= 'none' and found ~= ARGV[i] then
    return {i, found}
  end
end
return {}
