"""No message stops or stalls a worker: hostile envelopes against a real worker.

Anyone who can write to the broker can put anything in a queue list. One
real `celery -A worker worker -P solo` on the reliable transport (its own
broker Redis and buffer Redis) takes, test after test, a message that once
stopped a worker (issue #24) followed by a valid task: the valid task must
be applied, the worker must stay up, and the hostile message must be kept
(parked unchanged in `_eventbuffer.broker.unparsable`, or an
`undeliverable_task` dead letter with its raw body). Then the registry and
in-flight entries that blocked the recovery of a dead worker, a message
over EVENT_BUFFER_MAX_MESSAGE_BYTES, and a far-future ETA.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgspec
import pytest

from tests.support.celery_procs import CeleryProcess, project_env, worker
from tests.support.dates import BASE_MS
from tests.support.envelopes import encoded, protocol1_envelope, task_envelope
from tests.support.polling import wait_until
from tests.support.servers import start_redis
from worker.broker.broker_keys import BrokerKeys
from worker.broker.envelope import OversizedHeader
from worker.deadletters import REASON_UNDELIVERABLE, decode_dead_letter
from worker.keys import Keyspace

pytestmark = pytest.mark.slow

KEYS = BrokerKeys()
MAX_MESSAGE_BYTES = 100_000
CONSUMER_TIMEOUT_S = 2


def event(tag: str = "ok") -> dict[str, Any]:
    return {"id": str(uuid.uuid4()), "project_id": "p", "name": tag, "created_at": BASE_MS}


class Rig:
    """A broker Redis and a buffer Redis of this module's own, and one solo worker."""

    def __init__(self, tmp: Path, pool: str = "solo") -> None:
        self.tmp = tmp
        self.pool = pool
        self.broker_server = start_redis(tmp / "broker")
        self.buffer_server = start_redis(tmp / "buffer")
        self.env = project_env(
            REDIS_URL=self.buffer_server.url,
            CELERY_BROKER_URL=self.broker_server.url,
            CLICKHOUSE_URL=f"chdb://{tmp / 'ch'}",
            EVENT_BUFFER_CONSUMER_TIMEOUT_S=str(CONSUMER_TIMEOUT_S),
            EVENT_BUFFER_MAX_MESSAGE_BYTES=str(MAX_MESSAGE_BYTES),
        )
        self.broker = self.broker_server.client()
        self.buffer = self.buffer_server.client()
        self.queue = Keyspace("eventbuffer", 1).shard(0).queue
        self.dead = Keyspace("eventbuffer", 1).shard(0).dead
        self.proc: CeleryProcess | None = None
        self.starts = 0

    def ensure_worker(self, *, restart: bool = False) -> CeleryProcess:
        """The worker, started again if a test before stopped it (or to `restart` it)."""
        if self.proc is not None and self.proc.alive() and not restart:
            return self.proc
        if self.proc is not None:
            self.proc.stop()
        self.starts += 1
        self.proc = worker(
            self.env,
            self.tmp / f"worker-{self.starts}.log",
            "-Q",
            "ingest",
            "-P",
            self.pool,
            "-n",
            f"w{self.starts}@%h",
        )
        self.proc.wait_for("ready.", 60)
        return self.proc

    def reset(self) -> None:
        self.broker.delete(KEYS.unparsable, "ingest")
        self.buffer.flushdb()

    def push(self, *raw: bytes) -> None:
        for message in raw:
            self.broker.lpush("ingest", message)

    def send(self, events: list[dict[str, Any]], **changes: Any) -> dict[str, Any]:
        envelope = task_envelope(events)
        envelope["headers"].update(changes)
        self.push(encoded(envelope))
        return envelope

    def applied(self) -> Counter[str]:
        return Counter(json.loads(row)["id"] for row in self.buffer.lrange(self.queue, 0, -1))

    def wait_applied(self, ids: list[str], timeout: float = 30) -> None:
        proc = self.proc
        assert proc is not None
        wait_until(
            lambda: set(ids) <= set(self.applied()),
            timeout,
            f"{len(ids)} events applied",
            alive=proc.alive,
            detail=lambda: proc.text()[-3000:],
        )

    def parked(self) -> list[bytes]:
        return list(reversed(self.broker.lrange(KEYS.unparsable, 0, -1)))  # oldest first

    def dead_letters(self) -> list[tuple[Any, bytes]]:
        return [decode_dead_letter(entry) for entry in self.buffer.lrange(self.dead, 0, -1)]

    def inflight(self) -> int:
        indexes = self.broker.scan_iter(KEYS.inflight("*"), _type="hash")  # forged: not hashes
        return sum(int(self.broker.hlen(k)) for k in indexes)

    def still_up(self) -> None:
        """The worker is alive and never hit an unrecoverable error."""
        proc = self.proc
        assert proc is not None and proc.alive(), proc and proc.text()[-3000:]
        assert "Unrecoverable error" not in proc.text(), proc.text()[-3000:]

    def close(self) -> None:
        if self.proc is not None:
            self.proc.stop()
        self.broker.close()
        self.buffer.close()
        self.broker_server.stop()
        self.buffer_server.stop()


