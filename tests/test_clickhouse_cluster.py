"""The flush into a real ClickHouse cluster: Distributed over Replicated shards.

Two clusters, both started by the tests on loopback (tests/support/clickhouse_cluster.py):

- Debian's clickhouse-server 18.16 with Debian's ZooKeeper 3.8, 2 shards x 2
  replicas: the DDL of `eventbuffer migrate --cluster` (on the columns 18.16
  has), foreground Distributed inserts, a flusher SIGKILLed between chunks
  and re-driven, a replica SIGKILLed during a flush. 18.16 has no
  insert_deduplication_token: its Replicated tables drop a block whose
  content they have seen, and eventbuffer's chunks, split by a deterministic
  sharding key, give each shard the same block again on a re-drive.
- ClickHouse 26.x from chDB, 2 shards (no replicas: chDB has no Keeper client
  for Replicated tables): the dedup token path through a Distributed table.

Exactly-once is checked on every replica's local table and through the
Distributed table, after replication settled.
"""

from __future__ import annotations

import json
import signal
import subprocess
import time
import uuid
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest
import redis as redis_lib

from tests.support.clickhouse_cluster import (
    Cluster,
    Node,
    clickhouse_cluster,
    cluster_unavailable,
    modern_cluster,
)
from tests.support.native_server import chdb_serves
from tests.test_crash_safety import RUNNER, make_events, parse_run, runner_args, send
from worker.buffer import EventBuffer
from worker.events import encode_event, parse_event
from worker.flusher import Flusher
from worker.settings import Settings
from worker.sinks.base import RetryableSinkError
from worker.sinks.native import NativeSink
from worker.sinks.schema import (
    COLUMNS,
    DEDUP_WINDOW,
    DEDUP_WINDOW_SECONDS,
    SHARDING_KEY,
    create_cluster_tables,
    create_table,
    identifier,
    local_table,
)

pytestmark = pytest.mark.slow

# The columns of `events` that 18.16 has, with the ones the table layout
# (partition and sort keys) needs.
COMPAT_COLUMNS = (
    ("id", "UUID"),
    ("name", "String"),
    ("project_id", "String"),
    ("profile_id", "String"),
    ("session_id", "String"),
    ("created_at", "DateTime"),
    ("duration", "UInt64"),
)


