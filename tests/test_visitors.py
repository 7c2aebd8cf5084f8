"""Active visitors: the projects that have them come from each shard's project index.

`{p:N}:visitor-projects` (project -> when a visitor of it was last seen) lets
the status and the metrics' gauges name the projects with visitors without
a SCAN of the keyspace at every scrape; a shard whose data predates the index
is still SCANned.
"""

from __future__ import annotations

import dataclasses

import pytest
import redis as redis_lib

from tests.support.clock import ManualClock
from tests.support.dates import DAY
from worker.buffer import EventBuffer
from worker.events import parse_event
from worker.keys import Keyspace
from worker.settings import Settings
from worker.state import read_state
from worker.visitors import active_projects, count_active_visitors

T0 = f"{DAY}T12:00:00.000Z"


@pytest.fixture
def keyspace(settings: Settings) -> Keyspace:
    return Keyspace(settings.key_prefix, settings.shards)


def _visit(redis: redis_lib.Redis, keyspace: Keyspace, shard: int, project: str, ms: int) -> None:
    keys = keyspace.shard(shard)
    redis.zadd(keys.visitors(project), {f"{project}-u": ms})


def test_an_indexed_shard_is_read_from_its_index_without_a_scan(
    redis: redis_lib.Redis, settings: Settings
) -> None:
    keyspace = Keyspace(settings.key_prefix, 2)
    _visit(redis, keyspace, 0, "indexed", 1_000)
    _visit(redis, keyspace, 1, "scanned", 1_000)
    # Shard 0 has an index; a visitors set it does not name is not looked for.
    redis.zadd(keyspace.shard(0).visitor_projects, {"indexed": 1_000})
    _visit(redis, keyspace, 0, "unindexed", 1_000)
    assert active_projects(redis, keyspace) == ["indexed", "scanned"]


def test_the_index_names_only_the_projects_seen_since_the_cutoff(
    redis: redis_lib.Redis, keyspace: Keyspace
) -> None:
    index = keyspace.shard(0).visitor_projects
    redis.zadd(index, {"old": 1_000, "recent": 5_000, "a:b {x}": 9_000})
    assert active_projects(redis, keyspace) == ["a:b {x}", "old", "recent"]
    assert active_projects(redis, keyspace, since_ms=5_000) == ["a:b {x}", "recent"]
    assert redis.zcard(index) == 3  # read-only


def test_the_state_counts_the_visitors_of_the_indexed_projects(
    redis: redis_lib.Redis, keyspace: Keyspace, settings: Settings
) -> None:
    now = 1_000_000
    for project in ("shop", "blog"):
        _visit(redis, keyspace, 0, project, now - 1_000)
        redis.zadd(keyspace.shard(0).visitor_projects, {project: now - 1_000})
    state = read_state(redis, keyspace, now, settings.active_visitor_window_s)
    assert state.active_visitors == {"blog": 1, "shop": 1}
    assert count_active_visitors(redis, keyspace, ["shop"], now - 500) == {"shop": 0}


def test_applying_events_indexes_their_projects(
    redis: redis_lib.Redis, settings: Settings, clock: ManualClock
) -> None:
    settings = dataclasses.replace(settings, shards=2)
    buffer = EventBuffer(redis, settings, clock)
    buffer.apply(
        [
            parse_event({"project_id": p, "name": "x", "created_at": T0, "profile_id": "u"})
            for p in ("shop", "blog")
        ]
    )
    keyspace = Keyspace(settings.key_prefix, settings.shards)
    indexed = {
        member.decode()
        for shard in keyspace.all()
        for member in redis.zrange(shard.visitor_projects, 0, -1)
    }
    assert indexed == {"shop", "blog"}
    assert buffer.active_projects() == ["blog", "shop"]
