"""`forget` with the buffer on a real Redis Cluster (3 masters, 3 replicas, 6 shards).

The person's events are spread over shards owned by different masters: every
shard's script runs in its own slot, the tombstones in theirs, and the
person is gone from ClickHouse and every shard; the other person is not.
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from tests.support.cluster_buffer import (
    SHARDS,
    client_fixture,  # noqa: F401 (fixture `client`)
    cluster_fixture,  # noqa: F401 (fixture `cluster`)
    cluster_settings,
    needs_cluster,
)
from tests.support.people import person_event
from tests.support.redis_cluster import LoopbackCluster
from tests.test_redis_cluster import sink  # noqa: F401 (a fixture)
from worker.buffer import EventBuffer
from worker.flusher import Flusher
from worker.ingestion import ingest
from worker.keys import Keyspace
from worker.privacy.forget_request import forget
from worker.privacy.selector import Selector
from worker.sinks.chdb import ChdbSink
from worker.topology import Client

pytestmark = needs_cluster

NOW_MS = time.time_ns() // 1_000_000


def event(who: str, session: int, n: int) -> dict[str, Any]:
    return person_event("click", NOW_MS - 60_000 + n, who, f"{who}-{session}")


@pytest.fixture
def prefix() -> str:
    """A key prefix of this test's own on the module's shared cluster."""
    return f"fg{uuid.uuid4().hex[:6]}"


def test_forget_on_a_redis_cluster(
    cluster: LoopbackCluster,
    client: Client,
    sink: ChdbSink,  # noqa: F811
    prefix: str,
    tmp_path: Path,
) -> None:
    # The ingest here is called directly, without the task's retry of NotReplicatedError:
    # give the replicas' acknowledgement more than the module's 300 ms on a loaded machine
    # (a CI run once saw 0 of 1 replicas confirm the first apply in time).
    settings = cluster_settings(
        cluster, prefix, tmp_path,
        EVENT_BUFFER_REORDER_WINDOW_MS="0", EVENT_BUFFER_REPLICA_TIMEOUT_MS="3000",
    )  # fmt: skip
    buffer = EventBuffer(client, settings)
    flusher = Flusher(client, settings, lambda: sink)
    events = [event(who, s, s) for s in range(24) for who in ("alice", "bob")]
    ingest(buffer, events[:24], "one")
    flusher.process_buffer()
    ingest(buffer, events[24:], "two")
    keyspace = Keyspace(prefix, SHARDS)
    shards_with_alice = [
        s.shard
        for s in keyspace.all()
        if any(b'"alice"' in r for r in client.lrange(s.queue, 0, -1))
    ]
    assert len(shards_with_alice) >= 3

    report = forget(client, sink, settings, Selector("p1", "profile", "alice"), settle_s=0)

    assert report.clickhouse_rows == 12 and report.buffer.buffer_rows == 12
    for shard in keyspace.all():
        assert not any(b'"alice"' in r for r in client.lrange(shard.queue, 0, -1))
    ingest(buffer, [event("alice", 99, 1)], "late")  # created before the request
    while flusher.process_buffer().rows:
        pass
    assert sink.query("SELECT profile_id, count() FROM events GROUP BY profile_id") == [("bob", 24)]
