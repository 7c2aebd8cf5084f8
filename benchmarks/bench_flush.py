"""flush: rows/s from the Redis buffer into ClickHouse, against the best raw insert.

eventbuffer's path: `Flusher.process_buffer().shards` draining a queue of N rows
with the default claim and chunk sizes (`EVENT_BUFFER_BATCH_SIZE`,
`EVENT_BUFFER_CHUNK_SIZE`; max_batches_per_flush large): lock, claim.lua,
decode heads, sort, chunked INSERTs with dedup tokens, ack.lua, and opening
and closing the sink as every run does. Also timed, for comparison, the
seed's sizes (claims of 4,000 rows in chunks of 1,000) and any sizes given in
`BENCH_FLUSH_SIZES` ("claim x chunk" pairs, e.g. `20000x10000,50000x50000`:
how the defaults were chosen).

Baselines, on the same rows into the same backend: raw inserts in chunks of
1,000, 10,000 and 100,000 rows; the target compares the flush with the best
of them (issue 22):

- chDB: `INSERT INTO events FORMAT JSONEachRow` of the same JSON lines
  through one chdb Session (opened and closed in the timed region, as the
  flusher's sink is), the rows in the statement; and, in chunks of 10,000
  and 100,000, written to a file and read `FROM INFILE` (the flush's own way
  in, which spares chDB's binding a scan of the whole statement): the best of
  all five is the baseline.
- native: clickhouse-driver columnar INSERTs of the same rows on one
  connection (decoding the JSON lines into columns is timed: the rows are
  JSON in Redis). Against `CLICKHOUSE_TEST_URL` (a modern server, the real
  `events` table) when set; else against Debian's ClickHouse 18.16 (private,
  on free ports) with a compatibility table (no Map, no DateTime64, no dedup
  tokens: `require_dedup=False`); else skipped.

Every runner runs once per round, in rotating order. Between runs the table
is dropped and created again (untimed), so no insert is dropped by block
deduplication and every path starts equal. Rows are counted after every run.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as dt
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import msgspec
import redis as redis_lib

from benchmarks.support import (
    Result,
    alternate,
    log,
    median,
    private_redis,
    skipped,
)
from tests.support.native_server import local_server, server_binary
from tests.support.traffic import mix, traffic
from worker.events import encode_event, parse_event
from worker.flusher import Flusher
from worker.settings import Settings
from worker.sinks import Sink
from worker.sinks.chdb import ChdbSink, close_all
from worker.sinks.schema import create_table

RAW_CHUNKS = (1_000, 10_000, 100_000)
# chDB also reads rows from a file (`FROM INFILE`, the flush's own way in): these sizes.
RAW_FILE_CHUNKS = (10_000, 100_000)
SEED_SIZES = (4_000, 1_000)  # the seed's claim and chunk (OpenPanel's 1,000-row inserts)
TARGET_RATIO = 0.9

# Only types ClickHouse 18.16 has: no Map (properties), no DateTime64, no LowCardinality.
COMPAT_TABLE = "events_compat"
COMPAT_DDL = f"""
CREATE TABLE {COMPAT_TABLE} (
    id UUID, name String, device_id String, profile_id String, project_id String,
    session_id String, path String, origin String, referrer String, referrer_name String,
    referrer_type String, created_at DateTime, country FixedString(2), city String,
    region String, longitude Nullable(Float32), latitude Nullable(Float32), os String,
    os_version String, browser String, browser_version String, device String, brand String,
    model String, imported_at Nullable(DateTime), sdk_name String, sdk_version String,
    duration UInt64
) ENGINE = MergeTree PARTITION BY toYYYYMM(created_at)
ORDER BY (project_id, toDate(created_at), profile_id, name)
"""


def flush_settings(
    redis_url: str, clickhouse_url: str, table: str, sizes: tuple[int, int] | None = None
) -> Settings:
    """The flusher's settings; `sizes` (claim, chunk) replaces the defaults."""
    env = {
        "REDIS_URL": redis_url,
        "CLICKHOUSE_URL": clickhouse_url,
        "EVENT_BUFFER_TABLE": table,
        "EVENT_BUFFER_MAX_BATCHES_PER_FLUSH": "100000",
    }
    if sizes is not None:
        env["EVENT_BUFFER_BATCH_SIZE"], env["EVENT_BUFFER_CHUNK_SIZE"] = map(str, sizes)
    return Settings.from_env(env)


