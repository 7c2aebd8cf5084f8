"""Durations follow created_at with real Celery workers applying tasks concurrently.

The README's ingest layout (two `-P solo` worker processes) and a prefork
worker (two pool processes) consume one broker Redis; a stock Celery app
sends `eventbuffer.ingest_events` tasks as any producer does:

(a) one in-order stream of micro-batches over a hundred interleaved
    sessions that start and end inside the stream;
(b) the same kind of stream with neighbouring tasks swapped, each batch's
    events split between two producers (so one session's events travel in
    different tasks);
(c) views applied after their session's session_end, within the window and
    beyond it.

No Beat runs: the test releases held events as `process_buffer` would.
Every row in the buffer's queue is checked against `OrderedModel` (each
session by created_at), every event exactly once, nothing held or waiting.
With the window at 0 the same streams give wrong durations (the issue's
measurement): `test_without_the_window_workers_apply_out_of_order` keeps
that visible, so this test would notice a layout that no longer reorders.
"""

from __future__ import annotations

import json
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib

from tests.support.celery_procs import CeleryProcess, project_env, worker
from tests.support.dates import BASE_MS
from tests.support.polling import wait_until
from tests.support.servers import RedisServer
from tests.support.traffic import RealisticTraffic
from tests.test_reorder import OrderedModel
from worker.buffer import EventBuffer
from worker.celery import create_app
from worker.clock import SYSTEM_CLOCK
from worker.events import Event, decode_row, parse_event
from worker.reorder import held_packs, release_due
from worker.settings import Settings

pytestmark = pytest.mark.slow

LAYOUTS = {
    "two-solo": [["-P", "solo"], ["-P", "solo"]],
    "prefork": [["-P", "prefork", "-c", "2"]],
}
BATCH = 8  # micro-batches: many tasks, so the workers overtake each other often


class Stack:
    def __init__(
        self, tmp: Path, buffer_url: str, layout: list[list[str]], window: int | None
    ) -> None:
        self.broker_server = RedisServer(tmp / "broker")
        self.broker_server.start()
        self.env = project_env(
            REDIS_URL=buffer_url,
            CELERY_BROKER_URL=self.broker_server.url,
            CLICKHOUSE_URL=f"chdb://{tmp / 'ch'}",
        )
        if window is not None:  # else the default, as `eventbuffer run` has it
            self.env["EVENT_BUFFER_REORDER_WINDOW_MS"] = str(window)
        self.settings = Settings.from_env(self.env)
        self.app = create_app(self.settings)
        self.redis = redis_lib.Redis.from_url(buffer_url)
        self.buffer = EventBuffer(self.redis, self.settings)
        self.sent: list[Event] = []  # in the order the producers sent them
        self.procs: list[CeleryProcess] = [
            worker(self.env, tmp / f"w{n}.log", "-Q", "ingest", "-n", f"w{n}@%h", *options)
            for n, options in enumerate(layout)
        ]
        for proc in self.procs:
            proc.wait_for("ready", timeout=60)

    def send(self, events: list[dict[str, Any]]) -> None:
        self.app.send_task("eventbuffer.ingest_events", args=[events], queue="ingest")
        self.sent += [parse_event(e) for e in events]

    def rows(self) -> list[Any]:
        shard = next(iter(self.buffer.shards()))
        return [decode_row(raw) for raw in self.redis.lrange(shard.queue, 0, -1)]

    def drain(self, expected: int, timeout: float = 120) -> None:
        """Wait until `expected` rows are queued, releasing held events as a flush does."""

        def done() -> bool:
            for shard in self.buffer.shards():
                release_due(self.buffer.scripts, shard, self.settings, SYSTEM_CLOCK)
            return len(self.rows()) >= expected

        wait_until(done, timeout, f"{expected} rows queued (have {len(self.rows())})", interval=0.2)

    def close(self) -> None:
        for proc in self.procs:
            proc.stop(timeout=15)
        self.broker_server.stop()
        self.app.close()


@pytest.fixture
def stack_for(tmp_path: Path, redis_url: str, redis: redis_lib.Redis) -> Iterator[Any]:
    made: list[Stack] = []

    def make(layout: list[list[str]], window: int | None) -> Stack:
        made.append(Stack(tmp_path, redis_url, layout, window))
        return made[-1]

    yield make
    for stack in made:
        stack.close()


def with_ids(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{**event, "id": str(uuid.uuid4())} for event in events]


def stream(seed: int, events: int) -> list[dict[str, Any]]:
    """Interleaved sessions that start and end inside the stream, every one ended."""
    traffic = RealisticTraffic(seed, concurrent=60)
    out = traffic.events(events)
    out += [event for event, _ in traffic.end_all()]
    return with_ids(out)


