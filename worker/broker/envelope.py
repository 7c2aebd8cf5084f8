"""kombu's message envelope as it sits in a queue list: what must hold before it is delivered.

A stock kombu sender writes each message as JSON:
`{"body": "<str>", "content-type": ..., "content-encoding": ..., "headers":
{...}, "properties": {"delivery_tag": "<uuid>", "body_encoding": "base64",
"delivery_info": {...}, ...}}`. Anyone who can write to the broker can write
anything else there; kombu then fails in places no consumer guards (an
unhashable delivery tag in its QoS, an unknown body encoding in its
Message), and a worker that dies on a message it put back at shutdown dies
on it again after every restart. So the reliable transport checks the
envelope (`envelope_problem`) and its size (`oversized_record`) before it
decodes or delivers anything, and parks what fails, never delivering it.

Only kombu's part is checked here; Celery's headers are `worker.consumer`'s.
"""

from __future__ import annotations

from typing import Any

import msgspec

#: Body encodings kombu's virtual transports decode (`Channel.codecs`, plus none).
BODY_ENCODINGS = ("base64", "utf-8")
#: An oversized message's parked record keeps at most this many of its first bytes.
OVERSIZED_HEAD_BYTES = 1 << 20
#: ... and this many of its last ones in its header line (kombu writes the headers and
#: properties, which name the task, after the body).
OVERSIZED_TAIL_BYTES = 2048


def _kind(value: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", type(None): "null"}.get(
        type(value), f"a {type(value).__name__}"
    )


def envelope_problem(payload: Any) -> str | None:
    """Why kombu cannot deliver this decoded envelope, or None when it can."""
    if not isinstance(payload, dict):
        return f"the message is {_kind(payload)}, not a kombu envelope (an object)"
    properties = payload.get("properties")
    if not isinstance(properties, dict):
        return f"properties is {_kind(properties)}, not an object"
    tag = properties.get("delivery_tag")
    if not isinstance(tag, str) or not tag:
        return f"properties.delivery_tag is {_kind(tag)}, not a non-empty string"
    body = payload.get("body")
    if not isinstance(body, str):
        return f"body is {_kind(body)}, not a string"
    encoding = properties.get("body_encoding")
    if encoding is not None and (
        not isinstance(encoding, str) or encoding.lower() not in BODY_ENCODINGS
    ):
        return f"properties.body_encoding {encoding!r:.60} is not one kombu decodes"
    headers = payload.get("headers")
    if headers is not None and not isinstance(headers, dict):
        return f"headers is {_kind(headers)}, not an object"
    info = properties.get("delivery_info")
    if info is not None and not isinstance(info, dict):
        return f"properties.delivery_info is {_kind(info)}, not an object"
    for field in ("content-type", "content-encoding"):
        value = payload.get(field)
        if value is not None and not isinstance(value, str):
            return f"{field} is {_kind(value)}, not a string"
    return None


class OversizedHeader(msgspec.Struct):
    """The first line of an oversized message's parked record; its first bytes follow."""

    eventbuffer: str  # "message too large: cut"
    bytes: int  # the message's size
    limit: int  # EVENT_BUFFER_MAX_MESSAGE_BYTES
    kept: int  # how many of its first bytes follow the line
    tail: str  # its last bytes (headers, properties), as text


def oversized_record(raw: bytes, limit: int) -> bytes:
    """What is parked for a message over `limit` bytes: one JSON line saying so (with the
    message's last bytes), then its first bytes. Not a kombu envelope: moved back to a
    queue, it is parked again."""
    kept = min(len(raw), limit, OVERSIZED_HEAD_BYTES)
    header = OversizedHeader(
        eventbuffer="message too large: cut",
        bytes=len(raw),
        limit=limit,
        kept=kept,
        tail=raw[-OVERSIZED_TAIL_BYTES:].decode("utf-8", "backslashreplace"),
    )
    return msgspec.json.encode(header) + b"\n" + raw[:kept]
