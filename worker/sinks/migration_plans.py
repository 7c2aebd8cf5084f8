"""The versioned migrations of the ClickHouse schema: what each one runs.

`MIGRATIONS` lists them in order. Each has a version, a name and a `plan`:
the DDL it runs on this server, for this table (standalone or `ON CLUSTER`),
and the *definition* its checksum covers. Applying and recording them, and
`--status`: worker/sinks/migrations.py; the lock that lets several `migrate`
run at once: worker/sinks/migrations_lock.py.

Some migrations depend on a setting or on the server (`reapply=True`): the
retention TTL on `EVENT_BUFFER_RETENTION_DAYS`, the skipping indexes on the
server having them. Their definition names the value (`TTL created_at +
INTERVAL 30 DAY DELETE`, `no TTL`), so a changed value changes the checksum
and `migrate` applies the migration again, recording another row: the latest
row of a version is the one in force. A fixed migration whose recorded
checksum differs from the code's is only reported (`--status`: modified).
Every migration's DDL is idempotent (IF NOT EXISTS, MODIFY TTL to a value).

Adding a migration is one entry at the end of `MIGRATIONS`, e.g. a table of
its own (`table_migration`):

    Migration(5, "replay log", table_migration("eventbuffer_replays",
              "(replayed_at DateTime, host String, ...)", order_by="replayed_at"))
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

from worker.errors import SinkError
from worker.sinks.schema import (
    AUDIT_COLUMNS,
    AUDIT_ORDER_BY,
    AUDIT_TABLE,
    COLUMNS,
    SKIPPING_INDEX_GRANULARITY,
    SKIPPING_INDEX_TYPE,
    SKIPPING_INDEXES,
    Run,
    add_skipping_indexes,
    audit_body,
    create_cluster_tables,
    create_table,
    database_expr,
    identifier,
    local_table,
    modify_ttl,
    on_cluster,
    qualified,
    remove_ttl,
    retention_ttl,
    shared_replicated_engine,
    shared_replicated_path,
    string_literal,
)

# Server versions that have each feature (ClickHouse's changelog).
SKIPPING_INDEXES_SINCE = (19, 8)  # bloom_filter indexes (18.16 has no skipping indexes)
TTL_SINCE = (19, 6)


class MigrationError(SinkError):
    """A migration cannot be applied on this server with these settings."""


@dataclass(frozen=True)
class Target:
    """Where the migrations apply: the events table, standalone or on a cluster."""

    table: str
    database: str | None  # None: the session's database (embedded ClickHouse)
    cluster: str | None
    retention_days: int
    server: tuple[int, int]
    columns: Sequence[tuple[str, str]] = COLUMNS

    @property
    def data_table(self) -> str:
        """The table holding the rows: the per-host table behind a Distributed one."""
        return self.table if self.cluster is None else local_table(self.table)


@dataclass(frozen=True)
class Plan:
    definition: str  # what the checksum covers
    statements: tuple[str, ...]
    detail: str  # recorded, and shown by --status
    # Run after the statements, before the record: raises MigrationError if they
    # left something this host cannot fix (the migration stays pending).
    verify: Callable[[Run], None] | None = None


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    plan: Callable[[Target, Run], Plan]
    # Applied again when its definition changes (it depends on a setting or the server).
    reapply: bool = False
    # Depends on EVENT_BUFFER_RETENTION_DAYS: a `migrate` not told the setting
    # (retention_days=None) leaves it as recorded.
    uses_retention: bool = False


# --- The migrations ------------------------------------------------------------


def _events_table(target: Target, run: Run) -> Plan:
    # The checksum covers the table as the code defines it, whatever its name or cluster.
    definition = create_table("events", None, COLUMNS)
    if target.cluster is None:
        statements = [create_table(target.table, target.database, target.columns)]
    else:
        assert target.database is not None
        statements = create_cluster_tables(
            target.table, target.database, target.cluster, target.columns
        )[1:]  # the database exists already
    return Plan(definition, tuple(statements), f"table `{target.table}`")


def _skipping_indexes(target: Target, run: Run) -> Plan:
    indexes = ", ".join(
        f"{name} {column} TYPE {SKIPPING_INDEX_TYPE} GRANULARITY {SKIPPING_INDEX_GRANULARITY}"
        for name, column in SKIPPING_INDEXES
    )
    if target.server < SKIPPING_INDEXES_SINCE:
        major, minor = target.server
        return Plan(
            "none: the server has no data-skipping indexes",
            (),
            f"skipped: ClickHouse {major}.{minor} has no data-skipping indexes "
            f"({'.'.join(map(str, SKIPPING_INDEXES_SINCE))}+); `migrate` adds them once "
            "the server is upgraded",
        )
    statements = add_skipping_indexes(target.data_table, target.database, target.cluster)
    # Servers from before indexes left "experimental" want the setting in the session.
    experimental = run(
        "SELECT value FROM system.settings WHERE name = 'allow_experimental_data_skipping_indices'"
    )
    if experimental and str(experimental[0][0]) == "0":
        statements.insert(0, "SET allow_experimental_data_skipping_indices = 1")
    names = ", ".join(column for _, column in SKIPPING_INDEXES)
    return Plan(indexes, tuple(statements), f"{SKIPPING_INDEX_TYPE} indexes on {names}")


def _has_ttl(target: Target, run: Run) -> bool:
    rows = run(
        "SELECT engine_full FROM system.tables WHERE "
        f"database = {database_expr(target.database)} "
        f"AND name = {string_literal(target.data_table)}"
    )
    return bool(rows) and " TTL " in f" {rows[0][0]} "


def _retention(target: Target, run: Run) -> Plan:
    days = target.retention_days
    if days <= 0:
        definition = "no TTL"
        if target.server < TTL_SINCE or not _has_ttl(target, run):
            return Plan(definition, (), "no retention TTL (EVENT_BUFFER_RETENTION_DAYS=0)")
        statement = remove_ttl(target.data_table, target.database, target.cluster)
        return Plan(definition, (statement,), "retention TTL removed")
    if target.server < TTL_SINCE:
        major, minor = target.server
        raise MigrationError(
            f"EVENT_BUFFER_RETENTION_DAYS={days} needs a table TTL, which ClickHouse "
            f"{major}.{minor} does not have ({'.'.join(map(str, TTL_SINCE))}+): upgrade the "
            "server, or set EVENT_BUFFER_RETENTION_DAYS=0 and drop old partitions yourself"
        )
    statement = modify_ttl(target.data_table, target.database, target.cluster, days)
    return Plan(retention_ttl(days), (statement,), retention_ttl(days))


def table_migration(name: str, body: str, *, order_by: str) -> Callable[[Target, Run], Plan]:
    """A migration creating bookkeeping table `name` with columns `body` ("(a T, b U)"):
    a MergeTree, or on a cluster one ReplicatedMergeTree every host is a replica of."""
    identifier(name)

    def plan(target: Target, run: Run) -> Plan:
        engine = (
            "MergeTree"
            if target.cluster is None
            else shared_replicated_engine(name, str(target.database))
        )
        statement = (
            f"CREATE TABLE IF NOT EXISTS {qualified(name, target.database)}"
            f"{on_cluster(target.cluster)}\n{body}\nENGINE = {engine}\nORDER BY {order_by}"
        )
        return Plan(f"{body} ORDER BY {order_by}", (statement,), f"table `{name}`")

    return plan


_audit_replicated = table_migration(AUDIT_TABLE, audit_body(), order_by=AUDIT_ORDER_BY)
# Where migration 4 keeps a host's unreplicated audit table while it copies its rows.
AUDIT_UNREPLICATED = f"{AUDIT_TABLE}_unreplicated"


def _audit_table(target: Target, run: Run) -> Plan:
    """The forget audit table. On a cluster, `eventbuffer forget` run before `migrate
    --cluster` left a plain MergeTree on the host it talked to, which the CREATE ... IF
    NOT EXISTS ON CLUSTER would keep: this host's is set aside, the replicated table
    created, its rows copied in (the same block twice is dropped by the replicated
    table's dedup, should a `migrate` stopped after the copy run again) and it is
    dropped. Another host's cannot be reached from here: `verify` fails naming how many,
    and `migrate --cluster` run through each converts it."""
    plan = _audit_replicated(target, run)
    if target.cluster is None:
        return plan
    database = str(target.database)
    audit, kept = qualified(AUDIT_TABLE, database), qualified(AUDIT_UNREPLICATED, database)
    engines = {
        str(name): str(engine)
        for name, engine in run(
            "SELECT name, engine FROM system.tables WHERE "
            f"database = {string_literal(database)} AND name IN "
            f"({string_literal(AUDIT_TABLE)}, {string_literal(AUDIT_UNREPLICATED)})"
        )
    }
    statements = list(plan.statements)
    plain = AUDIT_TABLE in engines and not engines[AUDIT_TABLE].startswith("Replicated")
    if plain:
        statements.insert(0, f"RENAME TABLE {audit} TO {kept}")
    if plain or AUDIT_UNREPLICATED in engines:
        columns = ", ".join(name for name, _ in AUDIT_COLUMNS)
        statements += [
            f"INSERT INTO {audit} ({columns}) SELECT {columns} FROM {kept}",
            f"DROP TABLE {kept}",
        ]
    cluster = str(target.cluster)

    def every_host_a_replica(run: Run) -> None:
        [(hosts,)] = run(
            f"SELECT count() FROM system.clusters WHERE cluster = {string_literal(cluster)}"
        )
        path = shared_replicated_path(AUDIT_TABLE, database)
        replicas = sorted(
            str(name)
            for (name,) in run(
                "SELECT name FROM system.zookeeper WHERE "
                f"path = {string_literal(path + '/replicas')}"
            )
        )
        if len(replicas) < int(hosts):
            raise MigrationError(
                f"{int(hosts) - len(replicas)} of the {int(hosts)} hosts of cluster "
                f"`{cluster}` keep an unreplicated `{AUDIT_TABLE}` (`eventbuffer forget` ran "
                f"there before `migrate --cluster`): run `eventbuffer migrate --cluster "
                f"{cluster}` with CLICKHOUSE_URL naming each of them, which converts its "
                f"table, rows kept (the hosts already replicas: {', '.join(replicas)})"
            )

    return Plan(plan.definition, tuple(statements), plan.detail, every_host_a_replica)


MIGRATIONS: tuple[Migration, ...] = (
    Migration(1, "events table", _events_table),
    Migration(2, "skipping indexes", _skipping_indexes, reapply=True),
    Migration(3, "retention TTL", _retention, reapply=True, uses_retention=True),
    Migration(
        4,
        "forget audit table",
        _audit_table,
    ),
)
