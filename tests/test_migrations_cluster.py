"""Migrations `ON CLUSTER` on the loopback cluster: Debian's ClickHouse 18.16 with
ZooKeeper, 2 shards x 2 replicas (tests/support/clickhouse_cluster.py).

`migrate --cluster` from two hosts at the same moment: the lock (a `CREATE
TABLE ... ON CLUSTER`, which the ordered distributed DDL queue lets exactly one
win on every host) makes one apply and the other find it done; the record
table is one Replicated table every host reads. A cluster made by the previous
release's `migrate --cluster` upgrades in place, rows kept. 18.16 has neither
skipping indexes (a recorded no-op) nor TTL (a retention is refused).
"""

from __future__ import annotations

import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.support.clickhouse_cluster import Cluster, Node, clickhouse_cluster, cluster_unavailable
from tests.support.migrations import (
    AUDIT,
    AUDIT_ROW,
    COMPAT_COLUMNS,
    ONCE,
    RETENTION,
    SKIPPING_INDEXES,
    after,
    applied_details,
    now_ms,
    race_for_a_dead_holders_lock,
    row,
    versions,
)
from worker.privacy.clickhouse import record_audit
from worker.sinks.migrations import MIGRATIONS, MigrationError, read_records
from worker.sinks.native import NativeSink
from worker.sinks.schema import AUDIT_TABLE, MIGRATIONS_LOCK_TABLE, MIGRATIONS_TABLE

pytestmark = pytest.mark.slow


# What the previous release's `eventbuffer migrate --cluster` ran (its
# create_cluster_tables, on the columns 18.16 has), verbatim but for the names.
PREVIOUS_RELEASE_CLUSTER_DDL = (
    "CREATE DATABASE IF NOT EXISTS `{db}` ON CLUSTER `{cluster}`",
    "CREATE TABLE IF NOT EXISTS `{db}`.`events_local` ON CLUSTER `{cluster}`\n(\n"
    "    id UUID,\n    name String,\n    device_id String,\n    project_id String,\n"
    "    profile_id String,\n    session_id String,\n    created_at DateTime,\n"
    "    duration UInt64\n)\n"
    "ENGINE = ReplicatedMergeTree("
    "'/clickhouse/tables/{{shard}}/{db}/events_local', '{{replica}}')\n"
    "PARTITION BY toYYYYMM(created_at)\n"
    "ORDER BY (project_id, toDate(created_at), profile_id, name)\n"
    "SETTINGS replicated_deduplication_window = 10000, "
    "replicated_deduplication_window_seconds = 604800",
    "CREATE TABLE IF NOT EXISTS `{db}`.`events` ON CLUSTER `{cluster}`\n(\n"
    "    id UUID,\n    name String,\n    device_id String,\n    project_id String,\n"
    "    profile_id String,\n    session_id String,\n    created_at DateTime,\n"
    "    duration UInt64\n)\n"
    "ENGINE = Distributed(`{cluster}`, `{db}`, `events_local`, cityHash64(toString(id)))",
)


def on(node: Node, database: str) -> NativeSink:
    url = urlunsplit(urlsplit(node.url)._replace(path=f"/{database}"))
    return NativeSink(url, require_dedup=False)


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    why = cluster_unavailable()
    if why is not None:
        pytest.skip(f"the 18.16 cluster {why} (bash .ci/run installs both)")
    with clickhouse_cluster(shards=2, replicas=2) as started:
        yield started


def migrate_from(nodes: list[Node], database: str, **options: Any) -> list[Any]:
    """Each node's own sink calls migrate(--cluster) at the same moment; their reports."""
    barrier = threading.Barrier(len(nodes))
    reports: list[Any] = [None] * len(nodes)

    def one(n: int, node: Node) -> None:
        sink = on(node, "default")
        sink.database = database  # the URL's database may not exist yet
        try:
            sink.query("SELECT 1")
            barrier.wait(timeout=30)
            reports[n] = sink.migrate("eventbuffer", columns=COMPAT_COLUMNS, **options)
        except Exception as exc:
            reports[n] = exc
        finally:
            sink.close()

    threads = [threading.Thread(target=one, args=(n, node)) for n, node in enumerate(nodes)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=300)
    return reports


def every_node_records(cluster: Cluster, database: str) -> list[dict[int, int]]:
    found = []
    for node in cluster.nodes:
        sink = on(node, database)
        try:
            sink.query(f"SYSTEM SYNC REPLICA {database}.{MIGRATIONS_TABLE}")
            found.append(versions(read_records(sink.query, database)))
            tables = dict(
                sink.query(f"SELECT name, engine FROM system.tables WHERE database = '{database}'")
            )
        finally:
            sink.close()
        assert tables == {
            "events": "Distributed",
            "events_local": "ReplicatedMergeTree",
            MIGRATIONS_TABLE: "ReplicatedMergeTree",
            AUDIT_TABLE: "ReplicatedMergeTree",
        }, node.name
        assert MIGRATIONS_LOCK_TABLE not in tables
    return found


