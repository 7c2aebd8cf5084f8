"""Task messages as they sit in a Redis queue list, built by hand so that any field can be
anything: kombu's envelope (`body`, `headers`, `properties`...) around Celery's protocol 2
headers, or a protocol 1 body (the task's fields inside the body, no task headers).

`task_envelope` is what a stock kombu sender writes for `send_task`; tests change what
they need and push the JSON (or any bytes) onto the queue with LPUSH.
"""

from __future__ import annotations

import base64
import json
import uuid
from typing import Any

INGEST_EVENTS = "eventbuffer.ingest_events"


def task_body(events: list[dict[str, Any]]) -> bytes:
    """A protocol 2 body `[args, kwargs, embed]` for ingest_events(events)."""
    embed = {"callbacks": None, "errbacks": None, "chain": None, "chord": None}
    return json.dumps([[events], {}, embed]).encode()


def protocol2_headers(task: str, task_id: str) -> dict[str, Any]:
    return {
        "lang": "py",
        "task": task,
        "id": task_id,
        "shadow": None,
        "eta": None,
        "expires": None,
        "group": None,
        "group_index": None,
        "retries": 0,
        "timelimit": [None, None],
        "root_id": task_id,
        "parent_id": None,
        "argsrepr": "[...]",
        "kwargsrepr": "{}",
        "origin": "gen1@test",
        "ignore_result": True,
    }


def task_envelope(
    events: list[dict[str, Any]],
    *,
    task: str = INGEST_EVENTS,
    task_id: str | None = None,
    queue: str = "ingest",
    body: bytes | None = None,
) -> dict[str, Any]:
    """A protocol 2 message for `task`, as kombu's Redis transport writes it."""
    task_id = task_id or str(uuid.uuid4())
    raw = task_body(events) if body is None else body
    return {
        "body": base64.b64encode(raw).decode(),
        "content-encoding": "utf-8",
        "content-type": "application/json",
        "headers": protocol2_headers(task, task_id),
        "properties": {
            "correlation_id": task_id,
            "reply_to": "",
            "delivery_mode": 2,
            "delivery_info": {"exchange": queue, "routing_key": queue},
            "priority": 0,
            "body_encoding": "base64",
            "delivery_tag": str(uuid.uuid4()),
        },
    }


def protocol1_envelope(
    events: list[dict[str, Any]], *, task: str = INGEST_EVENTS, queue: str = "ingest"
) -> dict[str, Any]:
    """A protocol 1 message: the task's name, id and arguments inside the body."""
    task_id = str(uuid.uuid4())
    body = {
        "task": task,
        "id": task_id,
        "args": [events],
        "kwargs": {},
        "retries": 0,
        "eta": None,
        "expires": None,
        "utc": True,
        "callbacks": None,
        "errbacks": None,
        "timelimit": [None, None],
        "taskset": None,
        "chord": None,
    }
    envelope = task_envelope(events, task=task, task_id=task_id, queue=queue)
    envelope["body"] = base64.b64encode(json.dumps(body).encode()).decode()
    envelope["headers"] = {}
    return envelope


def encoded(envelope: Any) -> bytes:
    """The bytes pushed on the queue (any JSON value; NaN and the like allowed)."""
    return json.dumps(envelope).encode()
