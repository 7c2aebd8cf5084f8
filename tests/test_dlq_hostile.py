"""Hostile dead letters and hostile events in a batch (issue #24, item 5), on a real Redis.

- An event nested 1,000+ levels deep, or holding NaN next to an integer of
  over 4,300 digits, is dead-lettered alone (`invalid_event`) and its valid
  siblings are applied: whichever way the batch arrives (protocol 2
  positional or keyword arguments, protocol 1, the producer's JSON text),
  as a real worker decodes it (`worker/bodies.py`), and through a real
  worker.
- Every dead letter can be listed, shown, replayed one by one and purged one
  by one (by index or by id), whatever it holds: a body nested 10⁶ deep, a
  huge integer, rich markup, a header time no date holds. A letter that
  cannot be replayed is reported and the others are replayed.

The CLI runs in-process through `main(argv)` (the `run_main` fixture).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis as redis_lib
from hypothesis import given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from tests.conftest import Result
from tests.support.celery_procs import CeleryProcess, project_env, worker
from tests.support.polling import wait_until
from tests.test_ingest_failures import publish_raw
from worker import bodies
from worker.buffer import EventBuffer
from worker.deadletters import (
    REASON_INGEST_FAILED,
    REASON_INVALID_EVENT,
    REASON_UNDELIVERABLE,
    DeadLetter,
    decode_dead_letter,
    encode_dead_letter,
    iter_dead_letters,
)
from worker.ingestion import ingest
from worker.json_slices import JsonSliceError, split_array, split_object
from worker.keys import ShardKeys
from worker.settings import Settings

SHARD = ShardKeys("eventbuffer", 0)
DEEP = 1_000_000


@pytest.fixture
def run_main_env() -> dict[str, str | None]:
    return {"COLUMNS": "250"}  # rich: no wrapping in the captured output


def now_ms() -> int:
    return int(time.time() * 1000)


def good(name: str) -> dict[str, Any]:
    return {"id": str(uuid.uuid4()), "project_id": "p1", "name": name, "created_at": now_ms()}


def deep_event(depth: int = DEEP) -> bytes:
    """An event whose properties hold an array nested `depth` levels deep."""
    head = json.dumps({"id": str(uuid.uuid4()), "project_id": "p1", "name": "deep"})[:-1]
    return f'{head}, "created_at": {now_ms()}, "properties": {{"a": '.encode() + (
        b"[" * depth + b"]" * depth + b"}}"
    )


def nan_and_huge_int() -> bytes:
    """An event with NaN (msgspec refuses it) and a 5,000-digit integer (json refuses it)."""
    head = json.dumps({"id": str(uuid.uuid4()), "project_id": "p1", "name": "nan"})[:-1]
    return f'{head}, "created_at": {now_ms()}, "properties": {{"x": NaN, "n": '.encode() + (
        b"9" * 5000 + b"}}"
    )


def array(*items: bytes) -> bytes:
    return b"[" + b", ".join(items) + b"]"


def as_json(event: dict[str, Any]) -> bytes:
    return json.dumps(event).encode()


def letters(redis: redis_lib.Redis) -> list[tuple[DeadLetter, bytes]]:
    return [decode_dead_letter(e) for e in redis.lrange(SHARD.dead, 0, -1)]


def queued_ids(redis: redis_lib.Redis) -> set[str]:
    return {json.loads(row)["id"] for row in redis.lrange(SHARD.queue, 0, -1)}


HUGE = b"9" * 5000


def hand_made(payload: bytes, reason: str = REASON_INVALID_EVENT, **fields: Any) -> bytes:
    header = DeadLetter(
        reason=reason, error="by hand", source="ingest", at=now_ms(), shard=0, **fields
    )
    return encode_dead_letter(header, payload)


# -- cutting JSON one level deep ------------------------------------------------------

JSON_VALUES = st.recursive(
    st.none()
    | st.booleans()
    | st.integers()
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


@hsettings(max_examples=300, deadline=None)
@given(st.lists(JSON_VALUES, max_size=6), st.dictionaries(st.text(), JSON_VALUES, max_size=6))
def test_slices_are_the_elements_msgspec_decodes(items: list[Any], members: dict[str, Any]) -> None:
    for text in (json.dumps(items), json.dumps(items, indent=2)):
        assert [msgspec.json.decode(x) for x in split_array(text)] == items
    pairs = split_object(json.dumps(members, ensure_ascii=False).encode())
    assert {msgspec.json.decode(k): msgspec.json.decode(v) for k, v in pairs} == members


@hsettings(max_examples=1000, deadline=None)
@given(st.text(alphabet='[]{}",: \\1a', max_size=30) | st.binary(max_size=30))
def test_any_text_is_cut_as_msgspec_reads_it_or_refused(data: str | bytes) -> None:
    try:
        slices = split_array(data)
    except JsonSliceError:
        slices = None
    try:
        decoded = msgspec.json.decode(data)
    except msgspec.DecodeError:
        return  # the slices (if any) are each decoded strictly, one by one
    if isinstance(decoded, list):
        assert slices is not None and [msgspec.json.decode(x) for x in slices] == decoded
    else:
        assert slices is None


# -- one bad event, not the batch -----------------------------------------------------


def body_protocol2(events: bytes) -> bytes:
    return b"[[" + events + b'], {}, {"callbacks": null}]'


def body_keyword(events: bytes) -> bytes:
    return b'[[], {"events": ' + events + b', "batch_id": "kw"}, {}]'


def body_protocol1(events: bytes) -> bytes:
    return b'{"task": "eventbuffer.ingest_events", "id": "t1", "args": [' + events + b"]}"


def body_text(events: bytes) -> bytes:
    """The producer client's form: the batch as JSON text inside a JSON string."""
    return b"[[" + json.dumps(events.decode()).encode() + b"], {}, {}]"


