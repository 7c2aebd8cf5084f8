"""Dead letters: events that cannot be written, kept with the reason.

An entry is a JSON header, a newline, then the raw payload exactly as it was
received or stored (it may be invalid JSON or invalid UTF-8: that may be why
it is here). Entries live in each shard's `dead` list; they are appended
atomically with the step that rejected them (apply_batch.lua at ingest,
ack.lua at flush), so a retried step never dead-letters twice.

Reading them back (`iter_dead_letters`, `read_dead_letter`), removing exactly
the entries read (`remove_dead_letters`, dlq_remove.lua) and replaying
those that now validate (`plan_replay`, `replay`) serve `eventbuffer dlq`.
A replayed entry is applied under a batch id derived from its bytes, so a
replay that is run again after a crash skips what it had applied (while the
batch marker lives, `EVENT_BUFFER_BATCH_MARKER_TTL_S`) and only removes it.
"""

from __future__ import annotations

import hashlib
import unicodedata
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import msgspec
from redis import Redis

from worker.buffer import EventBuffer
from worker.events import KIND_REGULAR, InvalidEvent, Limits, Row, encode_event, parse_event
from worker.keys import ShardKeys

REASON_INVALID_EVENT = "invalid_event"  # failed validation at ingest
REASON_INVALID_JSON = "invalid_json"  # a stored row that is not JSON (found at flush)
REASON_REJECTED = "rejected_by_clickhouse"  # ClickHouse refused the row
# Shown for an entry whose header cannot be decoded (not written by eventbuffer).
REASON_UNREADABLE = "unreadable"

MAX_ERROR_CHARS = 2000


class DeadLetter(msgspec.Struct, kw_only=True):
    """Header of a dead-letter entry; the raw payload follows it after a newline."""

    reason: str
    error: str
    source: str  # "ingest" or "flush"
    at: int  # epoch ms
    shard: int
    claim: str = ""  # the flush claim (flush) or ingest batch id (ingest)
    field: str = ""  # the offending field, when validation named one


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(DeadLetter)


def encode_dead_letter(header: DeadLetter, payload: bytes) -> bytes:
    if len(header.error) > MAX_ERROR_CHARS:
        header.error = header.error[:MAX_ERROR_CHARS] + "…"
    return _encoder.encode(header) + b"\n" + payload


def decode_dead_letter(entry: bytes) -> tuple[DeadLetter, bytes]:
    head, _, payload = entry.partition(b"\n")
    return _decoder.decode(head), payload


def dead_letter_counts(redis: Redis, shards: Sequence[ShardKeys]) -> dict[int, int]:
    pipe = redis.pipeline(transaction=False)
    for shard in shards:
        pipe.llen(shard.dead)
    return {s.shard: int(n) for s, n in zip(shards, pipe.execute(), strict=True)}


# -- reading ------------------------------------------------------------------------

# Entries read per LRANGE, and removed per dlq_remove.lua call.
PAGE = 1000


@dataclass(frozen=True)
class StoredDeadLetter:
    """One entry of a shard's dead-letter list, as it was read."""

    shard: int  # the shard whose list holds it (ingest entries say shard 0 in their header)
    index: int  # its position when read; entries before it may be removed meanwhile
    entry: bytes  # the exact stored value: header, newline, payload
    header: DeadLetter | None  # None when the header cannot be decoded
    payload: bytes

    @property
    def reason(self) -> str:
        return self.header.reason if self.header else REASON_UNREADABLE


def parse_entry(shard: int, index: int, entry: bytes) -> StoredDeadLetter:
    """Split a stored entry; one not written by `encode_dead_letter` keeps all as payload."""
    try:
        header, payload = decode_dead_letter(entry)
    except (msgspec.DecodeError, msgspec.ValidationError):
        return StoredDeadLetter(shard, index, entry, None, entry)
    return StoredDeadLetter(shard, index, entry, header, payload)


