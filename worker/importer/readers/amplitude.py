"""`--format amplitude`: Amplitude's Export API files (gzip NDJSON, one event per line).

Fields used: `event_type`, `event_time` (UTC, `YYYY-MM-DD HH:MM:SS.ffffff`),
`user_id`, `device_id`, `session_id` (the session's start in epoch ms; -1
for none), `event_properties`, `uuid`, `os_name`, `os_version`,
`device_type`, `device_brand`, `device_model`, `city`, `region`, `country`,
`location_lat`, `location_lng`, `library`, `version_name` (README,
"Importing history", has the whole mapping and its sources). A page view
(`[Amplitude] Page Viewed`, or `Page View`) becomes a `screen_view` with
`path`/`origin` from its `[Amplitude] Page URL` property. The event's id is
its `uuid`. A session is the device's (or user's) `session_id`; events
without one get sessions derived by a 30-minute gap.
"""

from __future__ import annotations

from collections.abc import Iterator
from functools import partial
from typing import Any, BinaryIO

import msgspec

from worker.importer.readers import ReaderOptions, Record, lines
from worker.importer.readers._mapping import country_code, split_url, text
from worker.importer.rows import stable_id

PAGE_VIEWS = frozenset({"[Amplitude] Page Viewed", "Page View", "page_view", "Viewed Page"})
SESSION_END = "session_end"
PAGE_URL = "[Amplitude] Page URL"
PAGE_PATH = "[Amplitude] Page Path"

COLUMNS = {
    "os_name": "os",
    "os_version": "os_version",
    "device_type": "device",
    "device_brand": "brand",
    "device_manufacturer": "brand",
    "device_model": "model",
    "city": "city",
    "region": "region",
    "library": "sdk_name",
    "version_name": "sdk_version",
}


def read(stream: BinaryIO, options: ReaderOptions, skip: int) -> Iterator[Record]:
    for number, line in lines(stream, skip):
        try:
            obj = msgspec.json.decode(line)
        except (msgspec.DecodeError, RecursionError) as exc:
            yield Record(number, None, None, "", f"not valid JSON: {exc}", line)
            continue
        if not isinstance(obj, dict):
            yield Record(number, None, None, "", "not an Amplitude event object", line)
            continue
        event, actor = _map(obj, options)
        uuid = obj.get("uuid")
        if isinstance(uuid, str) and uuid:
            event["id"] = uuid
            default_id = None
        else:
            default_id = partial(stable_id, "amplitude", options.name, number, line)
        yield Record(number, event, default_id, actor, None, line)


def _map(obj: dict[str, Any], options: ReaderOptions) -> tuple[dict[str, Any], str]:
    name = obj.get("event_type")
    props = obj.get("event_properties")
    props = dict(props) if isinstance(props, dict) else {}
    user_id = text(obj.get("user_id"))
    device_id = text(obj.get("device_id"))
    event: dict[str, Any] = {
        "project_id": options.project_id,
        "name": "screen_view" if name in PAGE_VIEWS else name,
        "created_at": obj.get("event_time"),
        "profile_id": user_id,
        "device_id": device_id,
    }
    url = props.get(PAGE_URL)
    if isinstance(url, str) and url:
        event["origin"], event["path"] = split_url(url)
    elif isinstance(props.get(PAGE_PATH), str):
        event["path"] = props[PAGE_PATH]
    for source, column in COLUMNS.items():
        value = obj.get(source)
        if value not in (None, "") and column not in event:
            event[column] = text(value)
    country = obj.get("country")
    if country_code(country):
        event["country"] = country_code(country)
    elif country:
        props["country"] = text(country)  # a name ("United States"): kept, not a column
    for source, column in (("location_lat", "latitude"), ("location_lng", "longitude")):
        value = obj.get(source)
        if isinstance(value, int | float) and not isinstance(value, bool):
            event[column] = value
    user_props = obj.get("user_properties")
    if isinstance(user_props, dict) and user_props:
        props["user"] = user_props
    event["properties"] = props
    actor = device_id or user_id
    session = obj.get("session_id")
    if isinstance(session, int) and not isinstance(session, bool) and session > 0 and actor:
        event["session_id"] = stable_id(
            "amplitude-session", options.project_id or "", actor, session
        )
        return event, ""
    return event, actor
