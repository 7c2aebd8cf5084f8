"""eventbuffer's Lua scripts, shipped inside the wheel and loaded by `worker.scripts`.

Each script's header names every KEYS[i], ARGV[i] and its return value.

Which scripts run when Redis is full. At `maxmemory` (policy `noeviction`,
the only one eventbuffer runs on) Redis refuses every command that may
grow memory. The scripts that take memory *out* of Redis, or that must run
for that to happen, carry Redis 7's `#!lua flags=allow-oom` (and so need
Redis 7): the flush (`lock_acquire`, `lock_takeover`, `claim`, `ack`), the
release of held and waiting session events into the queue
(`release_held`, `sweep_sessions`), `dlq_remove`, and the reliable broker
transport's fetch, heartbeat and requeue (`broker_*`). Each adds a few
bytes at most, and a successful flush frees far more.
`eventbuffer forget`'s scripts (`forget_shard`, which only removes or
shortens entries, and `forget_tombstone`, one small field) run there too:
an erasure must not wait for room.

The ingest side is refused: the apply (a MULTI/EXEC, with
`resolve_views` inside it) writes the new events, and a full Redis must
say no to them, so the ingest task waits with the batch in the broker
(`tasks/ingest.py`) until a flush has made room.
"""