def batch_of(body: bytes) -> Any:
    """The events argument of a body, decoded as an eventbuffer worker decodes it."""
    decoded = bodies.decode(body)
    if isinstance(decoded, dict):  # protocol 1
        return decoded["args"][0]
    args, kwargs, _ = decoded
    return args[0] if args else kwargs["events"]


@pytest.mark.parametrize(
    "bad",
    [deep_event(), deep_event(1_200), nan_and_huge_int()],
    ids=["nested-1e6", "nested-1200", "nan-and-huge-int"],
)
@pytest.mark.parametrize(
    "body", [body_protocol2, body_keyword, body_protocol1, body_text], ids=lambda f: f.__name__
)
def test_one_hostile_event_is_dead_lettered_alone(
    redis: redis_lib.Redis, settings: Settings, bad: bytes, body: Callable[[bytes], bytes]
) -> None:
    first, last = good("first"), good("last")
    payload = batch_of(body(array(as_json(first), bad, as_json(last))))
    result = ingest(EventBuffer(redis, settings), payload, "batch-1")
    assert (result.accepted, result.invalid) == (2, 1)
    assert queued_ids(redis) == {first["id"], last["id"]}
    [(header, raw)] = letters(redis)
    assert header.reason == REASON_INVALID_EVENT
    assert raw == bad[: len(raw)]  # the raw event (a huge one cut to the dead-letter limit)
    if b"NaN" in bad:
        assert "NaN" in header.error
    else:
        assert header.field == "properties"
        assert header.error.startswith("properties: nested too deeply to decode")


def test_nan_in_one_event_and_a_huge_int_in_another_fail_alone(
    redis: redis_lib.Redis, settings: Settings
) -> None:
    nan = b'{"project_id": "p1", "name": "nan", "created_at": 1, "x": NaN}'
    huge = b'{"project_id": "p1", "name": "huge", "created_at": 1, "duration": ' + HUGE + b"}"
    ok = good("ok")
    payload = batch_of(body_protocol2(array(nan, as_json(ok), huge)))
    result = ingest(EventBuffer(redis, settings), payload, "batch-2")
    assert (result.accepted, result.invalid) == (1, 2)
    assert queued_ids(redis) == {ok["id"]}
    assert [raw for _, raw in letters(redis)] == [nan, huge]


# -- the tools on hostile dead letters ------------------------------------------------


