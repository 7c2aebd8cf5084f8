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


def active_projects(redis: Client, keyspace: Keyspace, since_ms: int | None = None) -> list[str]:
    """Projects with a visitor seen on any shard (at or after `since_ms`, if given); read-only.

    Each shard's project index (`ShardKeys.visitor_projects`: project -> when a
    visitor of it was last seen, written by the apply beside the visitors set)
    answers in one pipelined round trip for all shards. A shard without an
    index (its data predates it) is SCANned for its visitors sets instead.
    """
    shards = keyspace.all()
    low = "-inf" if since_ms is None else since_ms
    pipe = redis.pipeline(transaction=False)
    for shard in shards:
        pipe.exists(shard.visitor_projects)
        pipe.zrangebyscore(shard.visitor_projects, low, "+inf")
    replies = pipe.execute()
    projects: set[str] = set()
    for n, shard in enumerate(shards):
        indexed, members = replies[2 * n], replies[2 * n + 1]
        if indexed:
            projects.update(text(member) for member in members)
            continue
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
