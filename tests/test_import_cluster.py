"""`eventbuffer import` into a ClickHouse cluster: through the Distributed `events` table.

Two ClickHouse 26.x servers from chDB as two shards (tests/support/
clickhouse_cluster.modern_cluster; chDB has no Keeper, so no replicas), the
`events` schema as `migrate --cluster` makes it (MergeTree shards with the
token window under a Distributed table hashing the event id), created host
by host. The import writes through the flush's native sink: every event once
across the shards, with a SIGKILL between; a second import lands nothing.
"""

from __future__ import annotations

import signal
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.support.clickhouse_cluster import Cluster, modern_cluster
from tests.support.exports import generate_export
from tests.support.importing import import_command, import_env, run_import_cli, summary_of
from tests.support.native_server import chdb_serves
from tests.support.polling import wait_until
from worker.sinks.native import NativeSink
from worker.sinks.schema import COLUMNS, SHARDING_KEY, create_table, local_table

pytestmark = pytest.mark.slow


def with_database(url: str, database: str) -> str:
    return urlunsplit(urlsplit(url)._replace(path=f"/{database}"))


@pytest.fixture(scope="module")
def cluster() -> Iterator[Cluster]:
    why = chdb_serves()
    if why is not None:
        pytest.skip(f"no ClickHouse 26.x cluster here: {why}")
    with modern_cluster(shards=2) as started:
        yield started


@pytest.fixture
def database(cluster: Cluster) -> str:
    name = f"eb_{uuid.uuid4().hex[:10]}"
    columns = ",\n    ".join(f"{col} {kind}" for col, kind in COLUMNS)
    for node in cluster.nodes:
        sink = NativeSink(with_database(node.url, "default"))
        try:
            sink.query(f"CREATE DATABASE {name}")
            sink.query(create_table(local_table("events"), name))
            sink.query(
                f"CREATE TABLE {name}.events (\n    {columns}\n) ENGINE = Distributed("
                f"{cluster.name}, {name}, {local_table('events')}, {SHARDING_KEY})"
            )
        finally:
            sink.close()
    return name


def test_an_import_through_the_distributed_table_lands_once(
    tmp_path: Path, cluster: Cluster, database: str
) -> None:
    url = with_database(cluster.url, database)
    # Enough chunks (40) that the kill lands before the import's end.
    export = generate_export(tmp_path / "export", 20_000, files=2)
    env = import_env("chdb:///unused", CLICKHOUSE_URL=url, EVENT_BUFFER_IMPORT_CHUNK_ROWS="500")
    process = subprocess.Popen(
        import_command("--json", *export.files), cwd=tmp_path, env=env, stderr=subprocess.PIPE
    )
    states = tmp_path / "data" / "imports"
    wait_until(
        lambda: any(states.glob("*/state.sqlite")) and _inserted(url) > 0,
        120,
        "a first chunk",
        alive=lambda: process.poll() is None,
    )
    assert process.poll() is None, "the import ended before it could be killed"
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.stderr is not None
    process.stderr.close()
    summary = summary_of(run_import_cli(tmp_path, env, "--json", *export.files))
    assert summary["resumed"] is True
    assert summary["imported"] + summary["duplicates"] == export.events
    entry = NativeSink(url)
    try:
        [(rows, distinct, with_imported_at)] = entry.query(
            "SELECT count(), uniqExact(properties['n']), countIf(imported_at IS NOT NULL) "
            "FROM events"
        )
        durations = dict(entry.query("SELECT properties['n'], duration FROM events"))
    finally:
        entry.close()
    assert rows == distinct == with_imported_at == export.events
    assert {n: int(d) for n, d in durations.items()} == export.expected
    shards = [
        _inserted(with_database(node.url, database), "events_local") for node in cluster.nodes
    ]
    assert sum(shards) == export.events and all(shards)
    again = summary_of(run_import_cli(tmp_path, env, "--json", *export.files))
    assert (again["imported"], again["duplicates"]) == (0, export.events)


def _inserted(url: str, table: str = "events") -> int:
    sink = NativeSink(url)
    try:
        [(count,)] = sink.query(f"SELECT count() FROM {table}")
        return int(count)
    finally:
        sink.close()
