"""Forgetting a person (`eventbuffer forget`): tombstones, the erasure across the
buffer, open claims, dead letters and ClickHouse, and the audit record.

- `selector.py`: who (a project and a profile, device or session id) and
  which events are theirs.
- `tombstones.py`: the request's moment, kept for days; ingest drops what
  arrives later, and the flusher's fence drops it right before an insert.
- `buffer_erasure.py`: the Redis side, per shard under its flush lock
  (lua_scripts/forget_shard.lua).
- `clickhouse.py`: the rows in ClickHouse (DELETE, a mutation, ON CLUSTER)
  and the audit table `eventbuffer_forget_audit`.
- `forget_request.py`: one request, in that order.
"""
