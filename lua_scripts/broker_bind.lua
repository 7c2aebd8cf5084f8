#!lua flags=allow-oom
--[[ broker_bind: record a queue's binding to an exchange when the broker is full.

kombu records a binding with two SADDs (the exchange's table, and the
set that keeps it from the binding sweep), which Redis refuses at
maxmemory: a worker (re)started then could not declare its queues, and
the flush worker that would free the memory could not start. The
transport binds through this script only after a plain bind was refused.

KEYS[1]  the exchange's binding table (SET of "routing key␆pattern␆queue")
KEYS[2]  the exchange's permanent bindings (SET, same members)

ARGV[1]  the binding

Returns 1.

allow-oom: runs above maxmemory: one small set member per queue of a starting worker
(lua_scripts/__init__.py says which scripts may).
]]

redis.call('SADD', KEYS[1], ARGV[1])
redis.call('SADD', KEYS[2], ARGV[1])
return 1
