"""A row ClickHouse refuses after the importer's validation: isolated, recorded, the rest in.

The test's own table refuses one row as a real engine does: embedded ClickHouse
(chDB) with a MATERIALIZED column that parses a number out of `path`, so a row
whose path holds none passes the event model's validation and fails the INSERT
(CANNOT_PARSE_TEXT) with every row of its chunk. The import halves the chunk
until that row is alone, records it as a reject (its file, line and ClickHouse's
message), inserts the rest and goes on; a second import lands nothing again and
refuses the same row again.
"""

from __future__ import annotations

import gzip
import json
from pathlib import Path

from tests.support.dates import BASE_MS
from tests.support.importing import import_env, migrate, query, run_import_cli, summary_of

EVENTS = 300
BAD_LINE = 137  # 1-based line of the row ClickHouse refuses


def write_export(path: Path) -> None:
    lines = []
    for n in range(EVENTS):
        page = "not-a-number" if n + 1 == BAD_LINE else str(n)
        event = {
            "project_id": "shop",
            "name": "click",
            "session_id": f"s-{n // 10}",
            "path": f"/page/{page}",
            "created_at": BASE_MS - 3_600_000 + n * 1000,
            "properties": {"n": str(n)},
        }
        lines.append(json.dumps(event))
    with gzip.open(path, "wt") as out:
        out.write("\n".join(lines) + "\n")


def test_a_row_clickhouse_refuses_is_isolated_and_recorded(tmp_path: Path) -> None:
    chdb = f"chdb://{tmp_path / 'clickhouse'}"
    migrate(chdb)
    query(
        chdb,
        "ALTER TABLE events ADD COLUMN page_number UInt32 "
        "MATERIALIZED toUInt32(substring(path, 7))",
    )
    export = tmp_path / "export.ndjson.gz"
    write_export(export)
    # Chunks of 100 rows: the refused row's chunk is halved down to it.
    env = import_env(chdb, EVENT_BUFFER_IMPORT_CHUNK_ROWS="100")
    summary = summary_of(run_import_cli(tmp_path, env, "--json", export))
    assert (summary["imported"], summary["duplicates"], summary["rejected"]) == (EVENTS - 1, 0, 1)
    [(rows, distinct, with_imported_at)] = query(
        chdb,
        "SELECT count(), uniqExact(properties['n']), countIf(imported_at IS NOT NULL) FROM events",
    )
    assert rows == distinct == with_imported_at == EVENTS - 1
    assert query(chdb, f"SELECT count() FROM events WHERE properties['n'] = '{BAD_LINE - 1}'") == [
        (0,)
    ]
    [reject] = [json.loads(line) for line in Path(summary["rejects_file"]).read_text().splitlines()]
    assert reject["file"] == str(export) and reject["line"] == BAD_LINE
    assert reject["reason"].startswith("refused by ClickHouse")
    assert "not-a-number" in reject["reason"] + reject["raw"]
    assert "Code: 6" in reject["reason"], reject["reason"]  # CANNOT_PARSE_TEXT, as ClickHouse says

    again = summary_of(run_import_cli(tmp_path, env, "--json", export))
    assert (again["imported"], again["duplicates"], again["rejected"]) == (0, EVENTS - 1, 1)
    assert query(chdb, "SELECT count() FROM events") == [(EVENTS - 1,)]
