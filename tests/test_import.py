"""`eventbuffer import`, eventbuffer's own format: exactly once, resumable, live durations.

Every test runs the real command (`python -m worker.cli import`) against
embedded ClickHouse in a temporary directory, with REDIS_URL pointing at a
closed port: an import never needs Redis (history touches no live state).
"""

from __future__ import annotations

import gzip
import json
import random
import signal
import sqlite3
import subprocess
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from tests.support.exports import Export, generate_export
from tests.support.importing import (
    import_command,
    import_env,
    landed,
    migrate,
    query,
    run_import_cli,
    summary_of,
)
from tests.support.polling import wait_until

# A test export: 100k events is the size; the SIGKILL test uses it.
EVENTS = 100_000


@pytest.fixture
def chdb(tmp_path: Path) -> str:
    url = f"chdb://{tmp_path / 'clickhouse'}"
    migrate(url)
    return url


def check_exactly_once(chdb_url: str, export: Export) -> None:
    """Every event once, with the live path's duration and imported_at set."""
    rows = landed(chdb_url)
    assert len(rows) == export.events, "events missing"
    copies = {n: c for n, (c, _, _) in rows.items() if c != 1}
    assert not copies, f"events not landed exactly once: {list(copies.items())[:5]}"
    wrong = {n: (d, export.expected[n]) for n, (_, d, _) in rows.items() if d != export.expected[n]}
    assert not wrong, f"durations differ from the live path's rule: {list(wrong.items())[:5]}"
    assert all(i == 1 for _, _, i in rows.values()), "a row without imported_at"


def test_an_export_lands_once_with_the_live_paths_durations(tmp_path: Path, chdb: str) -> None:
    export = generate_export(tmp_path / "export", 20_000, files=3)
    result = run_import_cli(tmp_path, import_env(chdb), "--json", *export.files)
    summary = summary_of(result)
    assert summary["imported"] == export.events
    assert summary["duplicates"] == 0
    assert summary["rejected"] == 0
    assert sorted(summary["files"]) == sorted(str(p) for p in export.files)
    assert sum(f["imported"] for f in summary["files"].values()) == export.events
    check_exactly_once(chdb, export)
    # The import's state is gone (its rows): what stays is the summary and the rejects.
    state = Path(summary["state"])
    assert not (state / "state.sqlite").exists()
    assert json.loads((state / "summary.json").read_text())["imported"] == export.events


def test_importing_the_same_files_again_lands_nothing(tmp_path: Path, chdb: str) -> None:
    export = generate_export(tmp_path / "export", 5_000, files=2)
    env = import_env(chdb)
    first = summary_of(run_import_cli(tmp_path, env, "--json", *export.files))
    assert first["imported"] == export.events
    # Another chunk size: other chunks, other dedup tokens. What keeps the rows out is
    # the check against the table, not ClickHouse's dedup window.
    again = summary_of(
        run_import_cli(
            tmp_path, {**env, "EVENT_BUFFER_IMPORT_CHUNK_ROWS": "777"}, "--json", *export.files
        )
    )
    assert again["imported"] == 0
    assert again["duplicates"] == export.events
    check_exactly_once(chdb, export)


def test_copies_of_an_event_in_several_files_land_once_whatever_the_chunks(
    tmp_path: Path, chdb: str
) -> None:
    """Overlapping exports: every event in three files (each shuffled its own way). Each
    lands once with its duration (the copies do not count as views), the copies count as
    duplicates, and chunks of 7 rows never split an event's copies (rows in `created_at`
    order: a chunk's last event's copies follow it into the same chunk)."""
    export = generate_export(tmp_path / "export", 600, files=1)
    rng = random.Random(5)
    lines = []
    for line in gzip.decompress(export.files[0].read_bytes()).decode().splitlines():
        event = json.loads(line)
        event.setdefault("id", str(uuid.UUID(int=rng.getrandbits(128), version=4)))
        lines.append(json.dumps(event))
    copies = []
    for number in range(3):
        rng.shuffle(lines)
        path = tmp_path / f"copy-{number}.ndjson"
        path.write_text("\n".join(lines) + "\n")
        copies.append(path)
    env = import_env(chdb, EVENT_BUFFER_IMPORT_CHUNK_ROWS="7")
    summary = summary_of(run_import_cli(tmp_path, env, "--json", *copies))
    assert (summary["imported"], summary["duplicates"]) == (export.events, 2 * export.events)
    check_exactly_once(chdb, export)