@pytest.fixture(scope="module")
def rig_module(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Rig]:
    rig = Rig(tmp_path_factory.mktemp("hostile"))
    try:
        yield rig
    finally:
        rig.close()


@pytest.fixture
def rig(rig_module: Rig) -> Rig:
    rig_module.reset()
    rig_module.ensure_worker()
    return rig_module


def then_a_valid_task_runs(rig: Rig) -> None:
    """A valid task behind the hostile message is applied, once; the worker stays up."""
    good = [event(), event()]
    rig.send(good)
    rig.wait_applied([e["id"] for e in good])
    rig.still_up()
    assert max(rig.applied().values()) == 1
    wait_until(lambda: rig.inflight() == 0, 10, "nothing left in the worker's keeping")


# -- envelopes kombu cannot deliver: parked unchanged ------------------------------------


def envelope_with(path: str, value: Any) -> dict[str, Any]:
    envelope = task_envelope([event("hostile")])
    *parents, leaf = path.split(".")
    node = envelope
    for name in parents:
        node = node[name]
    if value is DELETE:
        del node[leaf]
    else:
        node[leaf] = value
    return envelope


DELETE = object()


@pytest.mark.parametrize(
    ("path", "value"),
    [
        ("properties.delivery_tag", [1]),  # the crash loop: unhashable in kombu's QoS
        ("properties.delivery_tag", {"a": 1}),
        ("properties.body_encoding", "rot13"),
        ("body", DELETE),  # no body: dead-lettering it once failed and retried forever
        ("properties", ["not", "an", "object"]),
        ("headers", "not an object"),
    ],
    ids=["tag-list", "tag-dict", "rot13", "no-body", "properties-list", "headers-string"],
)
def test_an_envelope_kombu_cannot_deliver_is_parked_and_the_worker_goes_on(
    rig: Rig, path: str, value: Any
) -> None:
    bad = encoded(envelope_with(path, value))
    rig.push(bad)
    then_a_valid_task_runs(rig)
    assert rig.parked() == [bad]
    assert "Cannot deliver this message" in (rig.proc.text() if rig.proc else "")


def test_the_crash_loop_message_does_not_come_back_after_a_restart(rig: Rig) -> None:
    bad = encoded(envelope_with("properties.delivery_tag", [1]))
    rig.push(bad)
    then_a_valid_task_runs(rig)
    rig.ensure_worker(restart=True)
    then_a_valid_task_runs(rig)
    assert rig.parked() == [bad]
    assert rig.broker.llen("ingest") == 0


# -- messages Celery dies on or drops: dead letters for eventbuffer, parked otherwise ----


@pytest.mark.parametrize(
    ("header", "value"),
    [
        ("id", {"a": 1}),
        ("timelimit", "abc"),
        ("timelimit", [1, 2, 3]),
        ("eta", "not a date"),
        ("expires", ["x"]),
        ("retries", "many"),
        ("root_id", {"x": 1}),
    ],
)
def test_bad_celery_headers_on_an_ingest_task_make_a_dead_letter(
    rig: Rig, header: str, value: Any
) -> None:
    events = [event("kept")]
    envelope = rig.send(events, **{header: value})
    then_a_valid_task_runs(rig)
    assert not set(e["id"] for e in events) & set(rig.applied())
    [(letter, raw)] = rig.dead_letters()
    assert letter.reason == REASON_UNDELIVERABLE
    assert letter.task == "eventbuffer.ingest_events"
    assert f"headers.{header}" in letter.error
    assert raw == base64.b64decode(envelope["body"])  # the raw body: replayable
    assert rig.parked() == []


