"""Retention: `EVENT_BUFFER_RETENTION_DAYS` keeps rows that many days after `created_at`.

ClickHouse deletes older rows through the table's TTL (`eventbuffer migrate`,
worker/sinks/migrations.py). An event already past it when it arrives would be
deleted at the next merge: ingest (and the importer) dead-letter it instead,
reason `past_retention`, by calling `check_retention` on each validated event.
"""

from __future__ import annotations

from worker.errors import InvalidEvent

REASON_PAST_RETENTION = "past_retention"
DAY_MS = 86_400_000


class PastRetention(InvalidEvent):
    """An event whose `created_at` is older than the retention: its dead-letter reason
    is `past_retention`, not `invalid_event`."""

    reason = REASON_PAST_RETENTION


def retention_cutoff_ms(now_ms: int, retention_days: int) -> int | None:
    """The oldest `created_at` (epoch ms) still kept at `now_ms`; None: kept forever."""
    return None if retention_days <= 0 else now_ms - retention_days * DAY_MS


def check_retention(created_ms: int, now_ms: int, retention_days: int) -> None:
    """Raise PastRetention if an event created at `created_ms` is past the retention."""
    cutoff = retention_cutoff_ms(now_ms, retention_days)
    if cutoff is not None and created_ms < cutoff:
        raise PastRetention(
            "created_at",
            f"older than the retention of {retention_days} days "
            "(EVENT_BUFFER_RETENTION_DAYS): ClickHouse would delete it at once",
        )