def test_bad_lines_are_rejected_with_file_line_and_reason(tmp_path: Path, chdb: str) -> None:
    good = {"project_id": "shop", "name": "click", "created_at": int(time.time() * 1000) - 1000}
    lines = [
        json.dumps({**good, "properties": {"n": "0"}}),
        "{not json",
        json.dumps({"name": "click", "created_at": good["created_at"]}),  # no project_id
        json.dumps({**good, "created_at": "yesterday"}),
        "",
        json.dumps({**good, "properties": {"n": "1"}}),
        json.dumps([1, 2]),
    ]
    plain = tmp_path / "mixed.ndjson"
    plain.write_text("\n".join(lines) + "\n")
    packed = tmp_path / "other.ndjson.gz"
    with gzip.open(packed, "wt") as out:
        out.write(json.dumps({**good, "properties": {"n": "2"}}) + "\n" + '{"name": 1}\n')
    summary = summary_of(run_import_cli(tmp_path, import_env(chdb), "--json", plain, packed))
    assert summary["imported"] == 3
    assert summary["rejected"] == 5
    assert summary["files"][str(plain)]["rejected"] == 4
    assert summary["files"][str(packed)]["rejected"] == 1
    rejects = [json.loads(line) for line in Path(summary["rejects_file"]).read_text().splitlines()]
    where = [(Path(r["file"]).name, r["line"], r["field"]) for r in rejects]
    assert where == [
        ("mixed.ndjson", 2, "$"),
        ("mixed.ndjson", 3, "project_id"),
        ("mixed.ndjson", 4, "created_at"),
        ("mixed.ndjson", 7, "$"),
        ("other.ndjson.gz", 2, "name"),
    ]
    assert all(r["reason"] for r in rejects)
    assert rejects[0]["raw"] == "{not json"
    assert sorted(n for (n,) in query(chdb, "SELECT properties['n'] FROM events")) == [
        "0",
        "1",
        "2",
    ]


def test_events_past_the_retention_are_rejected_as_past_retention(
    tmp_path: Path, chdb: str
) -> None:
    now = int(time.time() * 1000)
    day = 86_400_000
    lines = [
        json.dumps({"project_id": "shop", "name": "click", "created_at": now - 3 * day}),
        json.dumps({"project_id": "shop", "name": "click", "created_at": now - 40 * day}),
    ]
    export = tmp_path / "old.ndjson"
    export.write_text("\n".join(lines) + "\n")
    env = {**import_env(chdb), "EVENT_BUFFER_RETENTION_DAYS": "30"}
    summary = summary_of(run_import_cli(tmp_path, env, "--json", export))
    assert (summary["imported"], summary["rejected"]) == (1, 1)
    [reject] = [json.loads(line) for line in Path(summary["rejects_file"]).read_text().splitlines()]
    assert (reject["line"], reject["field"]) == (2, "created_at")
    assert reject["reason"].startswith("past_retention:")