@pytest.mark.parametrize(("field", "value"), [("id", ["x"]), ("timelimit", "abc")])
def test_bad_task_fields_in_a_protocol1_body_make_a_dead_letter(
    rig: Rig, field: str, value: Any
) -> None:
    events = [event("kept")]
    envelope = protocol1_envelope(events)
    body = json.loads(base64.b64decode(envelope["body"]))
    body[field] = value
    raw = json.dumps(body).encode()
    envelope["body"] = base64.b64encode(raw).decode()
    rig.push(encoded(envelope))
    then_a_valid_task_runs(rig)
    assert not set(e["id"] for e in events) & set(rig.applied())
    [(letter, stored)] = rig.dead_letters()
    assert letter.reason == REASON_UNDELIVERABLE and f"body.{field}" in letter.error
    assert stored == raw
    assert rig.parked() == []


@pytest.mark.parametrize(
    "change",
    [
        "no-headers",
        "empty-headers",
        "no-headers-not-json",
        "task-int",
        "task-null",
        "task-list",
        "protocol1-task-dict",
    ],
)
def test_a_message_without_a_usable_task_name_is_parked_not_dropped(rig: Rig, change: str) -> None:
    envelope = task_envelope([event("nameless")])
    if change == "no-headers":
        del envelope["headers"]
    elif change == "empty-headers":
        envelope["headers"] = {}
    elif change == "no-headers-not-json":  # Celery logs "Can't decode message body" and drops it
        envelope["headers"] = {}
        envelope["body"] = base64.b64encode(b"[[{not json").decode()
    elif change == "protocol1-task-dict":
        envelope = protocol1_envelope([event("nameless")])
        body = json.loads(base64.b64decode(envelope["body"]))
        body["task"] = {"name": "eventbuffer.ingest_events"}
        envelope["body"] = base64.b64encode(json.dumps(body).encode()).decode()
    else:
        envelope["headers"]["task"] = {"task-int": 5, "task-null": None, "task-list": ["x"]}[change]
    bad = encoded(envelope)
    rig.push(bad)
    then_a_valid_task_runs(rig)
    assert rig.parked() == [bad]
    assert rig.dead_letters() == []


def test_a_dead_letter_that_cannot_be_stored_for_a_reason_not_redis_is_not_retried(
    rig: Rig,
) -> None:
    # An unknown eventbuffer.* task is kept as a dead letter; a name with a lone surrogate
    # cannot be encoded into one. That is no Redis outage: waiting will not fix it.
    envelope = task_envelope([event("surrogate")])
    envelope["headers"]["task"] = "eventbuffer.\ud800"
    bad = json.dumps(envelope).encode()  # the surrogate as a JSON escape
    rig.push(bad)
    then_a_valid_task_runs(rig)
    proc = rig.proc
    assert proc is not None
    wait_until(lambda: rig.parked() or rig.dead_letters(), 10, "the message kept")
    assert rig.parked() == [bad] or len(rig.dead_letters()) == 1
    time.sleep(2.5)  # a retry would have come after 1 s, then 2 s
    assert "tried again" not in proc.text()
    assert rig.broker.llen("ingest") == 0 and rig.inflight() == 0


def test_a_far_future_eta_is_ignored_and_the_task_runs_now(rig: Rig) -> None:
    events = [event("eta")]
    later = (dt.datetime.now(dt.UTC) + dt.timedelta(days=30)).isoformat()
    rig.send(events, eta=later)
    rig.wait_applied([e["id"] for e in events], timeout=20)
    then_a_valid_task_runs(rig)
    assert "its ETA" in (rig.proc.text() if rig.proc else "")


