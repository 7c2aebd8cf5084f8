"""Dead letters: events that cannot be written, kept with the reason.

An entry is a JSON header, a newline, then the raw payload exactly as it was
received or stored (it may be invalid JSON or invalid UTF-8: that may be why
it is here). Entries live in each shard's `dead` list; they are appended
atomically with the step that rejected them (apply_batch.lua at ingest,
ack.lua at flush), so a retried step never dead-letters twice.
"""

from __future__ import annotations

from collections.abc import Sequence

import msgspec
from redis import Redis

from worker.keys import ShardKeys

REASON_INVALID_EVENT = "invalid_event"  # failed validation at ingest
REASON_INVALID_JSON = "invalid_json"  # a stored row that is not JSON (found at flush)
REASON_REJECTED = "rejected_by_clickhouse"  # ClickHouse refused the row

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
