"""Dead letters: events that cannot be written, kept with the reason.

An entry is a JSON header, a newline, then the raw payload exactly as it was
received or stored (it may be invalid JSON or invalid UTF-8: that may be why
it is here). Entries live in each shard's `dead` list; they are appended
atomically with the step that rejected them (the apply transaction at ingest,
ack.lua at flush), so a retried step never dead-letters twice.

Reading them back (`iter_dead_letters`, `read_dead_letter`) and removing
exactly the entries read (`remove_dead_letters`, dlq_remove.lua) serve
`eventbuffer dlq`; replaying them is `worker/replay.py`.
"""

from __future__ import annotations

import hashlib
import unicodedata
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import cast

import msgspec

from worker.keys import Keyspace, ShardKeys
from worker.retention import REASON_PAST_RETENTION
from worker.scripts import Scripts
from worker.topology import Client

REASON_INVALID_EVENT = "invalid_event"  # failed validation at ingest
REASON_INVALID_JSON = "invalid_json"  # a stored row that is not JSON (found at flush)
REASON_REJECTED = "rejected_by_clickhouse"  # ClickHouse refused the row
# A whole batch: its ingest task kept failing on an unexpected error (the raw batch).
REASON_INGEST_FAILED = "ingest_failed"
# A whole task message Celery could not run (bad body, kwargs, encoding): its raw body.
REASON_UNDELIVERABLE = "undeliverable_task"
# A whole batch whose batch id had been applied before with other content (a producer
# reusing ids): nothing of it was applied; replayed under a new batch id.
REASON_BATCH_ID_CONFLICT = "batch_id_conflict"
# Every reason eventbuffer stores, in the order the metrics and the CLI list them.
REASONS = (
    REASON_INVALID_EVENT,
    REASON_INGEST_FAILED,
    REASON_UNDELIVERABLE,
    REASON_BATCH_ID_CONFLICT,
    REASON_INVALID_JSON,
    REASON_REJECTED,
    REASON_PAST_RETENTION,  # older than EVENT_BUFFER_RETENTION_DAYS at ingest (worker/retention.py)
)
# Reasons whose payload is a batch (or a task body holding one), not one event.
BATCH_REASONS = frozenset({REASON_INGEST_FAILED, REASON_UNDELIVERABLE, REASON_BATCH_ID_CONFLICT})
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
    claim: str = ""  # the flush claim (flush) or ingest batch id / task id (ingest)
    field: str = ""  # the offending field, when validation named one
    task: str = ""  # the task the message was addressed to (a batch dead letter)


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(DeadLetter)


def encode_dead_letter(header: DeadLetter, payload: bytes) -> bytes:
    if len(header.error) > MAX_ERROR_CHARS:
        header.error = header.error[:MAX_ERROR_CHARS] + "…"
    return _encoder.encode(header) + b"\n" + payload


def decode_dead_letter(entry: bytes) -> tuple[DeadLetter, bytes]:
    head, _, payload = entry.partition(b"\n")
    return _decoder.decode(head), payload


# -- reading ------------------------------------------------------------------------

# Entries read per LRANGE, and removed per dlq_remove.lua call.
PAGE = 1000


# Hex digits of an entry's SHA-256 in its id.
ID_DIGITS = 12


def letter_id(entry: bytes, occurrence: int = 0) -> str:
    """The id of a dead letter: a digest of its bytes, and which copy of them it is.

    An index shifts as entries before it are removed; the id does not. Equal
    entries of one shard (two equal invalid events of a batch) are told apart
    by a suffix: `…-2` is the second copy, counted from the oldest.
    """
    digest = hashlib.sha256(entry).hexdigest()[:ID_DIGITS]
    return digest if occurrence == 0 else f"{digest}-{occurrence + 1}"


@dataclass(frozen=True)
class StoredDeadLetter:
    """One entry of a shard's dead-letter list, as it was read."""

    shard: int  # the shard whose list holds it
    index: int  # its position when read; entries before it may be removed meanwhile
    entry: bytes  # the exact stored value: header, newline, payload
    header: DeadLetter | None  # None when the header cannot be decoded
    payload: bytes
    # Entries before it in the shard's list with exactly the same bytes.
    occurrence: int = 0

    @property
    def reason(self) -> str:
        return self.header.reason if self.header else REASON_UNREADABLE

    @property
    def id(self) -> str:
        return letter_id(self.entry, self.occurrence)


def parse_entry(shard: int, index: int, entry: bytes, occurrence: int = 0) -> StoredDeadLetter:
    """Split a stored entry; one not written by `encode_dead_letter` keeps all as payload.

    Never raises: whatever the entry holds, it can be listed, shown and removed.
    """
    try:
        header, payload = decode_dead_letter(entry)
    except (msgspec.DecodeError, RecursionError):  # ValidationError is a DecodeError
        return StoredDeadLetter(shard, index, entry, None, entry, occurrence)
    return StoredDeadLetter(shard, index, entry, header, payload, occurrence)


def iter_dead_letters(
    redis: Client, shard: ShardKeys, reason: str | None = None
) -> Iterator[StoredDeadLetter]:
    """The shard's dead letters, oldest first, read a page at a time; `reason` filters."""
    start = 0
    seen: Counter[bytes] = Counter()  # digests of the entries read so far
    while True:
        page = cast(list[bytes], redis.lrange(shard.dead, start, start + PAGE - 1))
        for offset, entry in enumerate(page):
            digest = hashlib.sha256(entry).digest()
            letter = parse_entry(shard.shard, start + offset, entry, seen[digest])
            seen[digest] += 1
            if reason is None or letter.reason == reason:
                yield letter
        if len(page) < PAGE:
            return
        start += PAGE


def read_dead_letter(redis: Client, shard: ShardKeys, index: int) -> StoredDeadLetter | None:
    """The entry at `index` of the shard's list, or None (LPOS counts equal ones before it)."""
    entry = cast(bytes | None, redis.lindex(shard.dead, index))
    if entry is None:
        return None
    # redis-py sends bytes as they are (its stubs say str).
    before = redis.lpos(shard.dead, cast(str, entry), count=0, maxlen=index) if index else []
    return parse_entry(shard.shard, index, entry, len(cast(list[int], before or [])))


def remove_dead_letters(
    scripts: Scripts,
    keyspace: Keyspace,
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
        shard = keyspace.shard(shard_no)
        for start in range(0, len(group), PAGE):
            page = group[start : start + PAGE]
            removed += scripts.dlq_remove(shard, [(d.index, d.entry) for d in page])
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
    if limit is not None:  # the first `limit` characters lie in these bytes
        data = data[: 4 * limit + 4]
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