def test_a_truncated_gzip_file_is_read_to_where_it_breaks(tmp_path: Path, chdb: str) -> None:
    export = generate_export(tmp_path / "export", 3_000, files=1)
    data = export.files[0].read_bytes()
    cut = tmp_path / "cut.ndjson.gz"
    cut.write_bytes(data[: len(data) // 2])
    summary = summary_of(run_import_cli(tmp_path, import_env(chdb), "--json", cut))
    assert 0 < summary["imported"] < export.events
    assert summary["rejected"] == 1
    [reject] = Path(summary["rejects_file"]).read_text().splitlines()
    assert "cannot be read past here" in json.loads(reject)["reason"]


def test_sigkilled_at_random_moments_and_rerun_lands_every_event_once(
    tmp_path: Path, chdb: str
) -> None:
    """The issue's test: 100k events in several gzip files, the import SIGKILLed several
    times (while reading, after a chunk was inserted, and at random moments), then run
    to the end: every event once, live durations, imported_at; then a second import of
    the same files lands nothing."""
    export = generate_export(tmp_path / "export", EVENTS, files=5)
    env = import_env(chdb, EVENT_BUFFER_IMPORT_CHUNK_ROWS="7000")
    rng = random.Random(20)
    # When each run is killed: once it has read some lines, once it has sorted them,
    # once it has inserted a chunk (each a little after: these three kills always land,
    # however fast the import has become), then at random moments (a run may finish
    # before its moment: then the import is done); None: let it finish.
    moments: list[Callable[[], bool] | float | None] = [
        lambda: _read_lines(tmp_path) > 0,
        lambda: "sorted" in _meta(tmp_path),
        lambda: _meta(tmp_path).get("inserted") is not None,
        *(rng.uniform(0.2, 1.2) for _ in range(8)),
        None,
    ]
    kills = 0
    phases: list[str] = []
    for moment in moments:
        process = subprocess.Popen(
            import_command("--json", *export.files),
            cwd=tmp_path,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
        )
        try:
            if moment is None:
                out, err = process.communicate(timeout=300)
            else:
                if callable(moment):
                    wait_until(
                        moment,
                        120,
                        "the import's progress",
                        alive=lambda p=process: p.poll() is None,  # type: ignore[misc]
                    )
                    time.sleep(rng.uniform(0, 0.1))
                else:
                    time.sleep(moment)
                if process.poll() is None:
                    process.send_signal(signal.SIGKILL)
                    process.wait()
                    kills += 1
                    phases.append(_phase(tmp_path))
                    continue
                out, err = process.communicate()
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()
        assert process.returncode == 0, err.decode()[-3000:]
        summary = json.loads(out.decode().strip().splitlines()[-1])
        break
    else:
        pytest.fail("the import never finished")
    print(f"killed {kills} times, in phases {phases}")
    assert kills >= 3
    assert {"reading", "inserting"} <= set(phases)
    # The counts are kept with each chunk: as an uninterrupted run's. Unless a kill
    # fell after the state was removed at the very end (no state when it was killed,
    # after a run that had one): the runs after it began anew, and found every event
    # in ClickHouse, whether the last of them resumed or not.
    began = next((n for n, phase in enumerate(phases) if phase != "start"), len(phases))
    if "start" in phases[began:]:
        assert (summary["imported"], summary["duplicates"]) == (0, export.events)
    else:
        assert summary["resumed"]
        assert (summary["imported"], summary["duplicates"]) == (export.events, 0)
    check_exactly_once(chdb, export)
    again = summary_of(run_import_cli(tmp_path, env, "--json", *export.files))
    assert (again["imported"], again["duplicates"]) == (0, export.events)
    check_exactly_once(chdb, export)


def _state_query(cwd: Path, sql: str) -> list[tuple[Any, ...]]:
    states = list((cwd / "data" / "imports").glob("*/state.sqlite"))
    if not states:
        return []
    try:
        db = sqlite3.connect(f"file:{states[0]}?mode=ro", uri=True, timeout=5)
        try:
            return db.execute(sql).fetchall()
        finally:
            db.close()
    except sqlite3.Error:
        return []


def _meta(cwd: Path) -> dict[str, str]:
    return dict(_state_query(cwd, "SELECT key, value FROM meta"))


def _read_lines(cwd: Path) -> int:
    rows = _state_query(cwd, "SELECT coalesce(sum(line), 0) FROM files")
    return int(rows[0][0]) if rows else 0


def _phase(cwd: Path) -> str:
    """Where a killed import was, from its state."""
    meta = _meta(cwd)
    if not meta:
        return "start"
    for key, phase in (("durations", "inserting"), ("sorted", "durations")):
        if key in meta:
            return phase
    return "reading"


def _killed_while_reading(tmp_path: Path, export: Export, env: dict[str, str]) -> list[Path]:
    """Run the import and SIGKILL it once it has committed some lines; its data files."""
    process = subprocess.Popen(
        import_command("--json", *export.files),
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_until(
            lambda: _read_lines(tmp_path) > 0,
            120,
            "the import's progress",
            alive=lambda: process.poll() is None,
        )
        process.send_signal(signal.SIGKILL)
        process.wait()
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    data_files = sorted((tmp_path / "data" / "imports").glob("*/rows-*.data"))
    assert data_files, "no data file next to the state"
    return data_files


def test_bytes_a_killed_import_wrote_after_its_last_commit_are_cut_on_resume(
    tmp_path: Path, chdb: str
) -> None:
    """The rows' bytes go to a data file per export file before the batch that records
    them commits: a kill can leave bytes past the committed length. The re-run cuts
    each data file back to it, so the rows it appends land where the state says (and
    every event lands once, as exported)."""
    export = generate_export(tmp_path / "export", 60_000, files=3)
    env = import_env(chdb)
    # What a reader process killed between writing a batch and its commit leaves.
    for path in _killed_while_reading(tmp_path, export, env):
        with path.open("ab") as out:
            out.write(b'{"id":"not committed"}' * 1000)
    summary = summary_of(run_import_cli(tmp_path, env, "--json", *export.files))
    assert summary["resumed"]
    assert (summary["imported"], summary["duplicates"]) == (export.events, 0)
    assert summary["rejected"] == 0
    check_exactly_once(chdb, export)
    assert not list((tmp_path / "data" / "imports").glob("*/rows-*.data"))


def test_a_data_file_shorter_than_its_state_says_stops_the_import(
    tmp_path: Path, chdb: str
) -> None:
    """Bytes the state has committed and its data file lacks (a power loss, say): the
    state is damaged, the import stops (exit 1) and says so; nothing is inserted."""
    export = generate_export(tmp_path / "export", 60_000, files=3)
    env = import_env(chdb)
    data_files = _killed_while_reading(tmp_path, export, env)
    committed = dict(_state_query(tmp_path, "SELECT idx, data FROM files"))
    idx = max(committed, key=lambda k: committed[k])
    assert committed[idx] > 0
    [path] = [p for p in data_files if p.name == f"rows-{idx}.data"]
    with path.open("r+b") as out:
        out.truncate(committed[idx] - 1)
    result = run_import_cli(tmp_path, env, "--json", *export.files)
    assert result.returncode == 1, result.stderr
    assert "damaged" in result.stderr
    assert query(chdb, "SELECT count() FROM events") == [(0,)]


def test_a_data_file_zeroed_where_its_state_has_rows_stops_the_import(
    tmp_path: Path, chdb: str
) -> None:
    """A data file of the right length whose committed bytes are zeros (what a power loss
    can leave of pages never written back): the import stops as a damaged state (exit 1)
    when it reads them, instead of sending ClickHouse zeros to refuse as rejects."""
    export = generate_export(tmp_path / "export", 60_000, files=3)
    env = import_env(chdb)
    data_files = _killed_while_reading(tmp_path, export, env)
    committed = dict(_state_query(tmp_path, "SELECT idx, data FROM files"))
    idx = max(committed, key=lambda k: committed[k])
    assert committed[idx] > 0
    [path] = [p for p in data_files if p.name == f"rows-{idx}.data"]
    with path.open("r+b") as out:
        out.truncate(committed[idx])
        out.seek(0)
        out.write(bytes(committed[idx]))
    result = run_import_cli(tmp_path, env, "--json", *export.files)
    assert result.returncode == 1, result.stderr
    assert "damaged" in result.stderr
    assert query(chdb, "SELECT count() FROM events") == [(0,)]


@pytest.mark.parametrize("fetch_all_max", [0, 10**6])
def test_the_check_for_ids_already_there_reads_them_either_way(
    tmp_path: Path, chdb: str, monkeypatch: pytest.MonkeyPatch, fetch_all_max: int
) -> None:
    """The check before each chunk: a busy time range asks about the ids in batches, a
    quiet one reads the range's ids whole; both find exactly the ids there."""
    from worker.importer import writer
    from worker.sinks.chdb import ChdbSink, close_all, path_from_url

    monkeypatch.setattr(writer, "FETCH_ALL_MAX", fetch_all_max)
    monkeypatch.setattr(writer, "IDS_PER_QUERY", 7)
    export = generate_export(tmp_path / "export", 300, files=1)
    summary_of(run_import_cli(tmp_path, import_env(chdb), "--json", *export.files))
    there = [str(i) for (i,) in query(chdb, "SELECT toString(id) FROM events LIMIT 40")]
    absent = [f"00000000-0000-4000-8000-{n:012d}" for n in range(30)]
    sink = ChdbSink(path_from_url(chdb))
    try:
        found = writer.existing_ids(
            sink,
            there + absent,
            ["shop", "blog"],
            "2000-01-01 00:00:00",
            "2100-01-01 00:00:00",
        )
        assert found == set(there)
        assert (
            writer.existing_ids(
                sink, there, ["nobody"], "2000-01-01 00:00:00", "2100-01-01 00:00:00"
            )
            == set()
        )
    finally:
        sink.close()
        close_all()


def test_one_run_per_import_at_a_time(tmp_path: Path, chdb: str) -> None:
    export = generate_export(tmp_path / "export", 20_000, files=2)
    env = import_env(chdb, EVENT_BUFFER_IMPORT_CHUNK_ROWS="2000")
    first = subprocess.Popen(
        import_command("--json", *export.files),
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        wait_until(lambda: _read_lines(tmp_path) > 0, 60, "the first import's progress")
        second = run_import_cli(tmp_path, env, "--json", *export.files)
        assert second.returncode == 1
        assert "running already" in second.stderr
        out, err = first.communicate(timeout=300)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert first.returncode == 0, err.decode()[-2000:]
    assert json.loads(out.decode().strip().splitlines()[-1])["imported"] == export.events


def test_a_state_an_earlier_release_left_is_set_aside_not_resumed(
    tmp_path: Path, chdb: str
) -> None:
    export = generate_export(tmp_path / "export", 3_000, files=2)
    env = import_env(chdb)
    first = summary_of(run_import_cli(tmp_path, env, "--json", *export.files))
    assert first["imported"] == export.events
    # The same arguments' state, as a release without a layout mark would have left it
    # mid-import: other columns, no files recorded yet.
    old = Path(first["state"]) / "state.sqlite"
    db = sqlite3.connect(old)
    db.executescript(
        "CREATE TABLE meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);"
        "INSERT INTO meta VALUES ('created', '1');"
        "CREATE TABLE rows (grp TEXT, ms INTEGER, row BLOB);"
    )
    db.close()
    again = summary_of(run_import_cli(tmp_path, env, "--json", *export.files))
    # Resumed, it would have found no files to read and counted nothing.
    assert again["resumed"] is False
    assert again["state_set_aside"].endswith("state.sqlite.layout-1")
    assert Path(again["state_set_aside"]).exists()
    assert again["imported"] == 0
    assert again["duplicates"] == export.events
    check_exactly_once(chdb, export)
