"""Replaying dead letters: which validate now (or have a corrected version), and applying them.

A replayed entry is applied under a batch id derived from its bytes, so a
replay that is run again after a crash skips what it had applied (while the
batch marker lives, `EVENT_BUFFER_BATCH_MARKER_TTL_S`) and only removes it.

A batch dead letter (`ingest_failed`, `undeliverable_task`) holds a whole
batch, or the task body that carried it: replaying it runs the batch through
`ingest()` as its task would have, under the batch's own id (so shards a
failed task had applied before it failed are skipped while their markers
live); its invalid events become dead letters of their own. A
`batch_id_conflict` batch is the exception: its id belongs to another batch,
so it is replayed under an id derived from the entry, like a single event
(and its events sent without an id get ids derived from that one).
"""

from __future__ import annotations

import hashlib
import uuid
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import msgspec

from worker.buffer import EventBuffer
from worker.deadletters import (
    BATCH_REASONS,
    PAGE,
    REASON_BATCH_ID_CONFLICT,
    REASON_UNDELIVERABLE,
    StoredDeadLetter,
    remove_dead_letters,
)
from worker.errors import InvalidEvent
from worker.events import KIND_REGULAR, Limits, Row, encode_event, parse_event
from worker.ingest import TaskBodyError, body_batch, ingest


class QueuedRow(Row):
    """A row that went through the buffer's rules already (a flush dead letter).

    Applied again, it is queued as it is: as a screen_view it would become its
    session's last view once more, and its duration be recomputed against
    views that came after it.
    """

    @property
    def kind(self) -> str:
        return KIND_REGULAR


@dataclass
class ReplayItem:
    """A dead letter chosen for replay, with the event it becomes or why it cannot."""

    letter: StoredDeadLetter
    payload: bytes  # the entry's payload, or its corrected version from a fix file
    fixed: bool  # the payload comes from a fix file
    # Earlier entries of the same shard with exactly the same bytes (two equal
    # invalid events of one batch): each is an event of its own.
    occurrence: int = 0
    event: Row | None = None
    # A batch dead letter's events argument, as its ingest task takes it.
    batch: Any = None
    error: str = ""  # why it cannot be replayed (it stays in the dead letters)

    @property
    def batch_id(self) -> str:
        """Derived from the entry alone, so a rerun, even with another fix, is skipped.

        A batch keeps its own id (its task id), which its dead letter recorded,
        unless that id was the problem (a batch_id_conflict).
        """
        header = self.letter.header
        if (
            self.batch is not None
            and header is not None
            and header.claim
            and header.reason != REASON_BATCH_ID_CONFLICT
        ):
            return header.claim
        digest = hashlib.sha256(self.letter.entry).hexdigest()[:40]
        return f"dlq-replay:{self.letter.shard}:{digest}:{self.occurrence}"


@dataclass
class ReplayPlan:
    ready: list[ReplayItem] = field(default_factory=list)
    invalid: list[ReplayItem] = field(default_factory=list)
    # Fix-file ids that matched no chosen dead letter.
    unmatched_ids: list[str] = field(default_factory=list)


@dataclass
class ReplayResult:
    applied: int = 0  # entries applied to the buffer now
    already_applied: int = 0  # entries a previous (interrupted) replay had applied
    removed: int = 0  # entries removed from the dead letters
    # Invalid events of replayed batches, dead-lettered on their own now.
    invalid_events: int = 0


def canonical_id(value: Any) -> str | None:
    """An event id in its canonical UUID form, or None when it is not a UUID string."""
    if not isinstance(value, str):
        return None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return None


def payload_event_id(payload: bytes) -> str | None:
    """The `id` of a dead letter's payload, when it is a JSON object with a UUID id."""
    try:
        obj = msgspec.json.decode(payload)
    except msgspec.DecodeError:
        return None
    return canonical_id(obj.get("id")) if isinstance(obj, dict) else None