@pytest.fixture
def hostile(redis: redis_lib.Redis) -> dict[str, bytes]:
    """Dead letters of every hostile kind, and two that replay, in this order."""
    entries = {
        "deep-body": hand_made(
            b"[" * DEEP + b"]" * DEEP, REASON_UNDELIVERABLE, task="eventbuffer.ingest_events"
        ),
        "deep-event": hand_made(deep_event()),
        "huge-int": hand_made(b'{"project_id": "p", "name": "n", "duration": ' + HUGE + b"}"),
        "markup": hand_made(b'{"name": "[/x] [bold]b[/bold]"}'),
        "bad-time": encode_dead_letter(
            DeadLetter(reason="invalid_event", error="[/e]", source="ingest", at=10**20, shard=0),
            b"{}",
        ),
        "replays": hand_made(as_json(good("replays"))),
        "replays-too": hand_made(as_json(good("replays-too"))),
    }
    redis.rpush(SHARD.dead, *entries.values())
    return entries


def test_list_and_show_any_dead_letter(
    run_main: Callable[..., Result], redis: redis_lib.Redis, hostile: dict[str, bytes]
) -> None:
    listed = run_main("dlq", "list", "--limit", "0")
    assert (listed.code, listed.err) == (0, "")
    assert "7 dead letters" in listed.out
    data = json.loads(run_main("dlq", "list", "--json", "--limit", "0").out)
    ids = [entry["id"] for entry in data["entries"]]
    assert len(set(ids)) == 7 and all(i in listed.out for i in ids)
    assert data["entries"][4]["at"] is None  # a time no date can hold

    for index in range(7):
        shown = run_main("dlq", "show", str(index))
        assert (shown.code, shown.err) == (0, ""), index
        assert f"id             {ids[index]}" in shown.out
    deep = run_main("dlq", "show", "0")
    assert (
        f"payload ({2 * DEEP:,} bytes, JSON nested too deeply to decode; "
        "the first 65,536 shown (--bytes)):" in deep.out
    )
    assert ("[" * 1000) in deep.out and ("]" * 10) not in deep.out
    small = run_main("dlq", "show", "--id", ids[1], "--bytes", "10")
    assert small.code == 0 and '{"id": "' in small.out
    assert "JSON nested too deeply to decode; the first 10 shown" in small.out
    huge = run_main("dlq", "show", "2")
    assert "JSON that cannot be decoded: Integer value out of range" in huge.out
    markup = run_main("dlq", "show", "3")
    assert "[/x] [bold]b[/bold]" in markup.out  # shown as it is, not read as markup
    assert "[/e]" in run_main("dlq", "show", "4").out

    assert redis.llen(SHARD.dead) == 7


def test_replay_goes_on_past_letters_it_cannot_read(
    run_main: Callable[..., Result],
    redis: redis_lib.Redis,
    hostile: dict[str, bytes],
    tmp_path: Path,
) -> None:
    fixes = tmp_path / "fixed.jsonl"
    fixes.write_bytes(b"[" * DEEP + b"]" * DEEP + b"\n")
    too_deep = run_main("dlq", "replay", "--file", str(fixes), "--yes")
    assert too_deep.code == 2 and "fixed.jsonl:1: nested too deeply to decode" in too_deep.err
    fixes.write_text(json.dumps(good("unmatched")) + "\n")
    with_file = run_main("dlq", "replay", "--file", str(fixes), "--yes")
    assert (with_file.code, with_file.err) == (0, "")
    assert "1 event(s) of" in with_file.out and "Nothing to replay" in with_file.out

    replayed = run_main("dlq", "replay", "--yes")
    assert (replayed.code, replayed.err) == (0, "")
    assert "5 dead letter(s) still fail validation and stay:" in replayed.out
    assert "(undeliverable_task): the task body is nested too deeply to decode" in replayed.out
    assert "(invalid_event): properties: nested too deeply to decode" in replayed.out
    assert "(invalid_event): duration: Integer value out of range" in replayed.out
    assert "Replayed 2 dead letter(s)" in replayed.out
    assert [json.loads(r)["name"] for r in redis.lrange(SHARD.queue, 0, -1)] == [
        "replays",
        "replays-too",
    ]
    assert redis.lrange(SHARD.dead, 0, -1) == list(hostile.values())[:5]