def compared_sizes() -> list[tuple[int, int]]:
    """(claim, chunk) pairs timed beside the defaults: the seed's, and BENCH_FLUSH_SIZES."""
    sizes = [SEED_SIZES]
    for pair in filter(None, os.environ.get("BENCH_FLUSH_SIZES", "").split(",")):
        claim, chunk = pair.lower().split("x")
        sizes.append((int(claim), int(chunk)))
    return sizes


def chunks(rows: Sequence[bytes], size: int) -> Iterator[Sequence[bytes]]:
    for start in range(0, len(rows), size):
        yield rows[start : start + size]


class Bench:
    """Alternate `Flusher.process_buffer` (at several sizes) and raw inserts of the same rows."""

    def __init__(
        self,
        label: str,
        rows: list[bytes],
        settings: Callable[[tuple[int, int] | None], Settings],
        sink_factory: Callable[[], Sink],
        recreate: Callable[[], None],
        count: Callable[[], int],
        raw_insert: Callable[[list[bytes], int], None],
        raw_file_insert: Callable[[list[bytes], int], None] | None = None,
    ) -> None:
        self.label = label
        self.rows = rows
        self.recreate = recreate
        self.count = count
        # Each raw way in, by name: "raw <chunk>" (the rows in the statement) and, where
        # the backend has one, "raw file <chunk>" (the rows read from a file).
        self.raw: dict[str, tuple[Callable[[list[bytes], int], None], int]] = {
            f"raw {c}": (raw_insert, c) for c in RAW_CHUNKS
        }
        if raw_file_insert is not None:
            self.raw |= {f"raw file {c}": (raw_file_insert, c) for c in RAW_FILE_CHUNKS}
        self.warnings: list[str] = []
        defaults = settings(None)
        self.sizes = {"defaults": (defaults.batch_size, defaults.chunk_size)}
        self.flushers = {"defaults": Flusher(self._client(defaults), defaults, sink_factory)}
        for sizes in compared_sizes():
            if sizes in self.sizes.values():
                continue
            name = f"{sizes[0]}x{sizes[1]}"
            configured = settings(sizes)
            self.sizes[name] = sizes
            self.flushers[name] = Flusher(self._client(configured), configured, sink_factory)
        self.client = self.flushers["defaults"].redis
        self.queue = self.flushers["defaults"].keyspace.shard(0).queue

    @staticmethod
    def _client(settings: Settings) -> Any:
        return redis_lib.Redis.from_url(settings.redis_url)

    def _check(self, what: str, landed: int) -> None:
        if landed != len(self.rows):
            self.warnings.append(f"{what}: {landed} rows landed, expected {len(self.rows)}")

    def eventbuffer(self, name: str) -> Callable[[], float]:
        flusher = self.flushers[name]

        def run() -> float:
            self.recreate()
            self.client.flushdb()
            pipe = self.client.pipeline(transaction=False)
            for chunk in chunks(self.rows, 1000):
                pipe.rpush(self.queue, *chunk)
            pipe.execute()
            started = time.perf_counter()
            results = flusher.process_buffer().shards
            seconds = time.perf_counter() - started
            self._check(f"flush {name}", self.count())
            self._check(f"flush {name} (flush result)", sum(r.rows for r in results))
            return seconds

        return run

    def baseline(self, name: str) -> Callable[[], float]:
        insert, chunk = self.raw[name]

        def run() -> float:
            self.recreate()
            started = time.perf_counter()
            insert(self.rows, chunk)
            seconds = time.perf_counter() - started
            self._check(name, self.count())
            return seconds

        return run

    def run(self, rounds: int, name: str, baseline_name: str, note: str) -> Result:
        runners = {f"flush {n}": self.eventbuffer(n) for n in self.flushers}
        runners |= {raw: self.baseline(raw) for raw in self.raw}
        for runner in runners.values():  # warm-up of every path
            runner()
        self.warnings.clear()
        timings = alternate(rounds, runners)
        for flusher in self.flushers.values():
            flusher.redis.close()
        n = len(self.rows)
        rates = {what: median([n / s for s in seconds]) for what, seconds in timings.items()}
        # Each round's flush against that round's best raw insert: on a busy machine
        # the rounds' speeds move together, and these ratios move less than the rates.
        paired = {
            what: median(
                [min(timings[raw][r] for raw in self.raw) / seconds[r] for r in range(len(seconds))]
            )
            for what, seconds in timings.items()
            if what.startswith("flush ")
        }
        mine = rates["flush defaults"]
        best_raw = max(self.raw, key=lambda raw: rates[raw])
        best = self.raw[best_raw][1]
        theirs = rates[best_raw]
        claim, chunk = self.sizes["defaults"]
        for what, rate in rates.items():
            each = f"; {paired[what]:.2f}x per round" if what in paired else ""
            log(
                f"[flush] {self.label}: {what} {rate:,.0f} rows/s "
                f"({rate / theirs:.2f}x best raw{each})"
            )
        for warning in self.warnings:
            log(f"[flush] WARNING: {warning}")
        compared = ", ".join(
            f"{what} {rate / theirs:.2f}x"
            for what, rate in rates.items()
            if what != "flush defaults"
        )
        notes = [
            note,
            f"claim {claim}, chunk {chunk}; best raw: {best_raw}; "
            f"median of each round's ratio to its best raw {paired['flush defaults']:.2f}x; "
            f"{compared}",
        ]
        return Result(
            name,
            "rows/s",
            mine,
            theirs,
            baseline_name,
            rounds,
            target=f">= {TARGET_RATIO}x",
            passed=mine >= TARGET_RATIO * theirs,
            note="; ".join(filter(None, [*notes, *self.warnings])),
            extra={
                "rows": n,
                "batch": claim,
                "chunk": chunk,
                "best_raw_chunk": best,
                "best_raw": best_raw,
                "rates": {what: round(rate) for what, rate in rates.items()},
                "paired_ratios": {what: round(ratio, 3) for what, ratio in paired.items()},
            },
        )


