"""Batches sent as one JSON text (the producer client's form before it sent plain arrays)."""

from __future__ import annotations

import json
import uuid

import redis as redis_lib

from tests.support.dates import at
from worker.buffer import EventBuffer
from worker.deadletters import REASON_INVALID_EVENT, decode_dead_letter
from worker.events import decode_row
from worker.ingestion import ingest
from worker.keys import ShardKeys
from worker.settings import Settings

KEYS = ShardKeys("eventbuffer", 0)
NOW = at("10:00:00")


def batch_text(rows: list[bytes]) -> str:
    """A batch as one JSON text holding the JSON array of rows (older producers sent this)."""
    return (b"[" + b",".join(rows) + b"]").decode("utf-8")


def queued_ids(redis: redis_lib.Redis) -> list[str]:
    return sorted(decode_row(row).id for row in redis.lrange(KEYS.queue, 0, -1))


def test_a_text_batch_applies_valid_rows_and_dead_letters_the_rest(
    redis: redis_lib.Redis, settings: Settings
) -> None:
    buffer = EventBuffer(redis, settings)
    good = {"id": str(uuid.uuid4()), "project_id": "p", "name": "a", "created_at": NOW}
    no_id = {"project_id": "p", "name": "b", "created_at": NOW}
    bad = {"project_id": "p", "created_at": NOW}  # no name
    text = batch_text([json.dumps(item).encode() for item in (good, no_id, bad)] + [b"42"])

    result = ingest(buffer, text, "task-1")
    assert (result.accepted, result.invalid, result.appended) == (2, 2, 2)
    ids = queued_ids(redis)
    assert good["id"] in ids
    derived = next(i for i in ids if i != good["id"])
    assert uuid.UUID(derived)

    letters = [decode_dead_letter(e) for e in redis.lrange(KEYS.dead, 0, -1)]
    assert [(h.reason, h.field) for h, _ in letters] == [
        (REASON_INVALID_EVENT, "name"),
        (REASON_INVALID_EVENT, "$"),
    ]
    assert json.loads(letters[0][1]) == bad, "the raw item is kept as it was sent"
    assert letters[1][1] == b"42"

    # Redelivery: nothing more is applied, and the derived id did not change.
    again = ingest(buffer, text, "task-1")
    assert again.duplicate and queued_ids(redis) == ids
    assert redis.llen(KEYS.dead) == 2


def test_text_that_is_not_a_json_array_is_one_dead_letter(
    redis: redis_lib.Redis, settings: Settings
) -> None:
    buffer = EventBuffer(redis, settings)
    result = ingest(buffer, "[{not json", "task-2")
    assert (result.accepted, result.invalid) == (0, 1)
    [(header, payload)] = [decode_dead_letter(e) for e in redis.lrange(KEYS.dead, 0, -1)]
    assert header.field == "$" and payload == b'"[{not json"'
