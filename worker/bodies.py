"""Task bodies as eventbuffer's workers decode them: the arguments stay raw JSON.

Celery decodes a task's body twice on its way to the task (the consumer's
strategy looks into `message.payload`, then the trace decodes the body
again), and then every event dict becomes an `Event`. For a body of 500
events, that is two full JSON decodes into dicts and 500 conversions. In
eventbuffer's workers the `application/json` decoder is this module's
`decode` instead, for every message (still JSON on the wire, senders
unchanged): a protocol 2 body `[args, kwargs, embed]` is decoded with its
positional arguments left as `msgspec.Raw` (the JSON text of each, sliced
without being parsed), so the second decode costs little and the ingest
task decodes its events straight from JSON into `Event`s (`worker.ingest`).
Anything else (protocol 1 bodies, remote control messages) is decoded as
kombu always did.

A body neither decoder can read whole (an event nested 1,000 levels deep,
NaN next to an integer of over 4,300 digits: each decoder refuses one of
them) is cut one level deep (`worker/json_slices.py`): a protocol 1 or 2
task body still yields its arguments, positional ones raw, and a keyword
argument that does not decode stays raw too. So one bad event in a batch is
refused by the ingest task on its own (an `invalid_event` dead letter), not
the whole message with its valid events. A body that is not a task body at
all still fails as before (an `undeliverable_task` dead letter).

`install()` switches a process over; eventbuffer's app does it when a worker
starts (`worker/celery.py`), so the CLI, Beat and producers are unaffected.
"""

from __future__ import annotations

from typing import Any

import msgspec
from kombu.serialization import registry
from kombu.utils import json as kombu_json

from worker.json_slices import JsonSliceError, split_array, split_object

_TASK_BODY = msgspec.json.Decoder(tuple[list[msgspec.Raw], msgspec.Raw, msgspec.Raw])


def decode(data: str | bytes) -> Any:
    """A JSON message body: a task body with raw positional arguments, else as kombu does."""
    try:
        args, kwargs, embed = _TASK_BODY.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError):
        try:
            return kombu_json.loads(data)
        except (ValueError, RecursionError) as exc:
            return _cut(data, exc)
    except RecursionError as exc:  # a positional argument nested too deep to skip over
        return _cut(data, exc)
    return args, _keywords(bytes(kwargs)), kombu_json.loads(bytes(embed))


def _cut(data: str | bytes, exc: Exception) -> Any:
    """A task body neither decoder read whole, cut one level deep; raises `exc` if it is none."""
    raw = data.encode("utf-8", "surrogatepass") if isinstance(data, str) else bytes(data)
    try:
        if raw.lstrip().startswith(b"["):  # protocol 2: [args, kwargs, embed]
            parts = split_array(raw)
            if len(parts) == 3:
                return _positional(parts[0]), _keywords(parts[1]), kombu_json.loads(parts[2])
        else:  # protocol 1: {"task": ..., "args": [...], "kwargs": {...}, ...}
            body: dict[str, Any] = {}
            for key, value in split_object(raw):
                name = kombu_json.loads(key)
                if name == "args":
                    body[name] = _positional(value)
                elif name == "kwargs":
                    body[name] = _keywords(value)
                else:
                    body[name] = kombu_json.loads(value)
            return body
    except (ValueError, RecursionError):  # JsonSliceError is one; so is json's own error
        pass
    raise exc


def _positional(raw: bytes) -> Any:
    """Positional arguments, each left raw; not a list at all: as kombu decodes it."""
    try:
        return [msgspec.Raw(arg) for arg in split_array(raw)]
    except JsonSliceError:
        return kombu_json.loads(raw)


def _keywords(raw: bytes) -> Any:
    """Keyword arguments as kombu decodes them; if it cannot, one by one, and a value it
    cannot decode stays raw JSON. (Not a mapping at all, such as celery-node's `null`:
    as decoded, for the consumer to refuse.)"""
    try:
        return kombu_json.loads(raw)
    except (ValueError, RecursionError):
        pass
    keywords: dict[str, Any] = {}
    for key, value in split_object(raw):
        try:
            keywords[kombu_json.loads(key)] = kombu_json.loads(value)
        except (ValueError, RecursionError):
            keywords[kombu_json.loads(key)] = msgspec.Raw(value)
    return keywords


def install() -> None:
    """Decode JSON message bodies with `decode` in this process (and the ones it forks).

    A raw argument sent on again (a task's retry re-publishes its arguments)
    is encoded as the JSON it holds.
    """
    kombu_json.register_type(msgspec.Raw, None, msgspec.json.decode)
    registry.register(
        "json",
        kombu_json.dumps,
        decode,
        content_type="application/json",
        content_encoding="utf-8",
    )
