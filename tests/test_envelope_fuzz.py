"""Generated hostile envelopes against one real worker: it stays up and runs the valid tasks.

Each example is a few dozen messages, each a valid task message (kombu's
envelope around Celery's protocol 2 headers, or a protocol 1 body) with one
to three of its fields replaced by any JSON value or removed, or not an
envelope at all (any JSON, any bytes). Valid tasks, sent by a stock Celery
app, are interleaved with them. The worker (`-P solo`, the reliable
transport) must stay up, apply every valid task exactly once, and leave
nothing in its queue or its keeping: every hostile message was run, parked
or dead-lettered (tests/test_hostile_envelopes.py checks which, message by
message, for the ones that once stopped a worker).
"""

from __future__ import annotations

import base64
import json
import os
from collections.abc import Iterator
from typing import Any

import pytest
from celery import Celery
from hypothesis import HealthCheck, Phase, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st

from tests.support.envelopes import protocol1_envelope, task_envelope
from tests.support.polling import wait_until
from tests.test_hostile_envelopes import Rig, event
from worker.celery import create_app
from worker.settings import Settings

pytestmark = pytest.mark.slow

#: Messages per example, and examples: a few hundred envelopes in all (FUZZ_EXAMPLES=200
#: for a longer hunt: about a minute; FUZZ_POOL=prefork or threads for another pool).
HOSTILE_PER_EXAMPLE = 60
VALID_PER_EXAMPLE = 12
EXAMPLES = int(os.environ.get("FUZZ_EXAMPLES", "5"))  # more for a longer hunt

ENVELOPE_FIELDS = ["body", "content-type", "content-encoding", "headers", "properties"]
PROPERTY_FIELDS = [
    "delivery_tag",
    "body_encoding",
    "delivery_info",
    "priority",
    "correlation_id",
    "reply_to",
    "delivery_mode",
]
DELIVERY_INFO_FIELDS = ["exchange", "routing_key", "priority", "redelivered"]
HEADER_FIELDS = [
    "lang",
    "task",
    "id",
    "shadow",
    "eta",
    "expires",
    "group",
    "group_index",
    "retries",
    "timelimit",
    "root_id",
    "parent_id",
    "argsrepr",
    "kwargsrepr",
    "origin",
    "ignore_result",
    "compression",
    "stamps",
    "stamped_headers",
    "replaced_task_nesting",
]
PROTOCOL1_FIELDS = [
    "task",
    "id",
    "args",
    "kwargs",
    "retries",
    "eta",
    "expires",
    "utc",
    "callbacks",
    "errbacks",
    "timelimit",
    "chord",
    "taskset",
]
# Values known to have stopped a worker, and names that reach real code paths.
SPECIAL = st.sampled_from(
    [
        "rot13",
        "base64",
        "zlib",
        "abc",
        [1],
        {"a": 1},
        [None, None],
        [1, 2, 3],
        "2999-01-01T00:00:00+00:00",
        "2000-01-01T00:00:00+00:00",
        "eventbuffer.ingest_events",
        "eventbuffer.ingest_event",
        "eventbuffer.no_such_task",
        "shop.send_mail",
        "",
        -1,
        2**70,
        "\ud800",
    ]
)
JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats()
    | st.text(max_size=12),
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=4)
    ),
    max_leaves=8,
)
VALUE = SPECIAL | JSON
DELETE = "<delete>"


def _info(envelope: dict[str, Any]) -> Any:
    properties = envelope.get("properties")
    return properties.get("delivery_info") if isinstance(properties, dict) else None


@st.composite
def hostile(draw: st.DrawFn) -> bytes:
    """One hostile message, as the bytes pushed on the queue."""
    kind = draw(st.sampled_from(["p2", "p2", "p2", "p1", "json", "bytes", "body"]))
    if kind == "bytes":
        return draw(st.binary(max_size=64))
    if kind == "json":
        return json.dumps(draw(JSON)).encode()
    events = [event("hostile")]
    envelope = protocol1_envelope(events) if kind == "p1" else task_envelope(events)
    if kind == "body":  # a well-formed envelope around a body of any shape or bytes
        raw = draw(st.binary(max_size=64) | JSON.map(lambda v: json.dumps(v).encode()))
        envelope["body"] = base64.b64encode(raw).decode()
        return json.dumps(envelope).encode()
    body = json.loads(base64.b64decode(envelope["body"])) if kind == "p1" else None
    for _ in range(draw(st.integers(1, 3))):
        where = draw(st.sampled_from(["envelope", "properties", "info", "headers"]))
        if where == "envelope":
            node, field = envelope, draw(st.sampled_from(ENVELOPE_FIELDS))
        elif where == "properties" and isinstance(envelope.get("properties"), dict):
            node, field = envelope["properties"], draw(st.sampled_from(PROPERTY_FIELDS))
        elif where == "info" and isinstance(_info(envelope), dict):
            node = envelope["properties"]["delivery_info"]
            field = draw(st.sampled_from(DELIVERY_INFO_FIELDS))
        elif body is not None:
            node, field = body, draw(st.sampled_from(PROTOCOL1_FIELDS))
        elif isinstance(envelope.get("headers"), dict):
            node, field = envelope["headers"], draw(st.sampled_from(HEADER_FIELDS))
        else:
            continue
        value = draw(VALUE | st.just(DELETE))
        if value == DELETE:
            node.pop(field, None)
        else:
            node[field] = value
    if body is not None and isinstance(envelope.get("body"), str):
        envelope["body"] = base64.b64encode(json.dumps(body).encode()).decode()
    return json.dumps(envelope).encode()


@pytest.fixture(scope="module")
def fuzz_rig(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Rig, Celery]]:
    rig = Rig(tmp_path_factory.mktemp("fuzz"), pool=os.environ.get("FUZZ_POOL", "solo"))
    app = create_app(Settings.from_env(rig.env))
    try:
        rig.ensure_worker()
        yield rig, app
    finally:
        app.close()
        rig.close()


@hsettings(
    max_examples=EXAMPLES,
    deadline=None,
    database=None,
    phases=[Phase.generate],  # a real worker per example: no shrinking
    suppress_health_check=list(HealthCheck),
)
@given(
    messages=st.lists(hostile(), min_size=HOSTILE_PER_EXAMPLE, max_size=HOSTILE_PER_EXAMPLE),
    valid_at=st.lists(
        st.integers(0, HOSTILE_PER_EXAMPLE), min_size=VALID_PER_EXAMPLE, max_size=VALID_PER_EXAMPLE
    ),
)
def test_generated_envelopes_never_stop_the_worker(
    fuzz_rig: tuple[Rig, Celery], messages: list[bytes], valid_at: list[int]
) -> None:
    rig, app = fuzz_rig
    proc = rig.proc
    assert proc is not None and proc.alive(), "the worker died in an earlier example"
    valid: list[str] = []
    for n, message in enumerate(messages):
        for _ in range(valid_at.count(n)):
            good = event("valid")
            valid.append(good["id"])
            app.send_task("eventbuffer.ingest_events", args=[[good]], queue="ingest")
        rig.push(message)
    rig.wait_applied(valid, timeout=60)
    wait_until(
        lambda: rig.broker.llen("ingest") == 0 and rig.inflight() == 0,
        30,
        "every message taken and settled",
        alive=proc.alive,
        detail=lambda: proc.text()[-3000:],
    )
    rig.still_up()
    applied = rig.applied()
    assert all(applied[event_id] == 1 for event_id in valid), "a valid task applied twice"
    print(
        f"{len(messages)} hostile: {len(rig.parked())} parked in all, "
        f"{len(rig.dead_letters())} dead letters in all"
    )
