"""`eventbuffer dlq list|show|replay|purge` against real Redis and embedded ClickHouse (chDB).

Commands run in-process through `main(argv)`, as in tests/test_cli_*.py. Dead letters
are made the way production makes them: invalid events through `ingest()`,
rows ClickHouse refuses through a flush, plus a few written by hand where a
test needs one that validates now (a rule that was relaxed since).
"""

from __future__ import annotations

import io
import json
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis as redis_lib
from redis.exceptions import ConnectionError as RedisConnectionError

from tests.conftest import Result
from tests.support.dates import DAY, NOON_MS
from worker.buffer import EventBuffer
from worker.deadletters import (
    REASON_INVALID_EVENT,
    REASON_REJECTED,
    DeadLetter,
    decode_dead_letter,
    encode_dead_letter,
    iter_dead_letters,
    remove_dead_letters,
)
from worker.events import encode_event, parse_event
from worker.ingestion import ingest
from worker.keys import ShardKeys
from worker.settings import Settings
from worker.sinks.chdb import ChdbSink, path_from_url

SHARD = ShardKeys("eventbuffer", 0)
NOW_MS = NOON_MS  # inside the default date limits
ID_COUNTRY = "00000000-0000-4000-8000-00000000000a"
ID_DATE = "00000000-0000-4000-8000-00000000000b"
ID_OTHER = "00000000-0000-4000-8000-00000000000c"


@pytest.fixture
def run_main_env() -> dict[str, str | None]:
    return {"COLUMNS": "250"}  # rich: no wrapping in the captured output


def raw_event(name: str, **fields: Any) -> dict[str, Any]:
    return {"project_id": "p1", "name": name, "created_at": NOW_MS, **fields}


def ingest_invalid(buffer: EventBuffer) -> None:
    """Three invalid events (two fixable ones with ids) and one valid, in one batch."""
    ingest(
        buffer,
        [
            raw_event("signup", id=ID_COUNTRY, country="SWE"),
            raw_event("purchase", id=ID_DATE, created_at="yesterday"),
            raw_event("ok"),
            raw_event("", id=ID_OTHER),
        ],
        "batch-1",
    )


def hand_made(payload: bytes, source: str = "ingest", at: int = NOW_MS) -> bytes:
    """A dead letter whose payload validates now (as after a rule was relaxed)."""
    header = DeadLetter(
        reason=REASON_INVALID_EVENT if source == "ingest" else REASON_REJECTED,
        error="a rule since relaxed",
        source=source,
        at=at,
        shard=0,
        claim="old-batch",
    )
    return encode_dead_letter(header, payload)


def clickhouse_rows(settings: Settings, sql: str) -> list[tuple[Any, ...]]:
    sink = ChdbSink(path_from_url(settings.clickhouse_url))
    try:
        return sink.query(sql)
    finally:
        sink.close()


def dead_payloads(redis: redis_lib.Redis) -> list[bytes]:
    return [decode_dead_letter(entry)[1] for entry in redis.lrange(SHARD.dead, 0, -1)]


def write_fixes(path: Path, *events: dict[str, Any]) -> str:
    path.write_text("".join(json.dumps(e) + "\n" for e in events))
    return str(path)


# -- list and show ------------------------------------------------------------------


def test_list_shows_every_dead_letter_with_its_reason(
    run_main: Callable[..., Result], redis: redis_lib.Redis, settings: Settings
) -> None:
    ingest_invalid(EventBuffer(redis, settings))
    redis.rpush(SHARD.dead, b"\x1b[2Jnot an entry\xff")  # something eventbuffer never wrote

    table = run_main("dlq", "list")
    assert (table.code, table.err) == (0, "")
    lines = table.out.splitlines()
    assert any("country" in line and "invalid_event" in line for line in lines)
    assert any("created_at" in line and "not an ISO-8601" in line for line in lines)
    assert "unreadable" in table.out
    assert "\x1b" not in table.out and "\\x1b[2J" in table.out
    assert "4 dead letters: invalid_event 3, unreadable 1." in table.out

    as_json = run_main("dlq", "list", "--json")
    data = json.loads(as_json.out)
    assert data["total"] == 4
    assert data["by_reason"] == {"invalid_event": 3, "unreadable": 1}
    first = data["entries"][0]
    assert (first["shard"], first["index"], first["reason"], first["field"]) == (
        0,
        0,
        "invalid_event",
        "country",
    )
    assert first["source"] == "ingest" and first["claim"] == "batch-1"
    assert json.loads(first["payload"])["id"] == ID_COUNTRY
    assert [e["field"] for e in data["entries"][:3]] == ["country", "created_at", "name"]

    limited = run_main("dlq", "list", "--reason", "invalid_event", "--limit", "1")
    assert "3 dead letters: invalid_event 3; showing the first 1 (--limit)." in limited.out
    empty = run_main("dlq", "list", "--reason", REASON_REJECTED)
    assert "No dead letters (all shards, reason rejected_by_clickhouse)." in empty.out


