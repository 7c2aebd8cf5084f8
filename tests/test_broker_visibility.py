"""What the reliable transport holds, seen and kept: parked messages, undeliverable tasks,
tasks in the keeping of live and of dead workers.

Real Redis servers (a private one where memory is filled past `maxmemory`,
or a buffer Redis is killed), real kombu consumers on the reliable
transport, real Celery workers SIGKILLed as an OOM killer would.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from kombu import Connection, Consumer, Message
from kombu.asynchronous.timer import Timer
from rich.console import Console

from tests.conftest import Result
from tests.support.broker_system import System
from tests.support.broker_transport import consuming, inflight, publish, queue
from tests.support.polling import wait_until
from tests.support.servers import RedisServer, start_redis
from worker import runtime
from worker.broker.broker_consumer import BrokerConsumer
from worker.broker.broker_keys import BrokerKeys
from worker.broker.holdings import Holder, Holdings, read_holdings
from worker.broker.transport import TRANSPORT_PATH
from worker.cli.status import held_lines
from worker.cli.watch import WatchState, render
from worker.consumer import RETRY_FIRST_S, keep_undeliverable
from worker.keys import ShardKeys
from worker.settings import Settings

KEYS = BrokerKeys()
NOT_JSON = b"\xff not json"


@pytest.fixture
def own(tmp_path: Path) -> Iterator[RedisServer]:
    """A Redis of this test's own: its memory limit is changed, or it is killed."""
    server = start_redis(tmp_path / "own-redis")
    try:
        yield server
    finally:
        server.stop()


