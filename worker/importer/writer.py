"""Writing one chunk of an import into ClickHouse exactly once.

Through the flush's own sink (`Sink.write(rows, token)`), so every backend
and a cluster's Distributed table behave as for the flush. Before a chunk
is inserted the importer asks ClickHouse which of its ids the `events`
table has already (`existing_ids`): those are duplicates (a second import
of the same files, days later, whatever the dedup window remembers), and
are not inserted. The token of the insert is derived from the ids it
inserts, so a re-drive of the same rows after a crash carries the same
token and ClickHouse drops a block it has already stored.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Sequence

from worker.sinks import Sink

# Ids per existence query: keeps the SQL text under ClickHouse's default
# max_query_size (256 KiB) with room to spare.
IDS_PER_QUERY = 2_000
# Up to this many rows in a chunk's time range, their ids are read whole.
FETCH_ALL_MAX = 200_000


def quote(text: str) -> str:
    """A ClickHouse string literal."""
    escaped = text.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


def existing_ids(
    sink: Sink,
    ids: Sequence[str],
    projects: Iterable[str],
    first: str,
    end: str,
) -> set[str]:
    """Which of `ids` (canonical UUIDs) the table holds, for rows of `projects` created
    from `first` and before `end` (UTC date texts to the second, as DateTime values:
    ClickHouse 18.16 takes neither milliseconds in them nor a bare text against
    a sort key of `toDate(created_at)`): the primary key narrows the scan.

    One count first: none in the range (a first import) ends it. A range holding
    few rows has its ids read whole; a busier one is asked about the ids, a batch
    at a time (each query stays under ClickHouse's max_query_size)."""
    found: set[str] = set()
    where = (
        f"project_id IN ({', '.join(quote(p) for p in sorted(set(projects)))}) "
        f"AND created_at >= toDateTime({quote(first)}, 'UTC') "
        f"AND created_at < toDateTime({quote(end)}, 'UTC')"
    )
    table = f"`{sink.table}`"
    [(count,)] = sink.query(f"SELECT count() FROM {table} WHERE {where}")
    if not int(count):
        return found  # nothing there in the chunk's time range: the common case
    if int(count) <= FETCH_ALL_MAX:
        # Few rows in that range: read their ids and compare here (one query).
        wanted = set(ids)
        for (event_id,) in sink.query(f"SELECT toString(id) FROM {table} WHERE {where}"):
            if event_id in wanted:
                found.add(str(event_id))
        return found
    for start in range(0, len(ids), IDS_PER_QUERY):
        listed = ", ".join(f"'{i}'" for i in ids[start : start + IDS_PER_QUERY])
        rows = sink.query(
            f"SELECT DISTINCT toString(id) FROM {table} WHERE {where} AND id IN ({listed})"
        )
        found.update(str(row[0]) for row in rows)
    return found


def chunk_token(ids: Iterable[str]) -> str:
    """The dedup token of an insert: derived from the ids it inserts (order-free)."""
    # One update of the ids joined: the same digest as an update per id, in one call.
    digest = hashlib.sha256("".join(sorted(ids)).encode("ascii"))
    return f"import:{digest.hexdigest()[:48]}"