def test_list_shows_rows_clickhouse_refused(
    run_main: Callable[..., Result], redis: redis_lib.Redis, settings: Settings, sink: ChdbSink
) -> None:
    row = json.loads(encode_event(parse_event(raw_event("bad"))))
    row["country"] = "SWE"  # FixedString(2) cannot hold it
    redis.rpush(SHARD.queue, json.dumps(row))
    EventBuffer(redis, settings).add(parse_event(raw_event("fine")))
    assert run_main("flush").code == 0
    data = json.loads(run_main("dlq", "list", "--json", "--shard", "0").out)
    [entry] = data["entries"]
    assert (entry["reason"], entry["source"]) == (REASON_REJECTED, "flush")
    assert "FixedString(2)" in entry["error"]


def test_show_prints_the_whole_entry_safely(
    run_main: Callable[..., Result], redis: redis_lib.Redis, settings: Settings
) -> None:
    ingest_invalid(EventBuffer(redis, settings))
    redis.rpush(SHARD.dead, hand_made(b'{"name":"\x1b]0;pwned\x07","note":"\xe2\x80\xaeevil"}'))

    shown = run_main("dlq", "show", "1")
    assert (shown.code, shown.err) == (0, "")
    assert "reason         invalid_event" in shown.out
    assert "field          created_at" in shown.out
    assert "source         ingest" in shown.out
    assert " s ago)" in shown.out  # when it was dead-lettered (just now)
    payload = shown.out.split("payload (", 1)[1]
    assert payload.startswith(f"{len(dead_payloads(redis)[1])} bytes, JSON):")
    assert ID_DATE in payload and "yesterday" in payload

    unsafe = run_main("dlq", "show", "3")
    assert unsafe.code == 0
    assert f"at             {DAY}T12:00:00+00:00" in unsafe.out
    assert "\x1b" not in unsafe.out and "\x07" not in unsafe.out and "\u202e" not in unsafe.out
    assert "\\x1b]0;pwned\\x07" in unsafe.out and "\\u202eevil" in unsafe.out


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        (("show", "9"), 1, "no dead letter at index 9 of shard 0 (it has 3)"),
        (("show", "0", "--shard", "4"), 2, "no shard 4: EVENT_BUFFER_SHARDS=1"),
        (("show", "-1"), 2, "the index must be 0 or more"),
        (("list", "--limit", "-2"), 2, "--limit must be 0"),
        (("purge", "--shard", "1", "--yes"), 2, "no shard 1"),
    ],
)
def test_mistakes_are_one_line(
    run_main: Callable[..., Result],
    redis: redis_lib.Redis,
    settings: Settings,
    argv: tuple[str, ...],
    code: int,
    message: str,
) -> None:
    ingest_invalid(EventBuffer(redis, settings))
    result = run_main("dlq", *argv)
    assert result.code == code
    [line] = result.err.strip().splitlines()
    assert message in line
    assert redis.llen(SHARD.dead) == 3


# -- replay -------------------------------------------------------------------------


