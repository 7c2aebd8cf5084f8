#!lua flags=allow-oom
--[[ lock_acquire: take a shard's flush lock if nobody holds it.

What redis-py's Lock does with `SET NX PX`, as a script only so that it
carries the allow-oom flag: a plain SET is refused when Redis is at
maxmemory, and the flush that would free the memory could then never start.

KEYS[1]  the shard's flush lock (STRING holding the owner's token)

ARGV[1]  the new holder's token
ARGV[2]  its TTL, ms

Returns 1 when taken; 0 when the lock is held (nothing is done).

allow-oom: runs above maxmemory: the drain must start when Redis is full (one small string)
(lua_scripts/__init__.py says which scripts may).
]]

if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then
  return 1
end
return 0
