"""`--format umami`: Umami's CSV data export (one row per website event, with its session).

Columns used: `website_id` (the `project_id` unless `--project` is given),
`session_id`, `event_id`, `created_at` (UTC), `url_path`, `url_query`,
`hostname`, `referrer_domain`, `referrer_path`, `page_title`, `event_type`
(1: page view, 2: custom event), `event_name`, `browser`, `os`, `device`,
`country`, `region`, `city`, `distinct_id` (README, "Importing history",
has the whole mapping and its sources). A page view becomes a `screen_view`;
a custom event keeps its `event_name`. Umami's `event_id` is the id; its
sessions are kept as they are.
"""

from __future__ import annotations

import csv
import io
from collections.abc import Iterator
from functools import partial
from typing import Any, BinaryIO

from worker.importer.readers import ReaderOptions, Record
from worker.importer.readers._mapping import country_code
from worker.importer.rows import stable_id
from worker.importer.sources import iter_lines

PAGE_VIEW = "1"
CUSTOM_EVENT = "2"

COLUMNS = {
    "browser": "browser",
    "os": "os",
    "device": "device",
    "city": "city",
    "region": "region",
    "distinct_id": "profile_id",
}
# Consumed by the mapping itself, not kept in `properties`.
CONSUMED = {
    "website_id",
    "session_id",
    "event_id",
    "created_at",
    "url_path",
    "hostname",
    "referrer_domain",
    "referrer_path",
    "event_type",
    "event_name",
    "country",
    *COLUMNS,
}


def read(stream: BinaryIO, options: ReaderOptions, skip: int) -> Iterator[Record]:
    text_lines = (line.decode("utf-8", "replace") + "\n" for line in iter_lines(stream))
    rows = csv.reader(text_lines)
    header = next(rows, None)
    if header is None:
        return
    header = [name.strip().lstrip("\ufeff") for name in header]
    for number, values in enumerate(rows, 1):
        if number <= skip or not values:
            continue
        raw = _raw(values)
        if len(values) != len(header):
            yield Record(
                number, None, None, "", f"{len(values)} columns, the header has {len(header)}", raw
            )
            continue
        row = dict(zip(header, values, strict=True))
        event = _map(row, options)
        if row.get("event_id"):
            event["id"] = row["event_id"]
            default_id = None
        else:
            default_id = partial(stable_id, "umami", options.name, number, raw)
        yield Record(number, event, default_id, "", None, raw)


def _raw(values: list[str]) -> str:
    out = io.StringIO()
    csv.writer(out).writerow(values)
    return out.getvalue().rstrip("\r\n")


def _map(row: dict[str, str], options: ReaderOptions) -> dict[str, Any]:
    kind = row.get("event_type", "").strip()
    event: dict[str, Any] = {
        "project_id": options.project_id or row.get("website_id", ""),
        "name": "screen_view" if kind == PAGE_VIEW else (row.get("event_name") or "event"),
        "created_at": row.get("created_at", ""),
        "session_id": row.get("session_id", ""),
        "path": row.get("url_path", ""),
    }
    hostname = row.get("hostname", "")
    if hostname:
        event["origin"] = f"https://{hostname}"
    domain = row.get("referrer_domain", "")
    if domain:
        event["referrer"] = f"https://{domain}{row.get('referrer_path', '')}"
        event["referrer_name"] = domain
    country = country_code(row.get("country"))
    if country:
        event["country"] = country
    for source, column in COLUMNS.items():
        if row.get(source):
            event[column] = row[source]
    event["properties"] = {
        key: value for key, value in row.items() if key not in CONSUMED and value != ""
    }
    return event