def test_replay_with_fixes_lands_them_once_and_leaves_the_rest(
    run_main: Callable[..., Result],
    redis: redis_lib.Redis,
    settings: Settings,
    sink: ChdbSink,
    tmp_path: Path,
) -> None:
    ingest_invalid(EventBuffer(redis, settings))
    fixes = write_fixes(
        tmp_path / "fixed.jsonl",
        raw_event("signup", id=ID_COUNTRY, country="SE"),
        raw_event("purchase", id=ID_DATE.upper(), created_at=f"{DAY}T11:00:00Z"),
    )
    replayed = run_main("dlq", "replay", "--file", fixes, "--yes")
    assert (replayed.code, replayed.err) == (0, "")
    assert "Replayed 2 dead letter(s) into the buffer; removed 2" in replayed.out
    left = [json.loads(p) for p in dead_payloads(redis)]
    assert [p.get("id") for p in left] == [ID_OTHER], "the entry the file does not fix stays"

    assert run_main("flush").code == 0
    landed = clickhouse_rows(
        settings,
        "SELECT toString(id), name, country, toString(created_at) FROM events "
        "WHERE name != 'ok' ORDER BY name",
    )
    assert landed == [
        (ID_DATE, "purchase", "\x00\x00", f"{DAY} 11:00:00.000"),  # FixedString default
        (ID_COUNTRY, "signup", "SE", f"{DAY} 12:00:00.000"),
    ]

    # The same command again: the entries are gone, nothing is applied twice.
    again = run_main("dlq", "replay", "--file", fixes, "--yes")
    assert again.code == 0
    assert "2 event(s) of" in again.out and "match no dead letter" in again.out
    assert "Nothing to replay" in again.out
    assert run_main("flush").code == 0
    assert clickhouse_rows(settings, "SELECT count() FROM events WHERE name != 'ok'") == [(2,)]


def test_a_fix_that_still_fails_validation_stays_and_is_reported(
    run_main: Callable[..., Result], redis: redis_lib.Redis, settings: Settings, tmp_path: Path
) -> None:
    ingest_invalid(EventBuffer(redis, settings))
    fixes = write_fixes(
        tmp_path / "fixed.jsonl",
        raw_event("signup", id=ID_COUNTRY, country="SE"),
        raw_event("purchase", id=ID_DATE, created_at="still not a date"),
    )
    result = run_main("dlq", "replay", "--file", fixes, "--yes")
    assert result.code == 0
    assert "1 dead letter(s) corrected version still fails validation and stay:" in result.out
    assert "shard 0 #1 (invalid_event): created_at: not an ISO-8601 date" in result.out
    assert "Replayed 1 dead letter(s)" in result.out
    assert [json.loads(p)["id"] for p in dead_payloads(redis)] == [ID_DATE, ID_OTHER]


