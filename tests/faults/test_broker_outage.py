"""The broker (a Redis of its own, apart from the buffer's) down for a while under load.

The broker Redis is SIGKILLed while the producer sends, stays down 5 s and
is started again on the same port and directory. It runs with AOF
(`appendfsync always`): the tasks it had accepted must survive its restart,
as a production broker's queues would (without persistence a broker restart
drops its queues, whatever the clients do).

While it is down the producer client holds every accepted event: background
sends fail and are retried with backoff, and `flush()` raises ProducerError
with the number still held instead of dropping anything. Workers and Beat
reconnect by themselves. Nothing accepted may be lost or doubled.
"""

from __future__ import annotations

import time

import pytest

from tests.support.fault_load import wait
from tests.support.fault_stack import Stack, assert_exactly_once
from worker.producer import ProducerError

pytestmark = pytest.mark.faults

RATE = 250
DOWN_S = 5.0


def test_broker_down_then_back(stacks) -> None:
    stack: Stack = stacks(
        broker="redis",
        broker_args=("--appendonly", "yes", "--appendfsync", "always"),
        EVENT_BUFFER_VISIBILITY_TIMEOUT_S="3",
    )
    assert stack.broker_server is not None
    ingest = stack.ingest_worker("-c", "2")
    flush = stack.flush_worker()
    stack.beat()
    load = stack.load(RATE, sessions_per_batch=4)
    ingest.wait_for("ready.")
    flush.wait_for("ready.")
    load.start()
    load.wait_for(RATE * 3, 30)

    stack.broker_server.kill()
    down_at = time.monotonic()
    held_while_down = 0
    error: ProducerError | None = None
    # Once the producer holds events it could not send, flush() must say how many.
    wait(lambda: load.producer.stats.pending > 0, 10, "the producer to hold unsent events")
    try:
        load.producer.flush(timeout=1.0)
    except ProducerError as exc:
        error = exc
    while time.monotonic() < down_at + DOWN_S:
        held_while_down = max(held_while_down, load.producer.stats.pending)
        time.sleep(0.1)
    stack.broker_server.start()  # same port, same directory: its queues come back
    back = time.monotonic()

    load.wait_for(load.count + RATE * 2, 60)
    load.finish(timeout=90)
    drained = stack.wait_drained(load.count, timeout=120)
    tally = stack.finish(load)
    stats = load.producer.stats
    stack.record(
        "broker (own Redis) down 5 s",
        tally,
        drained - back,
        f"broker down {DOWN_S:.0f} s",
        note=f"producer: flush() raised ProducerError(unsent={error.unsent if error else '-'}), "
        f"up to {held_while_down} events held, {stats.failures} failed publishes retried",
    )
    assert error is not None and error.unsent > 0, "flush() must report the events it holds"
    assert held_while_down > RATE, "the producer should have held the events sent meanwhile"
    assert_exactly_once(stack, tally)