# -- chDB ---------------------------------------------------------------------------


def bench_chdb(redis_url: str, rows: list[bytes], rounds: int, tmp: Path) -> Result:
    from chdb import session as chdb_session

    path = tmp / "clickhouse"
    url = f"chdb://{path}"

    def settings(sizes: tuple[int, int] | None) -> Settings:
        return flush_settings(redis_url, url, "events", sizes)

    def admin(*statements: str) -> list[tuple[Any, ...]]:
        sink = ChdbSink(str(path))
        try:
            out: list[tuple[Any, ...]] = []
            for sql in statements:
                out = sink.query(sql)
            return out
        finally:
            sink.close()

    def recreate() -> None:
        admin("DROP TABLE IF EXISTS events SYNC", create_table("events"))

    def count() -> int:
        return int(admin("SELECT count() FROM events")[0][0])

    def raw_insert(data: list[bytes], size: int) -> None:
        session: Any = chdb_session.Session(str(path))  # type: ignore[no-untyped-call]
        try:
            for chunk in chunks(data, size):
                body = b"\n".join(chunk).decode("utf-8")
                session.query(f"INSERT INTO events FORMAT JSONEachRow\n{body}", "CSV")
        finally:
            session.close()

    def raw_file_insert(data: list[bytes], size: int) -> None:
        session: Any = chdb_session.Session(str(path))  # type: ignore[no-untyped-call]
        file = tmp / "raw-chunk.rows"
        try:
            for chunk in chunks(data, size):
                file.write_bytes(b"\n".join(chunk))
                session.query(f"INSERT INTO events FROM INFILE '{file}' FORMAT JSONEachRow", "CSV")
        finally:
            session.close()
            file.unlink(missing_ok=True)

    bench = Bench(
        "chDB", rows, settings, lambda: ChdbSink(str(path)), recreate, count, raw_insert,
        raw_file_insert,
    )  # fmt: skip
    try:
        return bench.run(
            rounds,
            "flush chDB",
            "best of INSERT FORMAT JSONEachRow in chunks of 1k/10k/100k, the rows in the"
            " statement or (10k/100k) read FROM INFILE, one chdb Session",
            "",
        )
    finally:
        close_all()


# -- native ---------------------------------------------------------------------------


def _epoch_seconds(text: str) -> int:
    return int(dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC).timestamp())


def _epoch_ms(text: str) -> int:
    moment = dt.datetime.fromisoformat(text).replace(tzinfo=dt.UTC)
    return int(moment.timestamp()) * 1000 + moment.microsecond // 1000


