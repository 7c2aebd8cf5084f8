"""`--format mixpanel`: Mixpanel's raw event export (NDJSON, `/api/2.0/export`).

Each line is `{"event": NAME, "properties": {"time": <epoch s>, "distinct_id",
"$insert_id", "$current_url", "$browser", "$os", "$city", "mp_country_code",
...}}` (README, "Importing history", has the whole mapping and its sources).
Mixpanel has no sessions: they are derived per device (`$device_id`, else
`distinct_id`) by a 30-minute gap. An event's id is derived from what
Mixpanel itself deduplicates on (name, distinct_id, time, `$insert_id`), or,
without an `$insert_id`, from its line and content.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any, BinaryIO

import msgspec

from worker.importer.readers import ReaderOptions, Record, lines
from worker.importer.readers._mapping import country_code, epoch_ms, split_url, text
from worker.importer.rows import stable_id

PAGE_VIEW = "$mp_web_page_view"

# Mixpanel property -> eventbuffer column (the rest stay in `properties`).
COLUMNS = {
    "$browser": "browser",
    "$browser_version": "browser_version",
    "$os": "os",
    "$city": "city",
    "$region": "region",
    "$referrer": "referrer",
    "$referring_domain": "referrer_name",
    "$device": "device",
    "$model": "model",
    "$manufacturer": "brand",
    "mp_lib": "sdk_name",
    "$lib_version": "sdk_version",
}
# Consumed by the mapping itself, not kept in `properties`.
CONSUMED = {"time", "distinct_id", "$insert_id", "$current_url", "mp_country_code", "$device_id"}


def read(stream: BinaryIO, options: ReaderOptions, skip: int) -> Iterator[Record]:
    for number, line in lines(stream, skip):
        try:
            obj = msgspec.json.decode(line)
        except (msgspec.DecodeError, RecursionError) as exc:
            yield Record(number, None, None, "", f"not valid JSON: {exc}", line)
            continue
        if not isinstance(obj, dict) or not isinstance(obj.get("properties"), dict):
            yield Record(number, None, None, "", "not a Mixpanel event: no properties", line)
            continue
        event, actor, default_id = _map(obj, options, number, line)
        yield Record(number, event, default_id, actor, None, line)


def _map(
    obj: dict[str, Any], options: ReaderOptions, number: int, line: bytes
) -> tuple[dict[str, Any], str, Any]:
    props: dict[str, Any] = obj["properties"]
    name = obj.get("event")
    distinct_id = text(props.get("distinct_id"))
    device_id = text(props.get("$device_id")) or distinct_id
    event: dict[str, Any] = {
        "project_id": options.project_id,
        "name": "screen_view" if name == PAGE_VIEW else name,
        "created_at": epoch_ms(props.get("time")),
        "profile_id": distinct_id,
        "device_id": device_id,
    }
    url = props.get("$current_url")
    if isinstance(url, str) and url:
        event["origin"], event["path"] = split_url(url)
    country = country_code(props.get("mp_country_code"))
    if country:
        event["country"] = country
    for source, column in COLUMNS.items():
        value = props.get(source)
        if value is not None:
            event[column] = text(value)
    event["properties"] = {
        key: value for key, value in props.items() if key not in CONSUMED and key not in COLUMNS
    }
    insert_id = props.get("$insert_id")
    if insert_id is not None:
        default_id = partial(
            stable_id, "mixpanel", text(name), distinct_id, text(props.get("time")), text(insert_id)
        )
    else:
        default_id = partial(stable_id, "mixpanel", options.name, number, line)
    return event, device_id, default_id