def test_one_letter_is_replayed_or_purged_by_index_or_id(
    run_main: Callable[..., Result], redis: redis_lib.Redis, hostile: dict[str, bytes]
) -> None:
    ids = [letter.id for letter in iter_dead_letters(redis, SHARD)]
    # A letter that cannot be replayed, picked alone: said so, exit 1, nothing changes.
    refused = run_main("dlq", "replay", "--index", "0", "--yes")
    assert refused.code == 1
    assert "the task body is nested too deeply to decode" in refused.out
    assert redis.llen(SHARD.dead) == 7 and redis.llen(SHARD.queue) == 0

    one = run_main("dlq", "replay", "--id", ids[6], "--yes")
    assert (one.code, one.err) == (0, "")
    assert "Replayed 1 dead letter(s)" in one.out
    assert [json.loads(r)["name"] for r in redis.lrange(SHARD.queue, 0, -1)] == ["replays-too"]

    gone = run_main("dlq", "purge", "--index", "0", "--yes")
    assert (gone.code, gone.err) == (0, "")
    assert f"Purged 1 dead letters (shard 0 #0 {ids[0]})." in gone.out
    by_id = run_main("dlq", "purge", "--id", ids[1], "--id", ids[3].upper(), "--yes")
    assert by_id.code == 0 and "Purged 2 dead letters" in by_id.out
    expected = [hostile[k] for k in ("huge-int", "bad-time", "replays")]
    assert redis.lrange(SHARD.dead, 0, -1) == expected

    missing = run_main("dlq", "purge", "--id", ids[0], "--yes")
    assert missing.code == 1 and f"no dead letter of id {ids[0]} in any shard" in missing.err
    past_end = run_main("dlq", "replay", "--index", "9", "--yes")
    assert past_end.code == 1 and "no dead letter at index 9 of shard 0 (it has 3)" in past_end.err
    mixed = run_main("dlq", "purge", "--index", "0", "--reason", "invalid_event", "--yes")
    assert mixed.code == 2 and "--reason" in mixed.err
    assert redis.lrange(SHARD.dead, 0, -1) == expected


def test_equal_entries_have_ids_of_their_own(
    run_main: Callable[..., Result], redis: redis_lib.Redis
) -> None:
    entry = hand_made(b'{"name": "twice"}')
    redis.rpush(SHARD.dead, entry, entry, entry)
    first, second, third = (letter.id for letter in iter_dead_letters(redis, SHARD))
    assert second == f"{first}-2" and third == f"{first}-3"
    assert f"id             {second}" in run_main("dlq", "show", "1").out  # by index too
    assert run_main("dlq", "purge", "--id", second, "--yes").code == 0
    assert redis.llen(SHARD.dead) == 2
    assert [letter.id for letter in iter_dead_letters(redis, SHARD)] == [first, second]