def raw_columns(described: list[tuple[Any, ...]]) -> list[tuple[str, Callable[[Any], Any], Any]]:
    """(column, converter, default) for a raw columnar insert of JSON rows."""
    columns = []
    for name, ch_type, default_kind, *_ in described:
        if default_kind in ("MATERIALIZED", "ALIAS"):
            continue
        convert: Callable[[Any], Any] = lambda value: value  # noqa: E731
        default: Any = ""
        if "Nullable" in ch_type:
            default = None
        if ch_type.startswith("Map"):
            default = {}
        elif "DateTime64" in ch_type:
            convert = _epoch_ms
        elif "DateTime" in ch_type:
            convert = _epoch_seconds
        elif "Int" in ch_type:
            default = 0
        columns.append((name, convert, default))
    return columns


def bench_native(redis_url: str, rows: list[bytes], rounds: int, tmp: Path) -> Result:
    from clickhouse_driver import Client
    from clickhouse_driver.util.helpers import parse_url

    from worker.sinks.native import NativeSink

    modern = os.environ.get("CLICKHOUSE_TEST_URL")
    with contextlib.ExitStack() as stack:
        if modern:
            parts = urlsplit(modern)
            url = urlunsplit(parts._replace(path="/eventbuffer_bench"))
            table, legacy = "events", False
            label = f"native ClickHouse at {parts.hostname}:{parts.port}"
        elif server_binary() is not None:
            url = stack.enter_context(local_server())
            table, legacy = COMPAT_TABLE, True
            label = "native ClickHouse 18.16 (compat table)"
        else:
            return skipped(
                "flush native",
                "CLICKHOUSE_TEST_URL is not set and no clickhouse-server is installed",
            )

        def sink_factory() -> Sink:
            return NativeSink(url, table, require_dedup=not legacy)

        admin = NativeSink(url, table, require_dedup=not legacy)
        stack.callback(admin.close)
        version = admin.query("SELECT version()")[0][0]

        def recreate() -> None:
            admin.query(f"DROP TABLE IF EXISTS {table}")
            if legacy:
                admin.query(COMPAT_DDL)
            else:
                admin.migrate()

        def count() -> int:
            return int(admin.query(f"SELECT count() FROM {table}")[0][0])

        recreate()
        columns = raw_columns(admin.query(f"DESCRIBE TABLE {table}"))
        host, options = parse_url(url)
        client = Client(host, **options)
        stack.callback(client.disconnect)
        decoder = msgspec.json.Decoder(list[dict[str, Any]])
        names = ", ".join(name for name, _, _ in columns)
        insert_sql = f"INSERT INTO {table} ({names}) VALUES"

        def raw_insert(data: list[bytes], size: int) -> None:
            for chunk in chunks(data, size):
                decoded = decoder.decode(b"[" + b",".join(chunk) + b"]")
                block = []
                for name, convert, default in columns:
                    values = [row.get(name, default) for row in decoded]
                    block.append([convert(v) if v is not None else v for v in values])
                client.execute(insert_sql, block, columnar=True)

        def settings(sizes: tuple[int, int] | None) -> Settings:
            return flush_settings(redis_url, url, table, sizes)

        bench = Bench(label, rows, settings, sink_factory, recreate, count, raw_insert)
        note = f"server {version}" + (
            "; 18.16 has no Map/DateTime64: compat table without properties, no dedup tokens"
            if legacy
            else ""
        )
        baseline = (
            "best of clickhouse-driver columnar INSERTs in chunks of 1k/10k/100k "
            "(JSON decode timed)"
        )
        return bench.run(rounds, f"flush {label}", baseline, note)


def run(args: argparse.Namespace) -> list[Result]:
    n = args.flush_rows
    dicts, _ = traffic(n, seed=13)
    rows = [encode_event(parse_event(d)) for d in dicts]
    log(f"[flush] {mix(dicts)}; {args.rounds} rounds")
    results = []
    with (
        private_redis("flush") as server,
        tempfile.TemporaryDirectory(prefix="bench-flush-") as tmp,
    ):
        chdb_result = bench_chdb(server.db_url(0), rows, args.rounds, Path(tmp))
        results.append(chdb_result)
        if chdb_result.eventbuffer:
            args.stage_rates["flush"] = chdb_result.eventbuffer  # e2e flushes to chDB
        server.client().flushdb()
        try:
            results.append(bench_native(server.db_url(0), rows, args.rounds, Path(tmp)))
        except Exception as exc:  # the native half must not hide the chDB figures
            log(f"[flush] native benchmark failed: {exc!r}")
            results.append(skipped("flush native", f"failed: {exc!r}"))
    return results