def refuse_writes(r: redis_lib.Redis) -> None:
    """Past maxmemory (noeviction): writes are refused, reads and pops still served."""
    used = int(r.info("memory")["used_memory"])
    r.config_set("maxmemory", max(1, used // 2))
    with pytest.raises(redis_lib.ResponseError, match="maxmemory"):
        r.set("probe", 1)


def accept_writes(r: redis_lib.Redis) -> None:
    r.config_set("maxmemory", 0)


def parked(r: redis_lib.Redis) -> list[bytes]:
    return list(r.lrange(KEYS.unparsable, 0, -1))


def drain_until(conn: Any, until: Callable[[], bool], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while not until():
        assert time.monotonic() < deadline, "timed out draining events"
        with suppress(TimeoutError):
            conn.drain_events(timeout=0.5)


# -- (a) parked messages are never dropped -------------------------------------------------


@contextmanager
def consuming_no_ack(url: str, name: str, got: list[Any]) -> Iterator[Any]:
    with Connection(url, transport=TRANSPORT_PATH) as conn:
        conn.channel_for_test = conn.channel()
        consumer = Consumer(
            conn.channel_for_test,
            queues=[queue(name)],
            callbacks=[lambda body, message: got.append(body["n"])],
            accept=["json"],
            no_ack=True,
        )
        with consumer:
            yield conn


def test_a_no_ack_message_redis_refuses_to_park_is_kept_and_parked_once_it_can(
    own: RedisServer, caplog: pytest.LogCaptureFixture
) -> None:
    # A no-ack fetch pops the message (a pop is served past maxmemory); parking it is a
    # write Redis refuses there. It used to be lost; now it waits in the consumer.
    r = own.client()
    q = queue("tq")
    r.lpush("tq", NOT_JSON)
    publish(own.url, q, [{"n": 1}])
    got: list[int] = []
    with (
        caplog.at_level(logging.ERROR, logger="worker.broker"),
        consuming_no_ack(own.url, "tq", got) as conn,
    ):
        refuse_writes(r)
        conn.drain_events(timeout=5)  # the unparsable one: kept, consuming goes on
        assert got == [1]
        reliable = conn.channel_for_test.reliable
        assert parked(r) == [] and reliable.unparked == 1
        accept_writes(r)
        # The channel's close tries again (a no-ack channel has no heartbeat).
    assert parked(r) == [NOT_JSON]
    assert reliable.unparked == 0
    assert "could not park 1 message(s)" in caplog.text
    assert r.llen("tq") == 0 and inflight(r) == 0


def test_a_kept_message_is_parked_past_maxmemory(own: RedisServer) -> None:
    """Parking a fetched message moves it (broker_requeue.lua runs past maxmemory)."""
    r = own.client()
    q = queue("tq")
    publish(own.url, q, [{"n": 0}, {"n": 1}])
    sent = r.lindex("tq", -1)
    got: list[int] = []

    def on_message(body: Any, message: Message) -> None:
        if body["n"] == 0:
            refuse_writes(r)  # between the fetch and the park
            raise KeyError("a field the consumer needs")
        got.append(body["n"])
        message.ack()

    try:
        with consuming(own.url, [q], on_message, consumer_timeout=1) as conn:
            conn.drain_events(timeout=5)  # the delivery's own error: parked, not raised
            assert parked(r) == [sent] and inflight(r) == 0
            accept_writes(r)
            drain_until(conn, lambda: got == [1])
    finally:
        accept_writes(r)
    assert r.llen("tq") == 0 and inflight(r) == 0


def test_a_kept_message_redis_refuses_to_park_stays_in_redis_and_a_heartbeat_parks_it(
    own: RedisServer,
) -> None:
    r = own.client()
    q = queue("tq")
    publish(own.url, q, [{"n": 0}, {"n": 1}])
    sent = r.lindex("tq", -1)
    got: list[int] = []

    def deny_scripts(deny: bool) -> None:
        # The park (a script) refused, as a lost connection would fail it: Redis answers
        # NOPERM to every EVALSHA of the default user until it is allowed again.
        r.execute_command("ACL", "SETUSER", "default", "-evalsha" if deny else "+evalsha")

    def on_message(body: Any, message: Message) -> None:
        if body["n"] == 0:
            deny_scripts(True)  # between the fetch and the park
            raise KeyError("a field the consumer needs")
        got.append(body["n"])
        message.ack()

    try:
        with consuming(own.url, [q], on_message, consumer_timeout=1) as conn:
            conn.drain_events(timeout=5)  # the delivery's own error: kept, not raised
            assert parked(r) == [] and inflight(r) == 1  # in the consumer's keeping, in Redis
            deny_scripts(False)
            wait_until(lambda: parked(r) == [sent], 10, "a heartbeat to park the message")
            assert inflight(r) == 0
            drain_until(conn, lambda: got == [1])
    finally:
        deny_scripts(False)
    assert r.llen("tq") == 0 and inflight(r) == 0


def test_status_and_metrics_count_parked_messages(
    run_main: Callable[..., Result], redis: redis_lib.Redis
) -> None:
    redis.lpush(KEYS.unparsable, NOT_JSON, b"{}")  # the broker is REDIS_URL here
    out = " ".join(run_main("status").out.split())
    assert "! 2 messages kombu cannot deliver parked in _eventbuffer.broker.unparsable" in out
    data = json.loads(run_main("status", "--json").out)
    assert data["broker"]["held"]["parked"] == 2
    metrics = run_main("metrics").out
    assert "eventbuffer_broker_parked_messages 2.0" in metrics
    assert 'eventbuffer_broker_tasks_held{consumer="dead"} 0.0' in metrics


# -- (b) an undeliverable task waits unacknowledged, nothing sleeps ----------------------


def test_an_undeliverable_task_stays_unacknowledged_while_the_buffer_is_away(
    own: RedisServer, redis_url: str, redis: redis_lib.Redis, tmp_path: Path
) -> None:
    # Broker: the session's Redis; buffer: our own, killed. The dead letter cannot be
    # stored: the message must not be requeued (nor slept on), but stay in the consumer's
    # keeping while the timer tries again; once the buffer is back it is a dead letter.
    q = queue("tq")
    publish(redis_url, q, [{"n": 0}])
    held: list[Message] = []
    settings = Settings.from_env({"REDIS_URL": own.url, "CLICKHOUSE_URL": f"chdb://{tmp_path}"})
    runtime.configure(settings)
    timer = Timer()
    try:
        with consuming(redis_url, [q], lambda body, message: held.append(message)) as conn:
            drain_until(conn, lambda: len(held) == 1)
            [message] = held
            own.kill()
            before = time.monotonic()
            keep_undeliverable(message, "eventbuffer.nope", "NotRegistered", (), timer)
            took = time.monotonic() - before
            assert not message.acknowledged
            assert inflight(redis) == 1 and redis.llen("tq") == 0  # kept, not requeued
            [scheduled] = timer.queue
            print(f"keep_undeliverable returned after {took:.3f} s")
            own.start()
            for _ in range(5):  # the retries the timer would run (each schedules the next)
                entries = [event.entry for event in timer.queue]
                timer.clear()
                for entry in entries:
                    entry()
            assert message.acknowledged
            assert not timer.queue
        assert inflight(redis) == 0 and redis.llen("tq") == 0
        assert own.client().llen(ShardKeys("eventbuffer", 0).dead) == 1
    finally:
        timer.stop()
        runtime.reset()
    assert scheduled.entry.args[-1] == RETRY_FIRST_S * 2  # the next pause, doubled


@pytest.mark.slow
def test_a_worker_keeps_an_undeliverable_task_unacknowledged_until_the_buffer_is_back(
    tmp_path: Path,
) -> None:
    buffer = start_redis(tmp_path / "buffer")
    system = System(tmp_path, buffer.url)
    try:
        proc = system.worker("w", "-P", "solo")
        proc.wait_for("ready.")
        buffer.kill()
        # An unknown eventbuffer.* task: Celery refuses it before any task runs.
        system.app.send_task(
            "eventbuffer.no_such_task", args=[[{"id": "e1"}]], queue="ingest", ignore_result=True
        )
        proc.wait_for("stays unacknowledged in the broker")
        for _ in range(3):  # the timer's retries (1 s, 2 s, ...) keep it where it is
            assert system.inflight() == 1 and system.broker.llen("ingest") == 0
            time.sleep(1)
        text = proc.text()
        assert text.count("could not be dead-lettered") == 1, text[-3000:]
        assert "goes back to its queue" not in text
        buffer.start()
        proc.wait_for("kept as a dead letter", timeout=60)
        wait_until(lambda: system.inflight() == 0, 10, "the message acknowledged")
        assert system.broker.llen("ingest") == 0
        assert buffer.client().llen(ShardKeys("eventbuffer", 0).dead) == 1
        proc.stop()
        assert "Traceback" not in proc.text()
    finally:
        if buffer.process is None or buffer.process.poll() is not None:
            buffer.start()
        system.close()
        buffer.stop()


# -- (c) tasks held by live and by dead workers -------------------------------------------


def test_holdings_tell_live_from_dead_consumers_and_when_theirs_come_back(
    redis: redis_lib.Redis,
) -> None:
    q = "tq"
    redis.lpush(q, b"a", b"b", b"c")
    dying = BrokerConsumer(redis, KEYS, timeout_s=1.0)  # never beats: dead after 1 s
    assert dying.fetch([q]) is not None and dying.fetch([q]) is not None
    alive = BrokerConsumer(redis, KEYS, timeout_s=30.0)
    assert alive.fetch([q]) is not None
    now = read_holdings(redis, KEYS, timeout_s=1.0)
    assert (now.held_by_live, now.held_by_dead) == (3, 0)
    wait_until(
        lambda: read_holdings(redis, KEYS, timeout_s=1.0).held_by_dead == 2, 10, "a deadline"
    )
    later = read_holdings(redis, KEYS, timeout_s=1.0)
    [dead] = later.dead
    assert dead.consumer == dying.id and dead.held == 2 and later.held_by_live == 1
    # Due back at its deadline plus one beat of a live consumer (0.2 s for a 1 s timeout).
    assert later.due_in_s(dead) <= later.beat_ms / 1000
    assert later.recovery_due_s == max(0.0, later.due_in_s(dead))
    alive.start_heartbeat(redis_lib.Redis(connection_pool=redis.connection_pool))
    try:
        wait_until(
            lambda: read_holdings(redis, KEYS, timeout_s=1.0).held_by_dead == 0, 10, "recovery"
        )
    finally:
        alive.stop_heartbeat()
    assert redis.llen(q) == 2  # back in their queue
    assert read_holdings(redis, KEYS, timeout_s=1.0).held_by_live == 1


@pytest.mark.slow
def test_status_shows_what_a_killed_worker_holds_until_another_takes_it_back(
    tmp_path: Path,
    redis_url: str,
    redis: redis_lib.Redis,
    run_main: Callable[..., Result],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    system = System(tmp_path, redis_url)
    monkeypatch.setenv("CELERY_BROKER_URL", system.broker_server.url)
    monkeypatch.setenv(
        "EVENT_BUFFER_CONSUMER_TIMEOUT_S", system.env["EVENT_BUFFER_CONSUMER_TIMEOUT_S"]
    )

    def status() -> dict[str, Any]:
        return dict(json.loads(run_main("status", "--json").out)["broker"])

    try:
        doomed = system.worker("doomed", "-P", "prefork", "-c", "1")
        doomed.wait_for("ready.")
        # Registered by its heartbeat thread's first beat, which may come after "ready.".
        wait_until(lambda: len(system.consumers()) == 1, 10, "the worker's registry entry")
        [doomed_id] = system.consumers()
        system.pause_buffer(4000)
        system.send(8)
        wait_until(lambda: system.inflight() == 4, 10, "the worker to hold 4 tasks")
        held = status()["held"]
        assert (held["held_by_live"], held["held_by_dead"]) == (4, 0)
        doomed.kill()
        system.buffer.execute_command("CLIENT", "UNPAUSE")
        # The queues look empty; status says where the tasks are. No worker is alive: they
        # wait for the next one to start.
        wait_until(lambda: status()["held"]["held_by_dead"] == 4, 20, "the deadline to pass")
        broker = status()
        assert broker["queues"]["ingest"]["waiting"] == 4  # 4 never fetched (prefetch 4)
        assert broker["held"]["held_by_live"] == 0 and broker["held"]["live_consumers"] == 0
        [entry] = broker["held"]["consumers"]
        assert entry["consumer"] == doomed_id and not entry["alive"] and entry["held"] == 4
        text = " ".join(run_main("status").out.split())
        assert "Broker tasks held by workers (fetched, not acknowledged): 0 by live" in text
        assert f"! Worker {doomed_id} is dead" in text and "holds 4 tasks" in text
        assert "when a worker starts on this broker (none is alive)" in text
        metrics = run_main("metrics").out
        assert 'eventbuffer_broker_tasks_held{consumer="dead"} 4.0' in metrics
        assert 'eventbuffer_broker_tasks_held{consumer="live"} 0.0' in metrics
        other = system.worker("other", "-P", "solo")
        other.wait_for("ready.")
        wait_until(lambda: status()["held"]["held_by_dead"] == 0, 20, "the recovery")
        system.wait_applied()
        wait_until(lambda: status()["held"]["held_by_live"] == 0, 10, "the last ack")
        assert "Broker tasks held" not in run_main("status").out
        other.stop()
        system.assert_exactly_once()
        assert f"found consumer {doomed_id} dead" in other.text()
    finally:
        system.close()


def holdings_snapshot() -> dict[str, Any]:
    now = 1_000_000
    timeout = 30_000
    holdings = Holdings(
        now_ms=now,
        timeout_ms=timeout,
        parked=3,
        holders=[
            Holder("ip-10-20-30-40.eu-west-1.compute.internal:4194303:feedface", 4, now + 29_000),
            Holder("ip-10-20-30-41.eu-west-1.compute.internal:4194303:cafebabe", 7, now + 17_000),
            Holder("ip-10-20-30-42.eu-west-1.compute.internal:77:deadbeef", 12, now - 2_000),
        ],
    )
    return {"url": "redis://localhost:6379/1", "queues": {}, "held": holdings.as_dict()}


def test_held_lines_say_who_is_silent_who_is_dead_and_when_their_tasks_come_back() -> None:
    lines = " ".join(held_lines(holdings_snapshot()))
    assert "23 by live workers" not in lines
    assert "11 by live workers, 12 by dead ones" in lines
    # Silent for 13 s (heartbeats every 6 s): back within 23 s if it is dead.
    assert "cafebabe holds 7 tasks and has sent no heartbeat for 13 s (one every 6 s)" in lines
    assert "if it is dead, they go back to their queues within 23 s" in lines
    assert "feedface" not in lines  # beating: nothing to say
    assert "deadbeef is dead (no heartbeat for 32 s) and holds 12 tasks" in lines
    assert "a live worker puts them back in their queues within 4 s" in lines
    assert "! 3 messages kombu cannot deliver parked" in lines


def test_watch_shows_the_held_lines_within_80_columns(
    redis: redis_lib.Redis, settings: Settings
) -> None:
    runtime.configure(settings)
    try:
        from worker.cli.status import status_data

        data = status_data(settings)
    finally:
        runtime.reset()
    data["broker"] = holdings_snapshot()
    state = WatchState()
    state.update(data, at=0.0)
    console = Console(record=True, width=80, force_terminal=False)
    console.print(render(data, state, settings.high_water))
    view = console.export_text()
    assert max(len(line) for line in view.splitlines()) <= 80, view
    flat = " ".join(view.replace("│", " ").split())
    assert "11 by live workers, 12 by dead ones" in flat, view
    assert "a live worker puts them back in their queues within 4 s" in flat, view
