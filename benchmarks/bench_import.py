"""import: `eventbuffer import` rows/s vs a raw INSERT of the same rows, and its memory.

eventbuffer's path: `eventbuffer import --json` on a generated eventbuffer
export in gzip files (tests/support/exports.py: sessions spread over the
files in no order), timed by the command itself (`seconds` of its summary:
its start-up is not counted): reading and validating every line, the state
on disk, the durations pass, and chunked inserts (50,000 rows, each checked
against the table for ids it holds already) into embedded ClickHouse (chDB),
opened for each step by a child process, as the command does.

Baseline, on the same rows into the same engine, alternating: `INSERT INTO
events FORMAT JSONEachRow` of the rows as the import writes them (validated,
with their durations and `imported_at`), in chunks of the same size through
one chDB session, the rows in the statement or written to a file and read
`FROM INFILE` (as the import's sink sends them): the better of the two is the
baseline. Between rounds the table is dropped and created again and
the import's state removed (untimed).

Server: the same on Debian's ClickHouse 18.16 (private, on free ports;
tests/support/native_server.local_server) into a table of the `events` columns
18.16 has (no Map, no DateTime64: bench_flush's compatibility table). The
import runs as the command does, in a child process, through the flush's
native sink (`require_dedup=False`: 18.16 has no insert_deduplication_token,
so a re-driven chunk rests on the check against the table alone), timed by its
summary. Baseline: the same rows POSTed to the server's HTTP interface as
`INSERT ... FORMAT JSONEachRow` (input_format_skip_unknown_fields=1) in
chunks of the same size over one connection, with their dates cut to the
second (18.16's JSONEachRow cannot parse milliseconds into a DateTime; cut
untimed).

Per-pass seconds (the summary's `passes`) are logged with each result.

Memory: the command itself (`python -m worker.cli import`) on a larger export
in a child process; its peak RSS (getrusage of the child) is reported, with
that of an export a tenth its size, to show it does not grow with the file.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from urllib.parse import urlencode

from benchmarks.bench_flush import COMPAT_DDL, COMPAT_TABLE
from benchmarks.support import (
    Result,
    alternate,
    cpu_seconds,
    log,
    median,
    project_env,
    skipped,
)
from tests.support.exports import generate_export
from tests.support.native_server import local_server, server_binary
from tests.support.servers import free_port
from worker.importer import ImportOptions, run_import
from worker.importer.rows import limits_for, validate
from worker.importer.sources import iter_lines, open_export
from worker.settings import Settings
from worker.sinks import Sink
from worker.sinks.chdb import ChdbSink, close_all
from worker.sinks.native import NativeSink
from worker.sinks.schema import create_table

CHUNK = 50_000
_RSS_WRAPPER = (
    "import resource, subprocess, sys; "
    "subprocess.run(sys.argv[1:], check=True, stdout=subprocess.DEVNULL); "
    "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr)"
)
TARGET_RATIO = 0.8


def run(args: argparse.Namespace) -> list[Result]:
    events = 50_000 if args.quick else 200_000
    rss_events = 1_000_000
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-import-") as name:
        tmp = Path(name)
        export = generate_export(tmp / "export", events, files=4)
        log(f"[import] {export.events:,} events in {len(export.files)} gzip files; chunk {CHUNK}")
        reading = _reading_cpu(export.files, Settings())
        log(f"[import] reading and validation alone: {reading * 1e6:.2f} µs of CPU per row")
        results += bench_chdb(export.files, export.events, args.rounds, tmp, reading)
        results += bench_server(export.files, export.events, args.rounds, tmp, reading)
        results.append(bench_memory(tmp, rss_events))
    return results


def _rows_as_imported(files: list[Path], settings: Settings) -> list[bytes]:
    """The rows the import writes (durations aside, which do not change their size)."""
    limits = limits_for(settings)
    rows = []
    for path in files:
        stream, _ = open_export(str(path))
        with contextlib.closing(stream):
            for line in iter_lines(stream):
                rows.append(validate(line, limits, None, "2026-01-01 00:00:00.000").row)
    return rows


def _reading_cpu(files: list[Path], settings: Settings) -> float:
    """CPU seconds per row of what an import must do for each record whatever else it does:
    read its line from the gzip file and validate it as the ingest task does (`validate`,
    as the import's first pass calls it); one thread, best of three."""
    limits = limits_for(settings)
    best = float("inf")
    rows = 0
    for _ in range(3):
        started = time.thread_time()
        rows = 0
        for path in files:
            stream, _ = open_export(str(path))
            with contextlib.closing(stream):
                for line in iter_lines(stream):
                    validate(line, limits, None, "2026-01-01 00:00:00.000")
                    rows += 1
        best = min(best, time.thread_time() - started)
    return best / rows


def _process_cpu() -> float:
    """CPU seconds this process has used, every thread (an embedded chDB's included)."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _server_pid(url: str) -> int | None:
    """The pid of the local clickhouse-server listening on `url`'s TCP port."""
    port = url.rsplit(":", 1)[1].split("/", 1)[0]
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                command = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if b"clickhouse" in command and f"--tcp_port={port}".encode() in command:
                return int(entry.name)
    return None


def _ceiling(
    engine: str,
    rates: dict[str, list[float]],
    raw_cpu: dict[str, list[float]],
    reading: float,
    events: int,
    rounds: int,
) -> Result:
    """What any import that validates every record as the ingest task does could reach on
    this machine's cores, against the best raw insert: the reading and validation alone
    spread over every core, and with the CPU the raw insert itself took (an import hands
    the engine the same rows) added. A model from CPU measured in this run, not a run."""
    cores = len(os.sched_getaffinity(0))
    best = max((name for name in rates if name.startswith("raw")), key=lambda n: median(rates[n]))
    raw_rate = median(rates[best])
    insert = median(raw_cpu[best]) / events
    alone = min(raw_rate, cores / reading)
    with_insert = min(raw_rate, cores / (reading + insert))
    note = (
        f"{cores} cores; CPU per row: reading and validation {reading * 1e6:.2f} µs, "
        f"the raw insert ({best}) {insert * 1e6:.2f} µs; validation alone on every core: "
        f"{alone:,.0f} rows/s = {alone / raw_rate:.2f}x"
    )
    shown = f"{with_insert:,.0f} rows/s = {with_insert / raw_rate:.2f}x"
    log(f"[import] {engine} ceiling: {shown}; {note}")
    return Result(
        f"import ceiling on {engine}: reading, validation and the raw insert's CPU over every "
        "core, vs the best raw insert",
        "rows/s",
        with_insert,
        raw_rate,
        f"the best raw insert ({best})",
        rounds,
        note=note,
        extra={
            "cores": cores,
            "reading_cpu_us_per_row": reading * 1e6,
            "raw_insert_cpu_us_per_row": insert * 1e6,
            "validation_alone_rows_per_s": alone,
        },
    )


def bench_chdb(
    files: list[Path], events: int, rounds: int, tmp: Path, reading: float
) -> list[Result]:
    data = tmp / "clickhouse"
    settings = Settings.from_env({"CLICKHOUSE_URL": f"chdb://{data}"})
    rows = _rows_as_imported(files, settings)
    assert len(rows) == events
    state_root = tmp / "imports"

    def fresh() -> None:
        close_all()
        sink = ChdbSink(str(data))
        # SYNC: the table's data and metadata go now. A plain DROP leaves them for eight
        # minutes (an Atomic database's delay), and every chDB session opened on the
        # directory loads them again: after a few rounds that slowed the import's opening
        # per chunk several-fold, which no directory in use sees (the raw insert opens
        # once per round).
        sink.query("DROP TABLE IF EXISTS events SYNC")
        sink.query(create_table("events"))
        sink.close()
        shutil.rmtree(state_root, ignore_errors=True)

    def count() -> int:
        sink = ChdbSink(str(data))
        try:
            return int(sink.query("SELECT count() FROM events")[0][0])
        finally:
            sink.close()

    passes: list[dict[str, float]] = []
    raw_cpu: dict[str, list[float]] = {}
    env = project_env(
        CLICKHOUSE_URL=f"chdb://{data}",
        REDIS_URL="redis://127.0.0.1:1/0",
        EVENT_BUFFER_IMPORT_DIR=str(state_root),
        EVENT_BUFFER_IMPORT_CHUNK_ROWS=str(CHUNK),
    )

    def eventbuffer() -> float:
        fresh()
        command = [sys.executable, "-m", "worker.cli", "import", "--json", *map(str, files)]
        return _timed_import(command, env, tmp, events, count, passes)

    def raw() -> float:
        fresh()
        from chdb import session as chdb_session

        started, cpu = time.perf_counter(), _process_cpu()
        session = chdb_session.Session(str(data))
        try:
            for start in range(0, len(rows), CHUNK):
                body = b"\n".join(rows[start : start + CHUNK]).decode()
                session.query(f"INSERT INTO events FORMAT JSONEachRow\n{body}")
        finally:
            session.close()
        seconds = time.perf_counter() - started
        raw_cpu.setdefault("raw", []).append(_process_cpu() - cpu)
        assert count() == events
        return events / seconds

    def raw_file() -> float:
        # The same chunks read by chDB from a file (FROM INFILE), as the import's sink
        # sends them: its binding does not scan them as part of the statement.
        fresh()
        from chdb import session as chdb_session

        chunk_file = tmp / "raw-chunk.rows"
        started, cpu = time.perf_counter(), _process_cpu()
        session = chdb_session.Session(str(data))
        try:
            for start in range(0, len(rows), CHUNK):
                chunk_file.write_bytes(b"\n".join(rows[start : start + CHUNK]))
                session.query(f"INSERT INTO events FROM INFILE '{chunk_file}' FORMAT JSONEachRow")
        finally:
            session.close()
        seconds = time.perf_counter() - started
        raw_cpu.setdefault("raw file", []).append(_process_cpu() - cpu)
        chunk_file.unlink(missing_ok=True)
        assert count() == events
        return events / seconds

    rates = alternate(rounds, {"eventbuffer": eventbuffer, "raw": raw, "raw file": raw_file})
    return [
        _import_result(
            "chDB",
            "import into chDB (eventbuffer export, gzip) vs raw INSERT ... FORMAT JSONEachRow",
            "the best raw JSONEachRow insert (rows in the statement, or read FROM INFILE)",
            rates,
            passes,
            events,
            rounds,
        ),
        _ceiling("chDB", rates, raw_cpu, reading, events, rounds),
    ]


def _median_passes(runs: list[dict[str, float]]) -> dict[str, float]:
    names = [name for name in runs[0]] if runs else []
    return {name: round(median([run.get(name, 0.0) for run in runs]), 3) for name in names}


_MS = re.compile(rb'("(?:created_at|imported_at)":"[0-9-]{10} [0-9:]{8})\.[0-9]{3}"')


def server_import_main() -> None:
    """`python -c '...server_import_main()' URL TABLE STATE_ROOT FILE...`: the import into a
    ClickHouse server through the native sink without dedup tokens (18.16), as the
    command runs it (a sink opened per step); prints the summary as JSON."""
    url, table, state_root, *files = sys.argv[1:]
    settings = Settings.from_env(
        {"CLICKHOUSE_URL": url, "EVENT_BUFFER_TABLE": table, "REDIS_URL": "redis://127.0.0.1:1/0"}
    )

    @contextlib.contextmanager
    def connect() -> Iterator[Sink]:
        sink = NativeSink(url, table, require_dedup=False)
        try:
            yield sink
        finally:
            sink.close()

    options = ImportOptions(files=files, chunk_rows=CHUNK, state_root=Path(state_root))
    print(json.dumps(run_import(options, settings, connect).as_json()))


def bench_server(
    files: list[Path], events: int, rounds: int, tmp: Path, reading: float
) -> list[Result]:
    name = "import into ClickHouse 18.16 (native sink) vs raw HTTP INSERT ... FORMAT JSONEachRow"
    if server_binary() is None:
        return [skipped(name, "clickhouse-server (Debian package) is not installed")]
    settings = Settings.from_env({"CLICKHOUSE_URL": "chdb:///unused"})
    rows = [_MS.sub(rb'\1"', row) for row in _rows_as_imported(files, settings)]
    state_root = tmp / "imports-server"
    http_port = free_port()
    passes: list[dict[str, float]] = []
    raw_cpu: dict[str, list[float]] = {}
    with local_server(http_port=http_port) as url:
        admin = NativeSink(url, require_dedup=False)
        server_pid = _server_pid(url)

        def fresh() -> None:
            admin.query(f"DROP TABLE IF EXISTS {COMPAT_TABLE}")
            admin.query(COMPAT_DDL)
            shutil.rmtree(state_root, ignore_errors=True)

        def count() -> int:
            return int(admin.query(f"SELECT count() FROM {COMPAT_TABLE}")[0][0])

        def eventbuffer() -> float:
            fresh()
            command = [
                sys.executable,
                "-c",
                "from benchmarks.bench_import import server_import_main; server_import_main()",
                url,
                COMPAT_TABLE,
                str(state_root),
                *map(str, files),
            ]
            return _timed_import(command, project_env(), tmp, events, count, passes)

        def raw() -> float:
            fresh()
            query = urlencode(
                {
                    "query": f"INSERT INTO {COMPAT_TABLE} FORMAT JSONEachRow",
                    "input_format_skip_unknown_fields": 1,
                }
            )
            started, client = time.perf_counter(), time.thread_time()
            server = cpu_seconds(server_pid) if server_pid else 0.0
            connection = http.client.HTTPConnection("127.0.0.1", http_port, timeout=300)
            try:
                for start in range(0, len(rows), CHUNK):
                    connection.request(
                        "POST", f"/?{query}", body=b"\n".join(rows[start : start + CHUNK])
                    )
                    answer = connection.getresponse()
                    body = answer.read()
                    if answer.status != 200:
                        raise RuntimeError(f"raw insert: {answer.status} {body[:500]!r}")
            finally:
                connection.close()
            seconds = time.perf_counter() - started
            used = time.thread_time() - client
            if server_pid:  # the server's CPU, every thread (0 when it is not found)
                used += cpu_seconds(server_pid) - server
            raw_cpu.setdefault("raw", []).append(used)
            assert count() == events
            return events / seconds

        try:
            rates = alternate(rounds, {"eventbuffer": eventbuffer, "raw": raw})
        finally:
            admin.close()
    return [
        _import_result(
            "server 18.16",
            name,
            "raw JSONEachRow insert (HTTP)",
            rates,
            passes,
            events,
            rounds,
        ),
        _ceiling("server 18.16", rates, raw_cpu, reading, events, rounds),
    ]


def _peak_rss_mb(tmp: Path, events: int) -> tuple[float, float]:
    """(peak RSS in MB, seconds) of `eventbuffer import` on a fresh export of `events`."""
    work = tmp / f"rss-{events}"
    export = generate_export(work / "export", events, files=8, seed=3)
    data = work / "clickhouse"
    sink = ChdbSink(str(data))
    sink.migrate()
    sink.close()
    close_all()
    env = project_env(CLICKHOUSE_URL=f"chdb://{data}", REDIS_URL="redis://127.0.0.1:1/0")
    command = [sys.executable, "-m", "worker.cli", "import", "--json", *map(str, export.files)]
    started = time.perf_counter()
    # A small wrapper process runs the command and reports its children's peak RSS: a
    # child forked from this (large) process would count this one's pages as its own.
    done = subprocess.run(
        [sys.executable, "-c", _RSS_WRAPPER, *command],
        cwd=work,
        env=env,
        capture_output=True,
        text=True,
    )
    if done.returncode:
        raise RuntimeError(f"eventbuffer import failed: {done.stderr[-2000:]}")
    seconds = time.perf_counter() - started
    peak_kb = int(done.stderr.strip().splitlines()[-1])
    shutil.rmtree(work, ignore_errors=True)
    return peak_kb / 1024, seconds


def bench_memory(tmp: Path, events: int) -> Result:
    small_mb, _ = _peak_rss_mb(tmp, events // 10)
    peak_mb, seconds = _peak_rss_mb(tmp, events)
    log(
        f"[import] peak RSS: {peak_mb:,.0f} MB for {events:,} events ({seconds:.0f} s), "
        f"{small_mb:,.0f} MB for {events // 10:,}"
    )
    return Result(
        f"import: peak RSS of `eventbuffer import` for {events:,} events (vs {events // 10:,})",
        "MB",
        peak_mb,
        small_mb,
        f"{events // 10:,} events",
        1,
        better="lower",
        note="bounded: the export is sorted on disk by SQLite, not in memory",
        extra={"seconds": seconds},
    )


def _timed_import(
    command: list[str],
    env: dict[str, str],
    cwd: Path,
    events: int,
    count: Callable[[], int],
    passes: list[dict[str, float]],
) -> float:
    """Run one import command; its rows/s by the command's own timing (start-up not
    counted), once every event is found in the table."""
    done = subprocess.run(command, env=env, cwd=cwd, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(f"the import failed: {done.stderr[-2000:]}")
    summary = json.loads(done.stdout.strip().splitlines()[-1])
    assert summary["imported"] == events and count() == events, summary
    passes.append(summary["passes"])
    return events / float(summary["seconds"])


def _import_result(
    engine: str,
    name: str,
    baseline: str,
    rates: dict[str, list[float]],
    passes: list[dict[str, float]],
    events: int,
    rounds: int,
) -> Result:
    """The import's rate against the best raw insert's, logged with the passes' median seconds."""
    ours = median(rates["eventbuffer"])
    raws = {name: median(values) for name, values in rates.items() if name.startswith("raw")}
    base = max(raws.values())
    shown = ", ".join(f"{name} {rate:,.0f}" for name, rate in raws.items())
    log(f"[import] {engine}: import {ours:,.0f} rows/s, raw JSONEachRow: {shown} rows/s")
    log(f"[import] {engine} passes (s): {_median_passes(passes)}")
    return Result(
        name,
        "rows/s",
        ours,
        base,
        baseline,
        rounds,
        target=f">= {TARGET_RATIO}x",
        passed=ours >= TARGET_RATIO * base,
        extra={
            "events": events,
            "chunk_rows": CHUNK,
            "rates": rates,
            "passes": _median_passes(passes),
        },
    )