def test_a_replay_interrupted_before_the_removal_is_not_applied_twice(
    run_main: Callable[..., Result],
    redis: redis_lib.Redis,
    settings: Settings,
    sink: ChdbSink,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ingest_invalid(EventBuffer(redis, settings))
    fixes = write_fixes(
        tmp_path / "fixed.jsonl",
        raw_event("signup", id=ID_COUNTRY, country="SE"),
        raw_event("purchase", id=ID_DATE, created_at=NOW_MS),
    )

    def lost_connection(*args: Any, **kwargs: Any) -> int:
        raise RedisConnectionError("Connection reset by peer")

    # Redis goes away after the events were applied, before the entries are removed.
    with monkeypatch.context() as patched:
        patched.setattr("worker.replay.remove_dead_letters", lost_connection)
        crashed = run_main("dlq", "replay", "--file", fixes, "--yes")
    assert crashed.code == 1
    [line] = crashed.err.strip().splitlines()
    assert "cannot reach Redis" in line
    assert redis.llen(SHARD.dead) == 3
    assert EventBuffer(redis, settings).get_buffer_size() == 3  # "ok" and the two fixed

    rerun = run_main("dlq", "replay", "--file", fixes, "--yes")
    assert rerun.code == 0
    assert "(2 had been applied by an interrupted replay)" in rerun.out
    assert EventBuffer(redis, settings).get_buffer_size() == 3
    assert redis.llen(SHARD.dead) == 1
    assert run_main("flush").code == 0
    assert clickhouse_rows(settings, "SELECT count(), uniqExact(id) FROM events") == [(3, 3)]


def test_replay_without_a_file_takes_what_validates_now(
    run_main: Callable[..., Result], redis: redis_lib.Redis, settings: Settings, sink: ChdbSink
) -> None:
    buffer = EventBuffer(redis, settings)
    ingest_invalid(buffer)
    # Dead letters that validate now: an event of a rule since relaxed (twice,
    # byte for byte: two events), a screen_view from ingest (it goes through
    # the buffer's rules), and a screen_view row ClickHouse refused before its
    # table was fixed (it was through the rules already: queued as it is).
    signup = json.dumps(raw_event("relaxed")).encode()
    view = raw_event("screen_view", session_id="s1", id=str(uuid.uuid4()))
    row = parse_event(raw_event("screen_view", session_id="s2", duration=1500))
    redis.rpush(
        SHARD.dead,
        hand_made(signup),
        hand_made(signup),
        hand_made(json.dumps(view).encode()),
        hand_made(encode_event(row), source="flush"),
    )
    result = run_main("dlq", "replay", "--yes")
    assert result.code == 0, result.err
    assert "3 dead letter(s) still fail validation and stay:" in result.out
    assert "Replayed 4 dead letter(s)" in result.out
    assert redis.llen(SHARD.dead) == 3

    assert buffer.get_last_screen_view(session_id="s1") is not None
    assert buffer.get_last_screen_view(session_id="s2") is None
    assert run_main("flush").code == 0
    landed = clickhouse_rows(
        settings,
        "SELECT name, session_id, duration FROM events WHERE name != 'ok' "
        "ORDER BY name, session_id",
    )
    assert landed == [("relaxed", "", 0), ("relaxed", "", 0), ("screen_view", "s2", 1500)]


def test_replay_asks_first(
    run_main: Callable[..., Result],
    redis: redis_lib.Redis,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    redis.rpush(SHARD.dead, hand_made(json.dumps(raw_event("relaxed")).encode()))
    refused = run_main("dlq", "replay")
    assert refused.code == 2
    [line] = refused.err.strip().splitlines()
    assert "refusing to replay dead letters without --yes" in line

    monkeypatch.setattr("worker.cli.common.stdin_is_interactive", lambda: True)
    monkeypatch.setattr("sys.stdin", io.StringIO("n\n"))
    declined = run_main("dlq", "replay")
    assert declined.code == 1 and "not confirmed" in declined.err
    assert redis.llen(SHARD.dead) == 1
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))
    accepted = run_main("dlq", "replay")
    assert accepted.code == 0 and "Replay 1 dead letter(s)" in accepted.out
    assert redis.llen(SHARD.dead) == 0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json\n", "fixed.jsonl:1: not valid JSON"),
        ('{"name": "x"}\n', "fixed.jsonl:1: each line must be an event object with its UUID `id`"),
        (
            f'{{"id": "{ID_DATE}"}}\n\n{{"id": "{ID_DATE.upper()}"}}\n',
            f"fixed.jsonl:3: id {ID_DATE} appears twice",
        ),
        ("\n", "holds no events"),
    ],
)
def test_a_bad_fix_file_is_refused(
    run_main: Callable[..., Result],
    redis: redis_lib.Redis,
    settings: Settings,
    tmp_path: Path,
    content: str,
    message: str,
) -> None:
    ingest_invalid(EventBuffer(redis, settings))
    path = tmp_path / "fixed.jsonl"
    path.write_text(content)
    result = run_main("dlq", "replay", "--file", str(path), "--yes")
    assert result.code == 2
    [line] = result.err.strip().splitlines()
    assert message in line
    assert redis.llen(SHARD.dead) == 3
    missing = run_main("dlq", "replay", "--file", str(tmp_path / "nope.jsonl"), "--yes")
    assert missing.code == 2 and "cannot read" in missing.err


# -- purge --------------------------------------------------------------------------


def test_purge_with_yes_removes_what_the_filters_pick(
    run_main: Callable[..., Result], redis: redis_lib.Redis, settings: Settings
) -> None:
    ingest_invalid(EventBuffer(redis, settings))
    kept = hand_made(b'{"name":"x"}', source="flush")
    redis.rpush(SHARD.dead, kept)
    some = run_main("dlq", "purge", "--reason", "invalid_event", "--yes")
    assert (some.code, some.err) == (0, "")
    assert "Purged 3 dead letters (all shards, reason invalid_event)." in some.out
    assert redis.lrange(SHARD.dead, 0, -1) == [kept]
    rest = run_main("dlq", "purge", "--shard", "0", "--yes")
    assert "Purged 1 dead letters (shard 0)." in rest.out
    assert redis.llen(SHARD.dead) == 0
    nothing = run_main("dlq", "purge")
    assert nothing.code == 0 and "nothing to purge" in nothing.out


def test_purge_without_yes_refuses_on_a_non_interactive_stdin(
    run_main: Callable[..., Result], redis: redis_lib.Redis, settings: Settings
) -> None:
    ingest_invalid(EventBuffer(redis, settings))
    result = run_main("dlq", "purge")
    assert result.code == 2
    [line] = result.err.strip().splitlines()
    assert line == (
        "eventbuffer: error: refusing to purge dead letters without --yes: "
        "stdin is not a terminal to ask on"
    )
    assert redis.llen(SHARD.dead) == 3


