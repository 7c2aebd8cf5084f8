"""The buffer on the loopback Redis Cluster: its settings, the reference traffic in
batches, and where its keys and shards live."""

from __future__ import annotations

import os
import signal
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest

from tests.support.redis_cluster import (
    ClusterNodeServer,
    LoopbackCluster,
    cluster_unavailable,
    redis_cluster,
)
from tests.support.traffic import ReferenceTraffic
from worker.keys import Keyspace
from worker.settings import Settings
from worker.sinks.chdb import ChdbSink
from worker.topology import Client, connect

SHARDS = 6


SESSIONS_PER_BATCH = 40  # 280 events per batch

# A module of tests on the loopback cluster: skipped, saying why, where it cannot start.
needs_cluster = pytest.mark.skipif(
    cluster_unavailable() is not None, reason=str(cluster_unavailable())
)


# Fixtures `cluster` (one per module) and `client` (of it, per test), for the modules that
# import them (under other names: a test's parameter then shadows no import).
@pytest.fixture(scope="module", name="cluster")
def cluster_fixture() -> Iterator[LoopbackCluster]:
    with redis_cluster() as started:
        yield started


@pytest.fixture(name="client")
def client_fixture(cluster: LoopbackCluster) -> Iterator[Client]:
    made = connect(cluster_settings(cluster, "x", Path("/nonexistent")), socket_timeout=5)
    try:
        yield made
    finally:
        made.close()


def cluster_settings(cluster: LoopbackCluster, prefix: str, tmp: Path, **env: str) -> Settings:
    return Settings.from_env(
        {
            "REDIS_URL": cluster.url,
            "EVENT_BUFFER_REDIS_CLUSTER": "true",
            "CELERY_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//",
            "CLICKHOUSE_URL": f"chdb://{tmp / 'clickhouse'}",
            "EVENT_BUFFER_SHARDS": str(SHARDS),
            "EVENT_BUFFER_KEY_PREFIX": prefix,
            "EVENT_BUFFER_REPLICA_TIMEOUT_MS": "2000",  # a loaded CI box lags past 300
            **env,
        }
    )


def batches(traffic: ReferenceTraffic, count: int) -> list[list[dict[str, Any]]]:
    """`count` batches of whole sessions of the reference model."""
    out = []
    for _ in range(count):
        events: list[dict[str, Any]] = []
        for _ in range(SESSIONS_PER_BATCH):
            events += traffic.session()
        out.append(events)
    return out


def landed(sink: ChdbSink) -> dict[str, list[int]]:
    """event id -> the duration of every row ClickHouse holds for it."""
    try:
        rows = sink.query("SELECT toString(id), groupArray(duration) FROM events GROUP BY id")
    finally:
        sink.close()
    return {row[0]: [int(d) for d in row[1]] for row in rows}


def keys_by_master(cluster: LoopbackCluster, prefix: str) -> dict[int, int]:
    """master port -> how many keys of the buffer with `prefix` it holds (SCAN of each)."""
    counts: dict[int, int] = {}
    for master in cluster.masters():
        client = master.client()
        try:
            found = sum(1 for _ in client.scan_iter(match="{" + prefix + ":*", count=1000))
        finally:
            client.close()
        if found:
            counts[master.port] = found
    return counts


@contextmanager
def stopped(node: ClusterNodeServer) -> Iterator[None]:
    """SIGSTOP a node for the block (shorter than the cluster's node timeout: no failover)."""
    assert node.process is not None
    os.kill(node.process.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(node.process.pid, signal.SIGCONT)


def shard_master(cluster: LoopbackCluster, client: Client, keyspace: Keyspace, n: int) -> Any:
    slot = client.keyslot(keyspace.shard(n).tag)  # type: ignore[union-attr]
    return cluster.master_of_slot(slot)