def test_migrate_from_two_hosts_at_once(cluster: Cluster) -> None:
    database = f"eb_{uuid.uuid4().hex[:10]}"
    reports = migrate_from([cluster.node(1, 1), cluster.node(2, 2)], database)
    assert all(not isinstance(r, Exception) for r in reports), reports
    assert sorted(len(r.applied) for r in reports) == [0, len(MIGRATIONS)]
    winner = next(r for r in reports if r.applied)
    assert applied_details(winner)[SKIPPING_INDEXES].startswith("skipped: ClickHouse 18.16")
    assert every_node_records(cluster, database) == [ONCE] * 4
    # The forget audit table is one replicated table: a request recorded through one
    # host is read on every other.
    writer = on(cluster.node(1, 1), database)
    try:
        record_audit(writer, AUDIT_ROW)
    finally:
        writer.close()
    for node in cluster.nodes:
        reader = on(node, database)
        try:
            reader.query(f"SYSTEM SYNC REPLICA {database}.{AUDIT_TABLE}")
            assert reader.query(f"SELECT user, selector_id FROM {AUDIT_TABLE}") == [
                ("ops", "u1")
            ], node.name
        finally:
            reader.close()


def test_previous_release_cluster_upgrades_in_place(cluster: Cluster) -> None:
    database = f"eb_{uuid.uuid4().hex[:10]}"
    admin = on(cluster.nodes[0], "default")
    try:
        for ddl in PREVIOUS_RELEASE_CLUSTER_DDL:
            admin.query(ddl.format(db=database, cluster=cluster.name))
    finally:
        admin.close()
    writer = on(cluster.nodes[0], database)
    sent = [str(uuid.UUID(int=n + 1)) for n in range(30)]
    try:
        writer.write([row(now_ms(), id=i, profile_id=f"u{i[-1]}") for i in sent], "c:0")
    finally:
        writer.close()

    reports = migrate_from([cluster.node(1, 2), cluster.node(2, 1)], database)

    assert all(not isinstance(r, Exception) for r in reports), reports
    assert sum(r.found for r in reports) == 1
    assert sorted(len(r.applied) for r in reports) == [0, len(after(1))]
    assert every_node_records(cluster, database) == [ONCE] * 4
    reader = on(cluster.nodes[3], database)
    try:
        stored = sorted(r[0] for r in reader.query("SELECT toString(id) FROM events"))
    finally:
        reader.close()
    assert stored == sorted(sent)
    # Without --cluster, the Distributed table is refused (its ALTERs would fail).
    alone = on(cluster.nodes[0], database)
    try:
        with pytest.raises(MigrationError, match="run `eventbuffer migrate --cluster NAME`"):
            alone.migrate(columns=COMPAT_COLUMNS)
    finally:
        alone.close()


def test_audit_tables_forget_made_before_migrate_become_replicated(cluster: Cluster) -> None:
    """`forget` through two hosts before any `migrate --cluster` left each a plain audit
    table: migrate through one converts its own and names what is left; through the
    other, converts that one; the rows of both are then read on every host."""
    database = f"eb_{uuid.uuid4().hex[:10]}"
    first, second = cluster.node(1, 1), cluster.node(2, 2)
    admin = on(cluster.nodes[0], "default")
    try:
        admin.query(f"CREATE DATABASE {database} ON CLUSTER {cluster.name}")
    finally:
        admin.close()
    for node, user in ((first, "ops-a"), (second, "ops-b")):
        sink = on(node, database)
        try:
            record_audit(sink, AUDIT_ROW | {"user": user})
        finally:
            sink.close()

    [refused] = migrate_from([first], database)
    assert isinstance(refused, MigrationError), refused
    assert "1 of the 4 hosts" in str(refused) and "unreplicated" in str(refused)
    [report] = migrate_from([second], database)
    assert not isinstance(report, Exception), report
    assert [v for v, _, _ in report.applied] == [AUDIT]

    assert every_node_records(cluster, database) == [ONCE] * 4
    for node in cluster.nodes:
        reader = on(node, database)
        try:
            reader.query(f"SYSTEM SYNC REPLICA {database}.{AUDIT_TABLE}")
            users = reader.query(f"SELECT user FROM {AUDIT_TABLE} ORDER BY user")
            assert users == [("ops-a",), ("ops-b",)], node.name
        finally:
            reader.close()


def test_retention_is_refused_on_18_16(cluster: Cluster) -> None:
    database = f"eb_{uuid.uuid4().hex[:10]}"
    [report] = migrate_from([cluster.nodes[0]], database, retention_days=30)
    assert isinstance(report, MigrationError)
    assert "TTL" in str(report) and "18.16" in str(report)
    # The migrations before it were applied and recorded; it and those after stay pending.
    sink = on(cluster.nodes[0], database)
    try:
        before = {v: n for v, n in ONCE.items() if v < RETENTION}
        assert versions(read_records(sink.query, database)) == before
    finally:
        sink.close()


def test_a_dead_holders_lock_is_broken_by_one_of_many(cluster: Cluster, tmp_path: Path) -> None:
    """A dead holder's lock found by a migrate on each host at once: one breaks it, on every
    host. (The ordered DDL queue makes two breakers rare here: this checks the break on a
    cluster; tests/test_migrations_lock.py shows the race.)"""
    database = f"eb_{uuid.uuid4().hex[:10]}"
    admin = on(cluster.nodes[0], "default")
    try:
        admin.query(f"CREATE DATABASE {database} ON CLUSTER {cluster.name}")
        urls = [
            urlunsplit(urlsplit(node.url)._replace(path=f"/{database}")) for node in cluster.nodes
        ]
        race_for_a_dead_holders_lock(admin.query, urls, database, cluster.name, tmp_path, 3)
        for node in cluster.nodes:
            sink = on(node, database)
            try:
                assert not sink.query(f"SHOW TABLES LIKE '{MIGRATIONS_LOCK_TABLE}%'"), node.name
            finally:
                sink.close()
    finally:
        admin.close()
