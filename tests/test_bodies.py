"""worker/bodies.py: how eventbuffer's workers decode JSON message bodies (pure, no servers)."""

from __future__ import annotations

import json
from datetime import UTC, datetime

import msgspec
from kombu import serialization
from kombu.utils import json as kombu_json

from worker import bodies


def test_a_task_body_keeps_its_positional_arguments_raw() -> None:
    events = [{"project_id": "p", "name": "x", "created_at": 1}]
    body = json.dumps([[events, "batch-1"], {"batch_id": "b"}, {"callbacks": None}])
    args, kwargs, embed = bodies.decode(body)
    assert [type(a) for a in args] == [msgspec.Raw, msgspec.Raw]
    assert json.loads(bytes(args[0])) == events
    assert (kwargs, embed) == ({"batch_id": "b"}, {"callbacks": None})
    # ingest reads the raw events argument as one JSON item per event, undecoded
    assert [json.loads(item) for item in bodies.items(args[0])] == events


def test_other_bodies_decode_as_kombu_decodes_them() -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, tzinfo=UTC)
    control = kombu_json.dumps({"method": "ping", "arguments": {}, "at": when})
    assert bodies.decode(control) == kombu_json.loads(control)
    assert bodies.decode(control)["at"] == when  # kombu's type hints still apply
    protocol1 = json.dumps({"task": "eventbuffer.ingest_events", "args": [[]], "kwargs": {}})
    assert bodies.decode(protocol1) == json.loads(protocol1)
    # kwargs of a task body keep kombu's type hints too
    args, kwargs, _ = bodies.decode(kombu_json.dumps([[], {"at": when}, {}]))
    assert args == [] and kwargs == {"at": when}


def test_installed_the_worker_decodes_lazily_and_sends_raw_arguments_as_json() -> None:
    try:
        bodies.install()
        body = json.dumps([[[{"a": 1}]], {}, {}])
        [raw], _, _ = serialization.loads(body, "application/json", "utf-8")
        assert isinstance(raw, msgspec.Raw)
        # A task's retry re-publishes its arguments: the raw one as the JSON it holds.
        assert json.loads(kombu_json.dumps([[raw], {}, {}])) == json.loads(body)
    finally:  # this test process goes back to kombu's own decoder
        serialization.register_json()
    assert serialization.loads(body, "application/json", "utf-8") == json.loads(body)


def test_the_same_body_is_decoded_once() -> None:
    """Celery decodes a message's body twice (the strategy, then the trace), the very
    same object: the second decode is the first's result; an equal body is decoded anew."""
    body = json.dumps([[[{"name": "x"}]], {}, {}]).encode()
    first = bodies.decode(body)
    assert bodies.decode(body) is first
    again = bodies.decode(bytes(bytearray(body)))
    assert again is not first and again[1:] == first[1:]
    assert [bytes(arg) for arg in again[0]] == [bytes(arg) for arg in first[0]]
