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


def quote(text: str) -> str:
    """A ClickHouse string literal."""
    escaped = text.replace("\\", "\\\\").replace("'", "\\'")
    return f"'{escaped}'"


def existing_ids(
    sink: Sink,
    ids: Sequence[str],
    projects: Iterable[str],
    first: str,
    last: str,
) -> set[str]:
    """Which of `ids` (canonical UUIDs) the table holds, for rows of `projects` created
    from `first` to `last` (stored date texts): the primary key narrows the scan."""
    found: set[str] = set()
    where_projects = ", ".join(quote(p) for p in sorted(set(projects)))
    table = f"`{sink.table}`"
    for start in range(0, len(ids), IDS_PER_QUERY):
        batch = ids[start : start + IDS_PER_QUERY]
        listed = ", ".join(f"'{i}'" for i in batch)
        rows = sink.query(
            f"SELECT DISTINCT toString(id) FROM {table} "
            f"WHERE project_id IN ({where_projects}) "
            f"AND created_at >= {quote(first)} AND created_at <= {quote(last)} "
            f"AND id IN ({listed})"
        )
        found.update(str(row[0]) for row in rows)
    return found


def chunk_token(ids: Iterable[str]) -> str:
    """The dedup token of an insert: derived from the ids it inserts (order-free)."""
    digest = hashlib.sha256()
    for event_id in sorted(ids):
        digest.update(event_id.encode("ascii"))
    return f"import:{digest.hexdigest()[:48]}"