def test_an_expired_ingest_task_is_applied_not_dropped(rig: Rig) -> None:
    events = [event("expired")]
    rig.send(events, expires="2000-01-01T00:00:00+00:00")
    rig.wait_applied([e["id"] for e in events], timeout=20)
    then_a_valid_task_runs(rig)
    assert "its expiry" in (rig.proc.text() if rig.proc else "")


# -- the size limit ------------------------------------------------------------------------


def test_a_message_over_the_size_limit_is_parked_cut_and_never_decoded(rig: Rig) -> None:
    events = [dict(event("huge"), properties={"blob": "x" * 1000}) for _ in range(200)]
    bad = encoded(task_envelope(events))
    assert len(bad) > MAX_MESSAGE_BYTES
    rig.push(bad)
    then_a_valid_task_runs(rig)
    assert not set(e["id"] for e in events) & set(rig.applied())
    [record] = rig.parked()
    line, _, head = record.partition(b"\n")
    header = msgspec.json.decode(line, type=OversizedHeader)
    assert (header.bytes, header.limit) == (len(bad), MAX_MESSAGE_BYTES)
    assert head == bad[: header.kept] and header.kept <= MAX_MESSAGE_BYTES
    assert bad.endswith(header.tail.encode())  # the headers and properties: which task
    assert len(record) < MAX_MESSAGE_BYTES + 4096
    assert "over EVENT_BUFFER_MAX_MESSAGE_BYTES" in (rig.proc.text() if rig.proc else "")


# -- recovery of a dead worker cannot be blocked by forged registry entries -----------------


def plant_dead_consumer(rig: Rig, consumer: str, events: list[dict[str, Any]]) -> None:
    """A consumer that fetched one task and died: what broker_fetch.lua leaves behind."""
    message = encoded(task_envelope(events))
    rig.broker.rpush(KEYS.message(consumer, 1), message)
    rig.broker.hset(KEYS.inflight(consumer), "1", "ingest")
    rig.broker.zadd(KEYS.registry, {consumer: 1_000})  # its deadline long past


def test_registry_entries_that_are_not_utf8_do_not_block_recovery(rig: Rig) -> None:
    forged = {b"\xff\xfe-forged-%d" % n: n for n in range(15)}  # older than any real one
    rig.broker.zadd(KEYS.registry, forged)  # type: ignore[arg-type]
    events = [event("recovered")]
    plant_dead_consumer(rig, "host:1:dead", events)
    rig.wait_applied([e["id"] for e in events], timeout=30)
    then_a_valid_task_runs(rig)
    members = rig.broker.zrange(KEYS.registry, 0, -1)
    assert not set(forged) & set(members), "the forged entries were removed"
    assert b"host:1:dead" not in members


def test_an_inflight_index_with_a_bad_seq_does_not_block_recovery(rig: Rig) -> None:
    mixed = [event("mixed")]
    plant_dead_consumer(rig, "host:2:mixed", mixed)
    rig.broker.hset(KEYS.inflight("host:2:mixed"), mapping={"abc": "ingest", "9e9": "x"})
    rig.broker.zadd(KEYS.registry, {"host:2:mixed": 500})  # listed before the next one
    # A forged destination that is not a list: the message is parked instead.
    wrong = [event("wrong-destination")]
    plant_dead_consumer(rig, "host:3:wrongtype", wrong)
    rig.broker.set("not-a-list", "x")
    rig.broker.hset(KEYS.inflight("host:3:wrongtype"), "1", "not-a-list")
    rig.broker.set(KEYS.inflight("host:5:string"), "an index that is not a hash")
    rig.broker.zadd(KEYS.registry, {"host:5:string": 100})
    genuine = [event("genuine")]
    plant_dead_consumer(rig, "host:4:genuine", genuine)
    rig.broker.zadd(KEYS.registry, {"host:4:genuine": 2_000})
    rig.wait_applied([e["id"] for e in mixed + genuine], timeout=30)
    then_a_valid_task_runs(rig)
    wait_until(lambda: rig.broker.zcard(KEYS.registry) == 1, 10, "only the live worker left")
    assert not rig.broker.exists(KEYS.inflight("host:2:mixed"))
    [parked] = rig.parked()
    assert json.loads(parked)["headers"]["id"]  # the message, unchanged, out of the way
