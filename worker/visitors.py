"""Active visitors: which projects have them, and how many, over every shard.

`count_active_visitors()` is the one count of active visitors: read-only for
`read_state()` (status, metrics) and pruning for
`EventBuffer.get_active_visitor_count` (as the seed). It sits below both the
buffer (the write path) and the state (the read model), so neither imports
the other for it.
"""

from __future__ import annotations

from collections.abc import Sequence

from worker.keys import Keyspace
from worker.replies import number, text
from worker.topology import Client


def active_projects(redis: Client, keyspace: Keyspace) -> list[str]:
    """Projects with a visitors set on any shard (SCAN; read-only)."""
    projects: set[str] = set()
    for shard in keyspace.all():
        for key in redis.scan_iter(match=shard.visitors_pattern(), count=1000):
            projects.add(shard.project_of_visitors_key(text(key)))
    return sorted(projects)


def count_active_visitors(
    redis: Client, keyspace: Keyspace, projects: Sequence[str], cutoff_ms: int, prune: bool = False
) -> dict[str, int]:
    """Distinct profiles seen at or after `cutoff_ms`, per project, over every shard.

    With `prune`, older entries are removed first (OpenPanel's
    getActiveVisitorCount does); without, nothing is written.
    """
    shards = keyspace.all()
    pipe = redis.pipeline(transaction=False)
    for project in projects:
        for shard in shards:
            key = shard.visitors(project)
            if prune:
                pipe.zremrangebyscore(key, "-inf", f"({cutoff_ms}")
            if len(shards) == 1:
                pipe.zcount(key, cutoff_ms, "+inf")
            else:
                pipe.zrangebyscore(key, cutoff_ms, "+inf")
    replies = iter(pipe.execute())
    counts: dict[str, int] = {}
    for project in projects:
        members: set[bytes] = set()
        total = 0
        for _ in shards:
            if prune:
                next(replies)
            reply = next(replies)
            if len(shards) == 1:
                total = number(reply)
            else:
                members.update(reply)
        counts[project] = total if len(shards) == 1 else len(members)
    return counts
