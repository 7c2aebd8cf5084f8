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

`install()` switches a process over; eventbuffer's app does it when a worker
starts (`worker/celery.py`), so the CLI, Beat and producers are unaffected.
"""

from __future__ import annotations

from typing import Any

import msgspec
from kombu.serialization import registry
from kombu.utils import json as kombu_json

_TASK_BODY = msgspec.json.Decoder(tuple[list[msgspec.Raw], msgspec.Raw, msgspec.Raw])


def decode(data: str | bytes) -> Any:
    """A JSON message body: a task body with raw positional arguments, else as kombu does."""
    try:
        args, kwargs, embed = _TASK_BODY.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return kombu_json.loads(data)
    return args, kombu_json.loads(bytes(kwargs)), kombu_json.loads(bytes(embed))


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