def validate_payload(payload: bytes, limits: Limits, already_queued: bool) -> Row:
    """The event a payload makes, as ingest would accept it; raises InvalidEvent.

    Only JSON objects count, as at ingest (JSON text inside a JSON string is
    no event). `already_queued` payloads (flush dead letters) become
    `QueuedRow`s.
    """
    try:
        obj = msgspec.json.decode(payload)
    except msgspec.DecodeError as exc:
        raise InvalidEvent("$", f"not valid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise InvalidEvent("$", f"an event must be an object, got {type(obj).__name__}")
    event = parse_event(obj, limits)
    if already_queued:
        return msgspec.json.decode(encode_event(event), type=QueuedRow)
    return event


def plan_replay(
    letters: Sequence[StoredDeadLetter], limits: Limits, fixes: Mapping[str, bytes] | None = None
) -> ReplayPlan:
    """Which of `letters` can be replayed, and as what.

    Without `fixes`, every letter whose payload validates now. With `fixes`
    (corrected payloads by canonical event id), only the letters whose
    payload id has a corrected version, which replaces the payload.
    """
    plan = ReplayPlan()
    matched: set[str] = set()
    seen: Counter[tuple[int, bytes]] = Counter()
    for letter in letters:
        occurrence = seen[letter.shard, letter.entry]
        seen[letter.shard, letter.entry] += 1
        payload, fixed = letter.payload, False
        if letter.reason in BATCH_REASONS:
            if fixes is None:  # a fix file corrects single events, matched by id
                _plan_batch(plan, ReplayItem(letter, payload, False, occurrence))
            continue
        if fixes is not None:
            event_id = payload_event_id(letter.payload)
            if event_id is None or event_id not in fixes:
                continue
            payload, fixed = fixes[event_id], True
            matched.add(event_id)
        item = ReplayItem(letter, payload, fixed, occurrence)
        if letter.header is None:
            item.error = "the entry's header cannot be decoded"
            plan.invalid.append(item)
            continue
        try:
            item.event = validate_payload(payload, limits, letter.header.source == "flush")
        except InvalidEvent as exc:
            item.error = str(exc)
            plan.invalid.append(item)
            continue
        plan.ready.append(item)
    if fixes is not None:
        plan.unmatched_ids = [i for i in fixes if i not in matched]
    return plan


def _plan_batch(plan: ReplayPlan, item: ReplayItem) -> None:
    """A batch dead letter is ready when its batch can be read; its events are checked later."""
    header = item.letter.header
    assert header is not None  # a batch reason comes from a decoded header
    try:
        if header.reason == REASON_UNDELIVERABLE:
            item.batch = body_batch(header.task, item.payload)
        else:
            item.batch = msgspec.json.decode(item.payload)
    except (TaskBodyError, msgspec.DecodeError) as exc:
        item.error = str(exc)
        plan.invalid.append(item)
        return
    plan.ready.append(item)


def replay(
    buffer: EventBuffer,
    items: Sequence[ReplayItem],
    progress: Callable[[int], None] | None = None,
) -> ReplayResult:
    """Apply the ready items to the buffer, then remove their entries from the dead letters.

    Each entry is applied on its own under its derived batch id, and a page
    of them is removed right after: a crash in between leaves entries that
    a rerun skips applying (the batch marker) and removes.
    """
    result = ReplayResult()
    for start in range(0, len(items), PAGE):
        page = items[start : start + PAGE]
        for item in page:
            if item.batch is not None:
                ingested = ingest(buffer, item.batch, item.batch_id)
                result.invalid_events += 0 if ingested.duplicate else ingested.invalid
                duplicate = ingested.duplicate
            else:
                assert item.event is not None, "only ready items are replayed"
                duplicate = buffer.apply([item.event], batch_id=item.batch_id).duplicate
            if duplicate:
                result.already_applied += 1
            else:
                result.applied += 1
        letters = [item.letter for item in page]
        result.removed += remove_dead_letters(buffer.scripts, buffer.keyspace, letters)
        if progress:
            progress(len(page))
    return result
