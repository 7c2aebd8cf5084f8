"""Task bodies: the one place that reads them.

Everything eventbuffer knows about the body of an ingest task is here: how a
worker decodes it (`decode`, installed as kombu's JSON decoder in
eventbuffer's workers), whether its arguments fit the task (`call_problem`,
for the consumer's strategy), the items of its batch (`items`: a list, a
JSON array as text or left raw, any other value as one item), a stored
body's batch for a replay (`body_batch`), and a batch as the JSON bytes a
dead letter keeps (`batch_bytes`, `item_json`).

Decoding: the arguments stay raw JSON.

Celery decodes a task's body twice on its way to the task (the consumer's
strategy looks into `message.payload`, then the trace decodes the body
again), and then every event dict becomes an `Event`. For a body of 500
events, that is two full JSON decodes into dicts and 500 conversions. In
eventbuffer's workers the `application/json` decoder is this module's
`decode` instead, for every message (still JSON on the wire, senders
unchanged): a protocol 2 body `[args, kwargs, embed]` is decoded with its
positional arguments left as `msgspec.Raw` (the JSON text of each, sliced
without being parsed), so the second decode costs little and the ingest
task decodes its events straight from JSON into `Event`s (`worker.ingestion`).
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

import hashlib
import inspect
import json
from typing import Any

import msgspec
from kombu.serialization import registry
from kombu.utils import json as kombu_json

from worker.errors import TaskBodyError
from worker.json_slices import JsonSliceError, split_array, split_object
from worker.logs import one_line
from worker.names import TASK_INGEST_EVENT

_TASK_BODY = msgspec.json.Decoder(tuple[list[msgspec.Raw], msgspec.Raw, msgspec.Raw])
_RAW_ITEMS = msgspec.json.Decoder(list[msgspec.Raw])
_ANY = msgspec.json.Decoder()

# Batch ids become part of a Redis key. A task's batch_id argument must be a string of
# printable characters no longer than this (else the task is undeliverable); a task id
# (the batch id when the argument is absent) that is not is replaced by its digest.
MAX_BATCH_ID_CHARS = 200


# The last task body decoded, and what it gave. Celery decodes a message's body
# twice in the same process (the strategy's `message.payload`, then the trace,
# with the very same body object): the second time costs nothing. Held by
# reference, so its id cannot be reused by another body while it is kept.
_last: tuple[Any, Any] = (None, None)


def decode(data: str | bytes) -> Any:
    """A JSON message body: a task body with raw positional arguments, else as kombu does."""
    global _last
    last = _last
    if data is last[0]:
        return last[1]
    try:
        args, kwargs, embed = _TASK_BODY.decode(data)
    except (msgspec.ValidationError, msgspec.DecodeError):
        try:
            return kombu_json.loads(data)
        except (ValueError, RecursionError) as exc:
            return _cut(data, exc)
    except RecursionError as exc:  # a positional argument nested too deep to skip over
        return _cut(data, exc)
    decoded = args, _keywords(bytes(kwargs)), kombu_json.loads(bytes(embed))
    _last = (data, decoded)
    return decoded


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


# -- the arguments: do they fit the task, and the batch they carry ---------------------


def call_problem(signature: inspect.Signature, payload: Any) -> str | None:
    """Why a decoded task body cannot call a task of this signature, or None when it can.

    Protocol 2 bodies are `[args, kwargs, embed]`; protocol 1 bodies a dict
    with `args` and `kwargs` (missing ones are empty). A `batch_id` argument
    must be a short string of printable characters (or absent): anything
    else would become the id of the batch, and be none.
    """
    if isinstance(payload, list | tuple) and len(payload) == 3:
        args, kwargs = payload[0], payload[1]
    elif isinstance(payload, dict):
        args, kwargs = payload.get("args", ()), payload.get("kwargs", {})
    else:
        return "the body is neither a protocol 1 nor a protocol 2 task body"
    if not isinstance(args, list | tuple):
        return f"the task's arguments are not a list (got {type(args).__name__})"
    if not isinstance(kwargs, dict):
        return f"the task's keyword arguments are not a mapping (got {type(kwargs).__name__})"
    try:
        bound = signature.bind(*args, **kwargs)
    except TypeError as exc:
        return f"the arguments do not fit the task: {exc}"
    batch_id = bound.arguments.get("batch_id")
    if isinstance(batch_id, msgspec.Raw):  # a positional argument, left undecoded
        try:
            batch_id = msgspec.json.decode(batch_id)
        except msgspec.DecodeError as exc:
            return f"the batch_id argument is not JSON: {exc}"
    return batch_id_problem(batch_id)


def batch_id_problem(value: Any) -> str | None:
    """Why a task's `batch_id` argument cannot be a batch id, or None when it can.

    Absent (None) or empty, the task id is the batch id. Anything else must
    be a string of at most MAX_BATCH_ID_CHARS printable characters: a batch
    id says which deliveries are one batch, so a value that is not one (an
    event passed as a second argument, say) must never become one.
    """
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        return f"the batch_id argument must be a string, got {json_type(value)}"
    if len(value) > MAX_BATCH_ID_CHARS:
        return f"the batch_id argument is longer than {MAX_BATCH_ID_CHARS} characters"
    if not value.isprintable():
        return "the batch_id argument holds unprintable characters"
    return None


def batch_key(batch_id: str) -> str:
    """A usable batch id from a batch id or task id (same input, same id).

    Ids that are long or hold unprintable characters (a newline would forge
    a log line) are replaced by their digest: only a task id can be one (a
    task's batch_id argument is checked before the task runs:
    `batch_id_problem`, in the consumer's strategy). Anything but a string is refused.
    """
    if not isinstance(batch_id, str):
        raise TypeError(f"a batch id must be a string, got {type(batch_id).__name__}")
    if not batch_id:
        return ""  # EventBuffer.apply picks a fresh id
    if len(batch_id) > MAX_BATCH_ID_CHARS or not batch_id.isprintable():
        digest = hashlib.sha256(batch_id.encode("utf-8", "surrogatepass")).hexdigest()
        return f"sha256:{digest}"
    return batch_id


def items(payload: Any) -> list[Any]:
    """The items of a batch: each a dict, or the JSON bytes of one item.

    A list as sent; the elements of a JSON array sent as text (the producer
    client sends its batch as one JSON text) or still undecoded (a worker
    decodes the events argument of a task body lazily: `decode`);
    any other value is a batch of one item. JSON bytes are decoded straight
    into an Event, with no dict in between. An array msgspec cannot cut
    into items (one nested too deep, NaN, an integer out of range) is cut by
    `split_array`, so each item is judged on its own.
    """
    if isinstance(payload, msgspec.Raw):
        raw = bytes(payload).lstrip()
        if raw.startswith(b"["):
            found = _array_items(raw)
            return [raw] if found is None else found
        if not raw.startswith(b'"'):
            return [raw]
        try:
            payload = _ANY.decode(raw)  # the producer's JSON text, inside a JSON string
        except msgspec.DecodeError:
            return [raw]
    if isinstance(payload, list):
        return [bytes(item) if isinstance(item, msgspec.Raw) else item for item in payload]
    if isinstance(payload, str) and payload.startswith("["):
        try:
            found = _array_items(payload.encode("utf-8"))
        except UnicodeEncodeError:
            found = None
        if found is not None:
            return found
        # not a JSON array after all (or not UTF-8): dead-lettered whole, below
    return [payload]


def event_array(payload: Any) -> bytes | list[Any] | None:
    """The batch as one JSON array (bytes) or list, to decode whole; None when it is none.

    What `items` would cut into items, given whole: a raw JSON array (the
    worker leaves a task's events undecoded), the producer's JSON text (in a
    JSON string, or a str), a list of dicts. Whether its items are events is
    for the decoder to say."""
    if isinstance(payload, list):
        return payload if all(type(item) is dict for item in payload) else None
    if isinstance(payload, msgspec.Raw):
        raw = bytes(payload).lstrip()
        if raw.startswith(b"["):
            return raw
        if not raw.startswith(b'"'):
            return None
        try:
            payload = _ANY.decode(raw)
        except msgspec.DecodeError:
            return None
    if isinstance(payload, str) and payload.startswith("["):
        try:
            return payload.encode("utf-8")
        except UnicodeEncodeError:
            return None
    return None


def _array_items(raw: bytes) -> list[Any] | None:
    """The JSON text of each item of a JSON array; None when it is not one."""
    try:
        return [bytes(item) for item in _RAW_ITEMS.decode(raw)]
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError):
        pass
    try:
        return list(split_array(raw))
    except JsonSliceError:
        return None


def json_type(item: Any) -> str:
    if item is None:
        return "null"
    if isinstance(item, bool):
        return "boolean"
    if isinstance(item, int | float):
        return "number"
    if isinstance(item, str):
        return "string"
    if isinstance(item, list):
        return "array"
    if isinstance(item, dict):
        return "object"
    return type(item).__name__


# -- a batch as the JSON bytes a dead letter keeps ----------------------------------


def item_json(item: Any) -> bytes:
    """The item as JSON, for its dead letter, whatever it holds (never raises).

    Items of a batch sent as JSON text are already their own JSON bytes.

    `json.dumps` keeps what was sent (NaN stays NaN, a lone surrogate
    becomes its \\u escape); what it cannot encode (tuple keys, bytes from
    a Python caller) is shown with `repr`.
    """
    if isinstance(item, bytes):
        return item
    if isinstance(item, msgspec.Raw):  # a keyword argument left undecoded (`decode`)
        return bytes(item)
    try:
        text = json.dumps(item, ensure_ascii=False, separators=(",", ":"))
    except (TypeError, ValueError, OverflowError, RecursionError):
        try:
            text = repr(item)
        except (ValueError, RecursionError):  # too deep, or an int too long for str()
            text = f"<unprintable {type(item).__name__}>"
    return text.encode("utf-8", "backslashreplace")


def batch_bytes(payload: Any) -> bytes:
    """A task's batch as stored in a dead letter: the JSON text as sent, or the list as JSON.

    A list's items that the worker left undecoded (`msgspec.Raw`: the single
    event of `ingest_event`) are kept as the JSON text they were sent as.
    """
    if isinstance(payload, str):
        return payload.encode("utf-8", "surrogatepass")
    if isinstance(payload, msgspec.Raw):  # as the worker left it (`decode`)
        return bytes(payload)
    if isinstance(payload, list) and any(isinstance(item, msgspec.Raw) for item in payload):
        raws = (bytes(i) if isinstance(i, msgspec.Raw) else item_json(i) for i in payload)
        return b"[" + b",".join(raws) + b"]"
    return item_json(payload)


# -- a stored body, for a replay ------------------------------------------------------


def body_batch(task: str, body: bytes) -> Any:
    """The events argument of a raw Celery task body for `task`, as `ingest()` takes it.

    Protocol 2 bodies are `[args, kwargs, embed]`, protocol 1 bodies
    `{"args": ..., "kwargs": ...}`; the events are the first argument, or the
    `events` (`event` for ingest_event) keyword. Every other argument that
    is not a usable batch id (`send_task("eventbuffer.ingest_event",
    args=[e1, e2])`, whose `e2` lands in `batch_id`; arguments the task does
    not take) is added to the batch as one more item: an event, or an
    invalid_event dead letter once replayed, never dropped. Raises
    TaskBodyError when the body is not JSON or holds no events. The body is
    decoded as a worker decodes it (`decode`): the events stay raw
    JSON, and a body with an event nested too deep or holding NaN still
    yields its events (each judged on its own by `ingest()`).
    """
    try:
        decoded = decode(body)
    except RecursionError:
        raise TaskBodyError("the task body is nested too deeply to decode") from None
    except ValueError as exc:  # msgspec's, json's and the slicer's errors
        raise TaskBodyError(f"the task body is not JSON: {one_line(exc)}") from None
    if isinstance(decoded, list | tuple):
        args = decoded[0] if decoded else None
        kwargs = decoded[1] if len(decoded) > 1 else None
    elif isinstance(decoded, dict):
        args, kwargs = decoded.get("args"), decoded.get("kwargs")
    else:
        raise TaskBodyError("the task body is neither a protocol 1 nor a protocol 2 body")
    single = task == TASK_INGEST_EVENT
    keyword = "event" if single else "events"
    args = args if isinstance(args, list) else []
    kwargs = dict(kwargs) if isinstance(kwargs, dict) else {}
    if args:
        value, rest = args[0], args[1:]
    elif keyword in kwargs:
        value, rest = kwargs.pop(keyword), []
    else:
        raise TaskBodyError(f"the task body carries no {keyword} argument")
    if rest and "batch_id" not in kwargs:
        kwargs["batch_id"] = rest.pop(0)
    if "batch_id" in kwargs and batch_id_problem(_decoded(kwargs["batch_id"])) is None:
        del kwargs["batch_id"]
    extra = rest + list(kwargs.values())
    if not extra:
        return [value] if single else value
    return [value, *extra] if single else [*items(value), *extra]


def _decoded(value: Any) -> Any:
    """A task argument the worker's decoder left raw, decoded (itself if it is not JSON)."""
    if not isinstance(value, msgspec.Raw):
        return value
    try:
        return msgspec.json.decode(value)
    except (msgspec.DecodeError, RecursionError):
        return value