def test_an_index_needs_its_shard_when_there_are_several(
    run_main: Callable[..., Result],
    redis: redis_lib.Redis,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("EVENT_BUFFER_SHARDS", "2")
    redis.rpush(SHARD.dead, hand_made(b"{}"))
    refused = run_main("dlq", "purge", "--index", "0", "--yes")
    assert refused.code == 2 and "--index needs --shard" in refused.err
    assert run_main("dlq", "purge", "--index", "0", "--shard", "0", "--yes").code == 0
    assert redis.llen(SHARD.dead) == 0


@pytest.mark.parametrize("reason", [REASON_INGEST_FAILED, REASON_UNDELIVERABLE])
def test_a_batch_dead_letter_with_hostile_events_replays_its_valid_ones(
    run_main: Callable[..., Result], redis: redis_lib.Redis, reason: str
) -> None:
    first, last = good("first"), good("last")
    batch = array(as_json(first), deep_event(5_000), nan_and_huge_int(), as_json(last))
    if reason == REASON_UNDELIVERABLE:  # celery-node's body: `null` kwargs
        batch = b"[[" + batch + b"], null, {}]"
    letter = hand_made(batch, reason, claim="failed-batch", task="eventbuffer.ingest_events")
    redis.rpush(SHARD.dead, letter)
    result = run_main("dlq", "replay", "--yes")
    assert (result.code, result.err) == (0, "")
    assert "2 event(s) of the replayed batches failed validation" in result.out
    assert queued_ids(redis) == {first["id"], last["id"]}
    assert [h.reason for h, _ in letters(redis)] == [REASON_INVALID_EVENT] * 2


# -- through a real worker ------------------------------------------------------------


@pytest.fixture
def ingest_worker(redis_url: str, settings: Settings, tmp_path: Path) -> Iterator[CeleryProcess]:
    env = project_env(REDIS_URL=redis_url, CLICKHOUSE_URL=settings.clickhouse_url)
    proc = worker(env, tmp_path / "worker.log", "-Q", "ingest", "-P", "solo")
    try:
        proc.wait_for(" ready.", 60)
        yield proc
    finally:
        proc.stop()


@pytest.mark.slow
def test_a_real_worker_keeps_hostile_messages_and_the_tools_handle_them(
    ingest_worker: CeleryProcess,
    redis_url: str,
    redis: redis_lib.Redis,
    run_main: Callable[..., Result],
) -> None:
    sibling = [good(f"sibling{n}") for n in range(4)]
    node = [good("node")]
    deep_body = b"[" * DEEP + b"]" * DEEP
    messages = {
        "deep-body": deep_body,
        "deep-event": body_protocol2(array(as_json(sibling[0]), deep_event(), as_json(sibling[1]))),
        "nan": body_protocol2(array(as_json(sibling[2]), nan_and_huge_int(), as_json(sibling[3]))),
        # celery-node's sendTask: `null` kwargs, refused by Celery, replayable.
        "node": json.dumps([[node], None, {}]).encode(),
    }
    for name, body in messages.items():
        publish_raw(redis_url, "ingest", "eventbuffer.ingest_events", body, f"task-{name}")
    wait_until(
        lambda: redis.llen(SHARD.dead) == 4 and len(queued_ids(redis)) == 4,
        90,
        "dead letters and the valid siblings",
        alive=ingest_worker.alive,
    )
    assert queued_ids(redis) == {e["id"] for e in sibling}
    by_claim = {header.claim: (header, raw) for header, raw in letters(redis)}
    assert set(by_claim) == {"task-deep-body", "task-deep-event", "task-nan", "task-node"}
    assert by_claim["task-deep-body"][0].reason == REASON_UNDELIVERABLE
    assert by_claim["task-deep-body"][1] == deep_body
    assert by_claim["task-deep-event"][0].reason == REASON_INVALID_EVENT
    assert by_claim["task-deep-event"][0].field == "properties"
    assert by_claim["task-nan"][0].reason == REASON_INVALID_EVENT
    assert by_claim["task-node"][0].reason == REASON_UNDELIVERABLE
    assert ingest_worker.alive()

    stored = list(iter_dead_letters(redis, SHARD))
    index = {letter.header.claim: letter.index for letter in stored if letter.header}
    ids = {letter.header.claim: letter.id for letter in stored if letter.header}
    assert run_main("dlq", "list").code == 0
    shown = run_main("dlq", "show", str(index["task-deep-body"]))
    assert shown.code == 0 and "JSON nested too deeply to decode" in shown.out
    assert run_main("dlq", "show", "--id", ids["task-deep-event"]).code == 0

    replayed = run_main("dlq", "replay", "--yes")
    assert (replayed.code, replayed.err) == (0, "")
    assert "Replayed 1 dead letter(s)" in replayed.out
    assert "the task body is nested too deeply to decode" in replayed.out
    assert queued_ids(redis) == {e["id"] for e in sibling + node}

    [deep_body_index] = [
        letter.index
        for letter in iter_dead_letters(redis, SHARD)
        if letter.header and letter.header.claim == "task-deep-body"
    ]
    purged = run_main("dlq", "purge", "--index", str(deep_body_index), "--yes")
    assert purged.code == 0 and "Purged 1 dead letters" in purged.out
    assert run_main("dlq", "purge", "--id", ids["task-deep-event"], "--yes").code == 0
    assert [h.claim for h, _ in letters(redis)] == ["task-nan"]
