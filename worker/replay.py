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
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import msgspec

from worker.bodies import body_batch
from worker.buffer import EventBuffer
from worker.deadletters import (
    BATCH_REASONS,
    PAGE,
    REASON_BATCH_ID_CONFLICT,
    REASON_UNDELIVERABLE,
    StoredDeadLetter,
    remove_dead_letters,
)
from worker.errors import InvalidEvent, TaskBodyError
from worker.events import Limits, Row, encode_event, parse_event
from worker.ingestion import ingest
from worker.json_slices import JsonSliceError, split_array, split_object
from worker.logs import one_line
from worker.redis_errors import REDIS_FAILURES


class QueuedRow(Row):
    """A row that went through the buffer's rules already (a flush dead letter).

    Applied again, it is queued as it is: as a screen_view it would become its
    session's last view once more, and its duration be recomputed against
    views that came after it.
    """

    queued_as_is: ClassVar[bool] = True


@dataclass
class ReplayItem:
    """A dead letter chosen for replay, with the event it becomes or why it cannot."""

    letter: StoredDeadLetter
    payload: bytes  # the entry's payload, or its corrected version from a fix file
    fixed: bool  # the payload comes from a fix file
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
        # `occurrence`: earlier entries of the same shard with exactly the same
        # bytes (two equal invalid events of one batch): each is an event of its own.
        return f"dlq-replay:{self.letter.shard}:{digest}:{self.letter.occurrence}"


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
    # Items that failed when applied, with why (`error`): they stay dead letters.
    failed: list[ReplayItem] = field(default_factory=list)


def canonical_id(value: Any) -> str | None:
    """An event id in its canonical UUID form, or None when it is not a UUID string."""
    if not isinstance(value, str):
        return None
    try:
        return str(uuid.UUID(value))
    except ValueError:
        return None


class _IdOnly(msgspec.Struct):
    """Only the `id` of a payload: decoding it skips (and so never builds) the rest."""

    id: Any = None


_id_decoder = msgspec.json.Decoder(_IdOnly)


def payload_event_id(payload: bytes) -> str | None:
    """The `id` of a dead letter's payload, when it is a JSON object with a UUID id.

    None for anything else, whatever the payload holds (not JSON, nested too
    deep, numbers out of range: only the id is decoded when it can be).
    """
    try:
        obj = _id_decoder.decode(payload)
    except (msgspec.DecodeError, RecursionError):
        return _sliced_id(payload)
    return canonical_id(obj.id)


def _sliced_id(payload: bytes) -> str | None:
    """The id of an object msgspec cannot skip through (a member nested too deep)."""
    try:
        for key, value in split_object(payload):
            if msgspec.json.decode(key) == "id":
                return canonical_id(msgspec.json.decode(value))
    except (ValueError, RecursionError):  # not an object, or its id is no JSON string
        pass
    return None


def validate_payload(payload: bytes, limits: Limits, already_queued: bool) -> Row:
    """The event a payload makes, as ingest would accept it; raises InvalidEvent.

    Only JSON objects count, as at ingest (JSON text inside a JSON string is
    no event); they are decoded as ingest decodes an item of a batch, so
    what ingest refuses (nesting too deep, NaN, huge integers) is refused
    here as invalid, never raised. `already_queued` payloads (flush dead
    letters) become `QueuedRow`s.
    """
    if not payload.lstrip().startswith(b"{"):
        try:
            obj = msgspec.json.decode(payload)
        except (msgspec.DecodeError, RecursionError) as exc:
            raise InvalidEvent("$", f"not valid JSON: {one_line(exc)}") from None
        raise InvalidEvent("$", f"an event must be an object, got {type(obj).__name__}")
    event = parse_event(payload, limits)
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
    for letter in letters:
        try:
            _plan_letter(plan, letter, limits, fixes, matched)
        except Exception as exc:  # one letter's content never stops the plan
            error = f"cannot be read for a replay: {type(exc).__name__}: {one_line(exc)}"
            plan.invalid.append(ReplayItem(letter, letter.payload, False, error=error))
    if fixes is not None:
        plan.unmatched_ids = [i for i in fixes if i not in matched]
    return plan


def _plan_letter(
    plan: ReplayPlan,
    letter: StoredDeadLetter,
    limits: Limits,
    fixes: Mapping[str, bytes] | None,
    matched: set[str],
) -> None:
    """Add `letter` to the plan: ready, invalid (with why), or left out (no fix for it)."""
    payload, fixed = letter.payload, False
    if letter.reason in BATCH_REASONS:
        if fixes is None:  # a fix file corrects single events, matched by id
            _plan_batch(plan, ReplayItem(letter, payload, False))
        return
    if fixes is not None:
        event_id = payload_event_id(letter.payload)
        if event_id is None or event_id not in fixes:
            return
        payload, fixed = fixes[event_id], True
        matched.add(event_id)
    item = ReplayItem(letter, payload, fixed)
    if letter.header is None:
        item.error = "the entry's header cannot be decoded"
        plan.invalid.append(item)
        return
    try:
        item.event = validate_payload(payload, limits, letter.header.source == "flush")
    except InvalidEvent as exc:
        item.error = str(exc)
        plan.invalid.append(item)
        return
    plan.ready.append(item)


def _plan_batch(plan: ReplayPlan, item: ReplayItem) -> None:
    """A batch dead letter is ready when its batch can be read; its events are checked later."""
    header = item.letter.header
    assert header is not None  # a batch reason comes from a decoded header
    try:
        if header.reason == REASON_UNDELIVERABLE:
            item.batch = body_batch(header.task, item.payload)
        else:
            item.batch = stored_batch(item.payload)
    except TaskBodyError as exc:
        item.error = str(exc)
        plan.invalid.append(item)
        return
    plan.ready.append(item)


def stored_batch(payload: bytes) -> Any:
    """An `ingest_failed` dead letter's batch, as `ingest()` takes it; raises TaskBodyError.

    A batch msgspec cannot decode whole (an event nested too deep, NaN, a
    huge integer) is cut into the JSON text of its events, each then judged
    on its own by `ingest()`.
    """
    try:
        return msgspec.json.decode(payload)
    except (msgspec.DecodeError, RecursionError) as exc:
        try:
            return split_array(payload)
        except JsonSliceError:
            raise TaskBodyError(f"the batch is not JSON: {one_line(exc)}") from None


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
        done: list[StoredDeadLetter] = []
        for item in page:
            try:
                duplicate = _apply(buffer, item, result)
            except REDIS_FAILURES:
                raise
            except Exception as exc:  # one letter never stops the others
                item.error = f"{type(exc).__name__}: {one_line(exc)}"
                result.failed.append(item)
                continue
            done.append(item.letter)
            if duplicate:
                result.already_applied += 1
            else:
                result.applied += 1
        result.removed += remove_dead_letters(buffer.scripts, buffer.keyspace, done)
        if progress:
            progress(len(page))
    return result


def _apply(buffer: EventBuffer, item: ReplayItem, result: ReplayResult) -> bool:
    """Apply one ready item; True when its batch id had been applied before."""
    if item.batch is not None:
        ingested = ingest(buffer, item.batch, item.batch_id)
        result.invalid_events += 0 if ingested.duplicate else ingested.invalid
        return ingested.duplicate
    assert item.event is not None, "only ready items are replayed"
    return buffer.apply([item.event], batch_id=item.batch_id).duplicate