def iter_dead_letters(
    redis: Redis, shard: ShardKeys, reason: str | None = None
) -> Iterator[StoredDeadLetter]:
    """The shard's dead letters, oldest first, read a page at a time; `reason` filters."""
    start = 0
    while True:
        page = cast(list[bytes], redis.lrange(shard.dead, start, start + PAGE - 1))
        for offset, entry in enumerate(page):
            letter = parse_entry(shard.shard, start + offset, entry)
            if reason is None or letter.reason == reason:
                yield letter
        if len(page) < PAGE:
            return
        start += PAGE


def read_dead_letter(redis: Redis, shard: ShardKeys, index: int) -> StoredDeadLetter | None:
    entry = cast(bytes | None, redis.lindex(shard.dead, index))
    return None if entry is None else parse_entry(shard.shard, index, entry)


def remove_dead_letters(
    buffer: EventBuffer,
    letters: Sequence[StoredDeadLetter],
    progress: Callable[[int], None] | None = None,
) -> int:
    """Remove exactly these entries (by value; their index is a hint), a page at a time.

    Each page goes in one atomic script call. Returns how many were removed:
    fewer when some were removed by someone else since they were read.
    """
    removed = 0
    by_shard: dict[int, list[StoredDeadLetter]] = {}
    for letter in letters:
        by_shard.setdefault(letter.shard, []).append(letter)
    for shard_no, group in by_shard.items():
        shard = buffer.keyspace.shard(shard_no)
        for start in range(0, len(group), PAGE):
            page = group[start : start + PAGE]
            removed += buffer.scripts.dlq_remove(shard, [(d.index, d.entry) for d in page])
            if progress:
                progress(len(page))
    return removed


def reason_counts(letters: Sequence[StoredDeadLetter]) -> dict[str, int]:
    return dict(Counter(letter.reason for letter in letters).most_common())


def safe_text(data: bytes, limit: int | None = None) -> str:
    """Bytes as one line of text that cannot mislead a terminal.

    Invalid UTF-8 becomes `\\xNN`; control, format (bidi overrides,
    zero-width) and line-separator characters become `\\xNN`, `\\uNNNN` or
    `\\UNNNNNNNN` escapes, so an escape sequence in a payload is shown, never run.
    `limit` cuts the text (in characters) and marks the cut with `…`.
    """
    text = data.decode("utf-8", "backslashreplace")
    out: list[str] = []
    length = 0
    for char in text:
        if unicodedata.category(char) in ("Cc", "Cf", "Zl", "Zp", "Cs"):
            code = ord(char)
            if code < 0x100:
                char = f"\\x{code:02x}"
            else:
                char = f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"
        out.append(char)
        length += len(char)
        if limit is not None and length > limit:
            return "".join(out)[: limit - 1] + "…"
    return "".join(out)


# -- replay -------------------------------------------------------------------------


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
    error: str = ""  # why it cannot be replayed (it stays in the dead letters)

    @property
    def batch_id(self) -> str:
        """Derived from the entry alone, so a rerun, even with another fix, is skipped."""
        digest = hashlib.sha256(self.letter.entry).hexdigest()[:40]
        return f"dlq-replay:{self.letter.shard}:{digest}:{self.occurrence}"


@dataclass
class ReplayPlan:
    ready: list[ReplayItem] = field(default_factory=list)
    invalid: list[ReplayItem] = field(default_factory=list)
    # Fix-file ids that matched no chosen dead letter.
    unmatched_ids: list[str] = field(default_factory=list)
    # Chosen dead letters a fix file was given for but held no fixed version of.
    not_in_file: int = 0


@dataclass
class ReplayResult:
    applied: int = 0  # entries applied to the buffer now
    already_applied: int = 0  # entries a previous (interrupted) replay had applied
    removed: int = 0  # entries removed from the dead letters


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
        if fixes is not None:
            event_id = payload_event_id(letter.payload)
            if event_id is None or event_id not in fixes:
                plan.not_in_file += 1
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
            assert item.event is not None, "only ready items are replayed"
            applied = buffer.apply([item.event], batch_id=item.batch_id)
            if applied.duplicate:
                result.already_applied += 1
            else:
                result.applied += 1
        result.removed += remove_dead_letters(buffer, [item.letter for item in page])
        if progress:
            progress(len(page))
    return result