def batches(events: list[dict[str, Any]]) -> list[list[dict[str, Any]]]:
    return [events[n : n + BATCH] for n in range(0, len(events), BATCH)]


def send_in_order(stack: Stack, events: list[dict[str, Any]]) -> None:
    for batch in batches(events):
        stack.send(batch)


def send_swapped_two_producers(stack: Stack, events: list[dict[str, Any]]) -> None:
    """Neighbouring batches swapped; each batch's events split between two producers."""
    groups = batches(events)
    for n in range(0, len(groups) - 1, 2):
        groups[n], groups[n + 1] = groups[n + 1], groups[n]
    for batch in groups:
        stack.send(batch[0::2])
        stack.send(batch[1::2])


def view(session: str, created: int, duration: int = 0) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "name": "screen_view",
        "project_id": "late",
        "session_id": session,
        "created_at": created,
        "duration": duration,
    }


def session_end(session: str, created: int) -> dict[str, Any]:
    return {
        "id": str(uuid.uuid4()),
        "name": "session_end",
        "project_id": "late",
        "session_id": session,
        "created_at": created,
    }


def assert_exactly_once_in_order(stack: Stack, in_order: list[Event]) -> Counter[tuple[str, int]]:
    rows = stack.rows()
    ids = Counter(row.id for row in rows)
    assert set(ids) == {event.id for event in stack.sent}, "events missing or unexpected"
    assert max(ids.values()) == 1, "an event was queued twice"
    model = OrderedModel(in_order)
    got = Counter((row.id, row.duration) for row in rows if row.id in {e.id for e in in_order})
    wrong = sum((model.queued - got).values())
    assert wrong == 0, f"{wrong} of {len(in_order)} rows differ from created_at order"
    assert model.last_views == {}
    return got


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_durations_follow_created_at_with_concurrent_workers(
    stack_for: Any, layout: str, redis: redis_lib.Redis
) -> None:
    stack: Stack = stack_for(LAYOUTS[layout], None)
    window_s = stack.settings.reorder_window_ms / 1000

    # (a) and (b): two streams over different sessions.
    ordered = stream(1, 1200)
    swapped = stream(2, 1200)
    send_in_order(stack, ordered)
    send_swapped_two_producers(stack, swapped)

    # (c) within the window: v2 (created before the end) is applied after the end.
    t0 = BASE_MS + 40 * 86_400_000 // 2  # apart from the streams' sessions
    within = [
        view("c-within", t0),
        session_end("c-within", t0 + 9000),
        view("c-within", t0 + 4000, 5),
    ]
    for event in within:
        stack.send([event])
    stack.drain(len(stack.sent))
    streams = [parse_event(e) for e in ordered + swapped + within]
    assert_exactly_once_in_order(stack, streams)

    # (c) beyond the window: the end has been released when v2 arrives.
    beyond_v1, beyond_end = view("c-beyond", t0), session_end("c-beyond", t0 + 9000)
    stack.send([beyond_v1, beyond_end])
    stack.drain(len(stack.sent))
    time.sleep(window_s)
    late_view = view("c-beyond", t0 + 4000, 6)
    stack.send([late_view])
    stack.drain(len(stack.sent))
    durations = {row.id: row.duration for row in stack.rows()}
    assert durations[beyond_v1["id"]] == 0  # queued by its session_end, as the seed would
    assert durations[late_view["id"]] == 6  # late: queued at once with its own duration

    shard = next(iter(stack.buffer.shards()))
    assert held_packs(redis, shard) == {} and redis.zcard(shard.held_due) == 0, "events held"
    assert redis.hlen(shard.views) == 0, "a view waits after its session ended"
    ids = Counter(row.id for row in stack.rows())
    assert set(ids) == {e.id for e in stack.sent} and max(ids.values()) == 1


def test_without_the_window_workers_apply_out_of_order(
    stack_for: Any, redis: redis_lib.Redis
) -> None:
    """The control: the same swapped stream, window 0, two solo processes: the order of
    arrival shows in the durations (so the test above can tell the window at work)."""
    stack: Stack = stack_for(LAYOUTS["two-solo"], 0)
    swapped = stream(3, 1200)
    send_swapped_two_producers(stack, swapped)
    shard = next(iter(stack.buffer.shards()))
    expected_rows = len(stack.sent)

    def settled() -> bool:
        # Views applied after their session_end wait as last views: count them as landed.
        return len(stack.rows()) + int(redis.hlen(shard.views)) >= expected_rows

    wait_until(settled, 120, "every event applied", interval=0.2)
    model = OrderedModel([parse_event(e) for e in swapped])
    got = Counter((json.loads(raw)["id"], json.loads(raw).get("duration", 0))
                  for raw in redis.lrange(shard.queue, 0, -1))  # fmt: skip
    assert sum((model.queued - got).values()) > 0
