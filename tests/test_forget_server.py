"""`forget` on a ClickHouse server: the Debian 18.16 one (a mutation, waited for) and
its loopback cluster (the mutation ON CLUSTER on every shard's local table).

18.16 has no DateTime64 nor Map: the tables have the columns of `events` it
can hold (as in tests/test_clickhouse_cluster.py), created_at to the second.
The buffer is empty here: tests/test_forget.py covers it.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import pytest
import redis as redis_lib

from tests.support.clickhouse_cluster import Cluster
from tests.support.people import person_event
from tests.test_clickhouse_cluster import (  # noqa: F401 (fixtures)
    COMPAT_COLUMNS,
    old_cluster,
    settle,
    sink_on,
    with_database,
)
from tests.test_clickhouse_cluster import database as cluster_database  # noqa: F401
from worker.events import encode_event, parse_event
from worker.privacy.clickhouse import AUDIT_TABLE
from worker.privacy.forget_request import forget
from worker.privacy.selector import Selector
from worker.settings import Settings
from worker.sinks.native import NativeSink

pytestmark = pytest.mark.slow

NOW_MS = (time.time_ns() // 1_000_000 // 1000) * 1000
ALICE = Selector("p1", "profile", "alice")


def row(who: str, ms: int) -> bytes:
    return encode_event(parse_event(person_event("click", ms, who, f"s-{who}")))


def seed_rows() -> list[bytes]:
    return [row(who, NOW_MS - 60_000 + n * 1000) for n in range(20) for who in ("alice", "bob")]


def counts(sink: NativeSink) -> dict[str, int]:
    return dict(sink.query("SELECT profile_id, count() FROM events GROUP BY profile_id"))


def test_forget_on_the_18_16_server_waits_for_its_mutation(
    old_server_url: str, redis: redis_lib.Redis, redis_url: str
) -> None:
    db = f"eb_{uuid.uuid4().hex[:10]}"
    admin = NativeSink(old_server_url, require_dedup=False)
    admin.query(f"CREATE DATABASE {db}")
    columns = ", ".join(f"{name} {kind}" for name, kind in COMPAT_COLUMNS)
    admin.query(
        f"CREATE TABLE {db}.events ({columns}) ENGINE = MergeTree ORDER BY (project_id, id)"
    )
    admin.close()
    url = with_database(old_server_url, db)
    sink = NativeSink(url, require_dedup=False)
    try:
        [(version,)] = sink.query("SELECT version()")
        assert version.startswith("18.16.")
        sink.write(seed_rows(), "seed")
        settings = Settings.from_env({"REDIS_URL": redis_url, "CLICKHOUSE_URL": url})
        report = forget(redis, sink, settings, ALICE)
        assert report.clickhouse_rows == 20
        assert counts(sink) == {"bob": 20}
        again = forget(redis, sink, settings, ALICE)
        assert again.clickhouse_rows == 0
        audit: list[Any] = sink.query(
            f"SELECT user, host, selector, selector_id, clickhouse_rows FROM {AUDIT_TABLE} "
            "ORDER BY requested_ms"
        )
        assert [r[2:] for r in audit] == [("profile", "alice", 20), ("profile", "alice", 0)]
        assert all(r[0] and r[1] for r in audit)
    finally:
        sink.close()


def test_forget_on_the_18_16_cluster_deletes_on_every_shard(
    old_cluster: Cluster,  # noqa: F811
    cluster_database: str,  # noqa: F811
    redis: redis_lib.Redis,
    redis_url: str,
) -> None:
    sink = sink_on(old_cluster.nodes[0], cluster_database)
    try:
        sink.write(seed_rows(), "seed")
        settle(old_cluster, cluster_database)
        per_shard = [
            n.query("SELECT count() FROM events_local WHERE profile_id = 'alice'")[0][0]
            for n in (sink_on(node, cluster_database) for node in old_cluster.nodes)
        ]
        assert sum(1 for c in per_shard if c) >= 2, "Alice's rows are on one shard only"
        url = with_database(old_cluster.nodes[0].url, cluster_database)
        settings = Settings.from_env({"REDIS_URL": redis_url, "CLICKHOUSE_URL": url})
        report = forget(redis, sink, settings, ALICE)
        assert report.clickhouse_rows == 20
        settle(old_cluster, cluster_database)
        for node in old_cluster.nodes:
            local = sink_on(node, cluster_database)
            try:
                left = local.query(
                    "SELECT profile_id, count() FROM events_local GROUP BY profile_id"
                )
                assert "alice" not in dict(left), node.name
            finally:
                local.close()
        assert counts(sink) == {"bob": 20}
    finally:
        sink.close()