def with_database(url: str, database: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


def sink_on(node: Node, database: str) -> NativeSink:
    return NativeSink(with_database(node.url, database), require_dedup=False)


@pytest.fixture(scope="session")
def old_cluster() -> Iterator[Cluster]:
    why = cluster_unavailable()
    if why is not None:
        pytest.skip(f"the 18.16 cluster {why} (bash .ci/run installs both)")
    with clickhouse_cluster(shards=2, replicas=2) as cluster:
        print(f"\n18.16 cluster (ZooKeeper + 4 servers) ready in {cluster.started_in_s:.2f} s")
        yield cluster


@pytest.fixture
def database(old_cluster: Cluster) -> Iterator[str]:
    """A fresh database holding the cluster tables, made with migrate's DDL."""
    name = f"eb_{uuid.uuid4().hex[:10]}"
    admin = sink_on(old_cluster.nodes[0], "default")
    try:
        for _ in range(2):  # idempotent
            for ddl in create_cluster_tables("events", name, old_cluster.name, COMPAT_COLUMNS):
                admin.query(ddl)
        yield name
    finally:
        admin.close()


def settle(cluster: Cluster, database: str) -> None:
    """Wait until every live replica has fetched what its peers have."""
    for node in cluster.nodes:
        if node.process is not None and node.process.poll() is None:
            sink = sink_on(node, database)
            try:
                sink.query(f"SYSTEM SYNC REPLICA {identifier(database)}.events_local")
            finally:
                sink.close()


def replica_ids(cluster: Cluster, database: str) -> dict[str, list[str]]:
    """The ids stored in each live node's local table, by node name."""
    found = {}
    for node in cluster.nodes:
        if node.process is not None and node.process.poll() is None:
            sink = sink_on(node, database)
            try:
                rows = sink.query("SELECT toString(id) FROM events_local")
            finally:
                sink.close()
            found[node.name] = sorted(row[0] for row in rows)
    return found


def assert_once_across_shards(cluster: Cluster, database: str, sent: set[str]) -> None:
    settle(cluster, database)
    by_node = replica_ids(cluster, database)
    assert len(by_node) == len(cluster.nodes)
    shards: dict[int, list[str]] = {}
    for node in cluster.nodes:
        if node.name in by_node:
            ids = by_node[node.name]
            # Replicas of a shard hold the same rows.
            assert shards.setdefault(node.shard, ids) == ids, f"{node.name} differs"
    everything = [i for ids in shards.values() for i in ids]
    assert len(everything) == len(set(everything)), "a row is stored twice"
    assert set(everything) == sent
    assert all(shards.values()), "the sharding key left a shard empty"
    entry = sink_on(cluster.nodes[0], database)
    try:
        assert entry.query("SELECT count(), uniqExact(id) FROM events") == [(len(sent), len(sent))]
    finally:
        entry.close()


def cluster_settings(redis_url: str, url: str, batch: int, chunk: int) -> Settings:
    return Settings.from_env(
        {
            "REDIS_URL": redis_url,
            "CLICKHOUSE_URL": url,
            "EVENT_BUFFER_BATCH_SIZE": str(batch),
            "EVENT_BUFFER_CHUNK_SIZE": str(chunk),
        }
    )


def flush_in_process(redis: redis_lib.Redis, settings: Settings, seconds: float = 60) -> int:
    """Flush until the buffer is empty, retrying transient failures. Returns re-drives."""
    buffer = EventBuffer(redis, settings)
    flusher = Flusher(
        redis, settings, lambda: NativeSink(settings.clickhouse_url, require_dedup=False)
    )
    deadline = time.monotonic() + seconds
    redriven = 0
    while buffer.get_buffer_size() > 0:
        assert time.monotonic() < deadline, "the flush makes no progress"
        try:
            result = flusher.flush_shard(0, respect_backoff=False)
        except RetryableSinkError:
            time.sleep(0.2)
            continue
        if not result.locked:
            time.sleep(0.1)  # a dead flusher's lock, until its TTL runs out
        redriven += result.redriven
    return redriven


def run_child(redis_url: str, url: str, kill_after: int, batch: int, chunk: int) -> Any:
    done = subprocess.run(
        runner_args(redis_url, url, kill_after, batch, chunk, "--lock-ttl", "1"),
        capture_output=True,
        text=True,
        timeout=120,
    )
    return parse_run(done.returncode, done.stdout, done.stderr)


# --- ClickHouse 18.16 + ZooKeeper, 2 shards x 2 replicas ---------------------


def test_migrate_ddl_makes_replicated_shards_under_a_distributed_table(
    old_cluster: Cluster, database: str
) -> None:
    for node in old_cluster.nodes:
        sink = sink_on(node, database)
        try:
            engines = dict(
                sink.query(f"SELECT name, engine FROM system.tables WHERE database = '{database}'")
            )
            [(local_ddl,)] = sink.query("SHOW CREATE TABLE events_local")
            [(distributed_ddl,)] = sink.query("SHOW CREATE TABLE events")
        finally:
            sink.close()
        assert engines == {"events": "Distributed", "events_local": "ReplicatedMergeTree"}
        assert f"/clickhouse/tables/{{shard}}/{database}/events_local" in local_ddl
        assert f"replicated_deduplication_window = {DEDUP_WINDOW}" in local_ddl
        assert f"replicated_deduplication_window_seconds = {DEDUP_WINDOW_SECONDS}" in local_ddl
        assert f"Distributed(eventbuffer, {database}, events_local, {SHARDING_KEY})" in (
            distributed_ddl.replace("'", "")
        )


def test_sink_writes_in_the_foreground_and_repeats_are_dropped(
    old_cluster: Cluster, database: str
) -> None:
    sink = sink_on(old_cluster.nodes[0], database)
    events = make_events(40, seed=11)
    rows = [encode_event(parse_event(e)) for e in events]
    try:
        sink.write(rows, "claim:0")
        assert sink.distributed
        # insert_distributed_sync: the remote shard has its rows when write()
        # returns (in the background mode they would wait in the entry node's
        # queue directory, and a SIGKILL of that node would strand them).
        on_shard_2 = 0
        for replica in (old_cluster.node(2, 1), old_cluster.node(2, 2)):
            remote = sink_on(replica, database)
            try:
                on_shard_2 += remote.query("SELECT count() FROM events_local")[0][0]
            finally:
                remote.close()
        assert on_shard_2 > 0
        sink.write(rows, "claim:0")  # the re-drive of the same chunk
    finally:
        sink.close()
    assert_once_across_shards(old_cluster, database, {e["id"] for e in events})


@pytest.mark.parametrize("kill_after", [1, 3], ids=["between-chunks", "before-ack"])
def test_flusher_sigkilled_then_redriven_lands_every_row_once(
    old_cluster: Cluster, database: str, redis: redis_lib.Redis, redis_url: str, kill_after: int
) -> None:
    url = with_database(old_cluster.url, database)
    settings = cluster_settings(redis_url, url, 60, 20)
    sent = send(redis, settings, make_events(60, seed=kill_after))

    child = run_child(redis_url, url, kill_after, 60, 20)

    assert child.returncode == -signal.SIGKILL, child.stderr
    assert len(child.writes) == kill_after
    redriven = flush_in_process(redis, settings)
    assert redriven == 1
    assert_once_across_shards(old_cluster, database, sent)


def test_random_sharding_would_duplicate_a_redriven_chunk(
    old_cluster: Cluster, database: str
) -> None:
    """The control: over the same Replicated shards, a Distributed table sharded
    by rand() splits a repeated chunk differently, so each shard sees a new
    block and keeps it. The deterministic key is what makes the re-drive safe."""
    admin = sink_on(old_cluster.nodes[0], database)
    columns = ", ".join(f"{name} {kind}" for name, kind in COMPAT_COLUMNS)
    admin.query(
        f"CREATE TABLE {database}.events_random ON CLUSTER eventbuffer ({columns}) "
        f"ENGINE = Distributed(eventbuffer, {database}, events_local, rand())"
    )
    admin.close()
    events = make_events(100, seed=21)
    rows = [encode_event(parse_event(e)) for e in events]
    sink = NativeSink(
        with_database(old_cluster.url, database), "events_random", require_dedup=False
    )
    try:
        sink.write(rows, "claim:0")
        sink.write(rows, "claim:0")
    finally:
        sink.close()
    settle(old_cluster, database)
    entry = sink_on(old_cluster.nodes[0], database)
    try:
        [(rows_stored, distinct)] = entry.query("SELECT count(), uniqExact(id) FROM events")
    finally:
        entry.close()
    assert distinct == 100
    assert rows_stored > 100, "rand() split both inserts the same way (odds 2^-100)"


def test_replica_sigkilled_during_the_flush_loses_nothing(
    old_cluster: Cluster, database: str, redis: redis_lib.Redis, redis_url: str
) -> None:
    """SIGKILL one replica of shard 2 right after the first chunk is written;
    the flush carries on (the Distributed table fails over to the other
    replica, a failed chunk is re-driven with the same content) and nothing
    is doubled. A chunk the killed replica had stored but its peer had not
    fetched yet waits on the killed replica's disk (without insert_quorum, an
    INSERT is acknowledged by one replica): once it is back, replication
    catches up and every row is there once."""
    url = with_database(old_cluster.url, database)
    settings = cluster_settings(redis_url, url, 200, 20)
    sent = send(redis, settings, make_events(200, seed=31))
    victim = old_cluster.node(2, 1)

    child = subprocess.Popen(
        runner_args(redis_url, url, 0, 200, 20, "--lock-ttl", "5"),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        first = child.stdout.readline()
        assert json.loads(first)["write"].endswith(":0"), first
        victim.kill()
        _, err = child.communicate(timeout=120)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
    # Either the whole flush went through the surviving replica, or a chunk
    # failed (the claim stays open) and the in-process flush re-drives it.
    assert child.returncode == 0 or "RetryableSinkError" in err, err
    try:
        flush_in_process(redis, settings)
        # While it is down: no row twice among those the cluster serves.
        entry = sink_on(old_cluster.nodes[0], database)
        try:
            [(stored, distinct)] = entry.query("SELECT count(), uniqExact(id) FROM events")
        finally:
            entry.close()
        assert stored == distinct > 0
    finally:
        victim.start()
        victim.wait_ready()
    assert_once_across_shards(old_cluster, database, sent)


# --- ClickHouse 26.x (chDB), 2 shards: the token path -----------------------


@pytest.fixture(scope="session")
def new_cluster() -> Iterator[Cluster]:
    why = chdb_serves()
    if why is not None:
        pytest.skip(f"no ClickHouse 26.x cluster here: {why}")
    with modern_cluster(shards=2) as cluster:
        print(f"\nchDB cluster (2 servers) ready in {cluster.started_in_s:.2f} s")
        yield cluster


@pytest.fixture
def new_database(new_cluster: Cluster) -> str:
    """The full `events` schema: MergeTree shards with the token window, and
    the Distributed table as migrate makes it, created host by host (chDB
    runs no distributed DDL)."""
    name = f"eb_{uuid.uuid4().hex[:10]}"
    columns = ",\n    ".join(f"{col} {kind}" for col, kind in COLUMNS)
    for node in new_cluster.nodes:
        sink = sink_on(node, "default")
        try:
            sink.query(f"CREATE DATABASE {name}")
            sink.query(create_table(local_table("events"), name))
            sink.query(
                f"CREATE TABLE {name}.events (\n    {columns}\n) ENGINE = Distributed("
                f"{new_cluster.name}, {name}, {local_table('events')}, {SHARDING_KEY})"
            )
        finally:
            sink.close()
    return name


def shard_counts(cluster: Cluster, database: str) -> list[int]:
    counts = []
    for node in cluster.nodes:
        sink = sink_on(node, database)
        try:
            [(n,)] = sink.query("SELECT count() FROM events_local")
        finally:
            sink.close()
        counts.append(int(n))
    return counts


def test_modern_token_reaches_every_shard(new_cluster: Cluster, new_database: str) -> None:
    events = make_events(50, seed=41)
    rows = [encode_event(parse_event(e)) for e in events]
    sink = NativeSink(with_database(new_cluster.url, new_database))
    try:
        sink.write(rows, "c1:0")
        assert sink.distributed
        counts = shard_counts(new_cluster, new_database)
        assert sum(counts) == 50 and all(counts)
        sink.write(rows, "c1:0")  # re-driven: each shard has seen the token
        assert shard_counts(new_cluster, new_database) == counts
        sink.write(rows, "c1:1")  # same rows, another chunk's token: stored again
        assert shard_counts(new_cluster, new_database) == [2 * n for n in counts]
    finally:
        sink.close()
    # Each shard received its part of the chunk under the chunk's token.
    for node in new_cluster.nodes:
        probe = sink_on(node, "default")
        try:
            probe.query("SYSTEM FLUSH LOGS")
            tokens = probe.query(
                "SELECT DISTINCT Settings['insert_deduplication_token'] FROM system.query_log"
                " WHERE type = 'QueryFinish' AND query_kind = 'Insert'"
                " AND position(query, %(table)s) > 0",
                {"table": f"{new_database}.events_local"},
            )
        finally:
            probe.close()
        if node is not new_cluster.nodes[0]:  # the entry node writes its shard locally
            assert sorted(tokens) == [("c1:0",), ("c1:1",)]


def test_modern_flusher_sigkilled_between_chunks(
    new_cluster: Cluster, new_database: str, redis: redis_lib.Redis, redis_url: str
) -> None:
    url = with_database(new_cluster.url, new_database)
    settings = cluster_settings(redis_url, url, 60, 20)
    sent = send(redis, settings, make_events(60, seed=51))

    child = run_child(redis_url, url, 2, 60, 20)

    assert child.returncode == -signal.SIGKILL, child.stderr
    assert flush_in_process(redis, settings) == 1
    counts = shard_counts(new_cluster, new_database)
    assert sum(counts) == 60 and all(counts)
    entry = NativeSink(url)
    try:
        ids = {row[0] for row in entry.query("SELECT toString(id) FROM events")}
    finally:
        entry.close()
    assert ids == sent
    assert RUNNER.is_file()


def test_migrate_cluster_needs_a_clickhouse_server(run_main: Any) -> None:
    # The test's CLICKHOUSE_URL is embedded chDB: no cluster to create tables on.
    result = run_main("migrate", "--cluster", "prod")
    assert result.code != 0
    assert "--cluster needs a ClickHouse server" in result.err
    bad = run_main("migrate", "--cluster", "prod; DROP")
    assert bad.code != 0
    assert "--cluster: not a valid ClickHouse identifier" in bad.err