def test_purge_asks_for_the_count(
    run_main: Callable[..., Result],
    redis: redis_lib.Redis,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    ingest_invalid(EventBuffer(redis, settings))
    monkeypatch.setattr("worker.cli.common.stdin_is_interactive", lambda: True)
    monkeypatch.setattr("sys.stdin", io.StringIO("y\n"))
    wrong = run_main("dlq", "purge")
    assert wrong.code == 1 and "not confirmed: nothing was changed" in wrong.err
    assert "Type 3 to confirm" in wrong.out
    assert redis.llen(SHARD.dead) == 3
    monkeypatch.setattr("sys.stdin", io.StringIO(""))  # Ctrl-D
    assert run_main("dlq", "purge").code == 1
    monkeypatch.setattr("sys.stdin", io.StringIO("3\n"))
    right = run_main("dlq", "purge")
    assert right.code == 0 and "Purged 3 dead letters" in right.out
    assert redis.llen(SHARD.dead) == 0


# -- removing exactly what was read -------------------------------------------------


def test_removal_takes_exactly_the_entries_read_while_the_list_changes(
    redis: redis_lib.Redis, settings: Settings
) -> None:
    buffer = EventBuffer(redis, settings)
    entries = [hand_made(json.dumps(raw_event(f"e{n}")).encode()) for n in range(6)]
    redis.rpush(SHARD.dead, *entries, entries[2])  # entry 2 twice, byte for byte
    letters = list(iter_dead_letters(redis, SHARD))
    # Meanwhile: the head is removed by someone else (indexes shift), a new one arrives.
    redis.lpop(SHARD.dead)
    late = hand_made(b'{"name":"late"}')
    redis.rpush(SHARD.dead, late)

    removed = remove_dead_letters(
        buffer.scripts, buffer.keyspace, [letters[n] for n in (0, 2, 4, 6)]
    )
    assert removed == 3, "entry 0 was gone already"
    assert redis.lrange(SHARD.dead, 0, -1) == [entries[1], entries[3], entries[5], late]


def test_a_big_replay_shows_progress_and_keeps_order(
    run_main: Callable[..., Result],
    redis: redis_lib.Redis,
    settings: Settings,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("worker.cli.dlq_replay.PROGRESS_MIN_ENTRIES", 10)
    monkeypatch.setattr("worker.deadletters.PAGE", 7)  # several pages, and a partial one
    events = [raw_event("bulk", created_at=NOW_MS + n) for n in range(30)]
    redis.rpush(SHARD.dead, *(hand_made(json.dumps(e).encode()) for e in events))
    result = run_main("dlq", "replay", "--yes")
    assert result.code == 0 and "Replayed 30 dead letter(s)" in result.out
    assert "replaying" in result.out and "30/30" in result.out
    assert redis.llen(SHARD.dead) == 0
    queued = [msgspec.json.decode(r) for r in redis.lrange(SHARD.queue, 0, -1)]
    assert [q["created_at"][-3:] for q in queued] == [f"{n:03d}" for n in range(30)]


def test_a_replayed_flush_row_is_queued_as_it_is_with_the_reorder_window(
    run_main: Callable[..., Result],
    redis: redis_lib.Redis,
    settings: Settings,
    sink: ChdbSink,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The default deployment holds views for the reorder window; a row the flush
    # refused went through the rules already and must not be held, nor become its
    # session's last view again (its duration recomputed).
    monkeypatch.setenv("EVENT_BUFFER_REORDER_WINDOW_MS", "500")
    row = parse_event(raw_event("screen_view", session_id="s2", duration=1500))
    redis.rpush(SHARD.dead, hand_made(encode_event(row), source="flush"))
    result = run_main("dlq", "replay", "--yes")
    assert result.code == 0, result.err
    assert "Replayed 1 dead letter(s)" in result.out
    assert EventBuffer(redis, settings).get_buffer_size() == 1  # queued, not held
    assert run_main("flush").code == 0
    landed = clickhouse_rows(settings, "SELECT name, session_id, duration FROM events")
    assert landed == [("screen_view", "s2", 1500)]
    assert EventBuffer(redis, settings).get_last_screen_view(session_id="s2") is None
