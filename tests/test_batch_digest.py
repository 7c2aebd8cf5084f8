"""A reused batch id is never a silent drop (issue #18, requirement 6).

The batch markers hold a digest of the batch's content. A redelivery (same
id, same content, however its JSON was re-encoded on the way) is skipped as
before; the same id with other content is kept whole as one
`batch_id_conflict` dead letter (ERROR log, metric), once however often it is
redelivered, and `eventbuffer dlq replay` applies it under a new batch id.
A task whose `batch_id` argument is no batch id (an event passed as a second
argument to `ingest_event`) is an undeliverable task, kept with its raw body.

Real Redis throughout; real Celery workers where it is Celery's behaviour.
"""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import msgspec
import pytest
import redis as redis_lib
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from tests.conftest import Result
from tests.support.celery_procs import project_env, worker
from tests.support.clock import ManualClock
from tests.support.dates import BASE_MS
from tests.support.polling import wait_until
from worker import bodies
from worker.bodies import MAX_BATCH_ID_CHARS, body_batch, call_problem
from worker.buffer import EventBuffer
from worker.celery import create_app
from worker.deadletters import DeadLetter, decode_dead_letter
from worker.errors import BatchIdConflictError
from worker.ingestion import dead_letter_batch, ingest
from worker.keys import ShardKeys, shard_for
from worker.settings import Settings

SHARD = ShardKeys("eventbuffer", 0)


def ev(name: str, **fields: Any) -> dict[str, Any]:
    return {"id": str(uuid.uuid4()), "project_id": "p", "name": name, "created_at": BASE_MS,
            **fields}  # fmt: skip


def dead_letters(redis: redis_lib.Redis, shards: int = 1) -> list[tuple[DeadLetter, bytes]]:
    return [
        decode_dead_letter(entry)
        for n in range(shards)
        for entry in redis.lrange(ShardKeys("eventbuffer", n).dead, 0, -1)
    ]


def queued(redis: redis_lib.Redis, shards: int = 1) -> list[dict[str, Any]]:
    return [
        json.loads(row)
        for n in range(shards)
        for row in redis.lrange(ShardKeys("eventbuffer", n).queue, 0, -1)
    ]


def queued_ids(redis: redis_lib.Redis, shards: int = 1) -> list[str]:
    return sorted(row["id"] for row in queued(redis, shards))


def sharded(settings: Settings, shards: int) -> Settings:
    return Settings.from_env(
        {
            "REDIS_URL": settings.redis_url,
            "CLICKHOUSE_URL": settings.clickhouse_url,
            "EVENT_BUFFER_REORDER_WINDOW_MS": "0",
            "EVENT_BUFFER_SHARDS": str(shards),
        }
    )


def session_on(shard: int, shards: int, tag: str) -> str:
    """A session id that routes to `shard` of `shards`."""
    n = 0
    while shard_for(f"{tag}-{n}", shards) != shard:
        n += 1
    return f"{tag}-{n}"


# -- same id, same content: a redelivery ------------------------------------------------


def test_a_redelivered_batch_is_skipped_and_its_markers_hold_the_digest(
    buffer: EventBuffer, redis: redis_lib.Redis
) -> None:
    batch = [ev("a"), ev("b"), {"project_id": "p", "name": "no id", "created_at": BASE_MS}]
    first = ingest(buffer, batch, "task-1")
    again = ingest(buffer, batch, "task-1")
    assert (first.duplicate, first.appended, first.conflict) == (False, 3, False)
    assert (again.duplicate, again.appended, again.conflict) == (True, 0, False)
    assert len(queued_ids(redis)) == 3
    marker = redis.get(SHARD.batch("task-1"))
    assert marker is not None and len(marker) == 32 and marker != b"1"  # a digest
    assert dead_letters(redis) == []


def test_a_redelivery_re_encoded_on_the_way_is_the_same_batch(
    buffer: EventBuffer, redis: redis_lib.Redis
) -> None:
    # As sent by another client (spaces, other key order), then as a Celery retry re-sends
    # it (Python's JSON of the decoded arguments), then as the worker decodes each: the same.
    good = {"id": str(uuid.uuid4()), "project_id": "p", "name": "x", "created_at": BASE_MS}
    bad = {"project_id": "p", "name": 5, "created_at": BASE_MS, "z": [1, 2]}
    sent = (
        b'[ {"name" : "x", "created_at": %d, "project_id":"p", "id": "%s"},\n'
        % (
            BASE_MS,
            good["id"].encode(),
        )
        + b'  {"z": [1,2], "created_at": %d, "name": 5, "project_id": "p"} ]' % BASE_MS
    )
    first = ingest(buffer, msgspec.Raw(sent), "task-2")
    assert (first.appended, first.invalid) == (1, 1)
    for body in (json.dumps([good, bad]), [good, bad], msgspec.Raw(json.dumps([good, bad]))):
        again = ingest(buffer, body, "task-2")
        assert again.duplicate and not again.conflict, body
    assert queued_ids(redis) == [good["id"]]
    assert len(dead_letters(redis)) == 1  # the invalid item, once


def test_markers_written_before_digests_still_skip_their_batch(
    buffer: EventBuffer, redis: redis_lib.Redis
) -> None:
    redis.set(SHARD.batch("old-task"), 1, ex=60)  # what a marker held before this change
    result = ingest(buffer, [ev("a")], "old-task")
    assert result.duplicate and not result.conflict
    assert queued_ids(redis) == [] and dead_letters(redis) == []


# -- same id, other content: a conflict ---------------------------------------------------


def test_the_same_id_with_other_content_becomes_one_conflict_dead_letter(
    buffer: EventBuffer, redis: redis_lib.Redis, caplog: pytest.LogCaptureFixture
) -> None:
    first = [ev("a"), ev("b")]
    second = [ev("c"), {"project_id": "p", "name": "d", "created_at": BASE_MS}, {"bad": 1}]
    third = [ev("e")]
    assert not ingest(buffer, first, "counter-7").duplicate
    with caplog.at_level(logging.ERROR, logger="worker.ingestion"):
        reused = ingest(buffer, second, "counter-7")
    assert reused.conflict and not reused.duplicate and (reused.appended, reused.invalid) == (0, 0)
    assert queued_ids(redis) == sorted(e["id"] for e in first)  # nothing of it applied
    [(header, raw)] = dead_letters(redis)
    assert (header.reason, header.source, header.claim) == (
        "batch_id_conflict",
        "ingest",
        "counter-7",
    )
    assert json.loads(raw) == second  # the batch, whole, invalid item included
    assert "applied before with other content" in header.error
    [record] = [r for r in caplog.records if "batch_id_conflict" in r.getMessage()]
    assert record.levelno == logging.ERROR and "counter-7" in record.getMessage()

    # The conflicting task redelivered: nothing more. Yet another content: kept too.
    again = ingest(buffer, second, "counter-7")
    assert again.duplicate and not again.conflict
    assert len(dead_letters(redis)) == 1
    assert ingest(buffer, third, "counter-7").conflict
    assert [json.loads(raw) for _, raw in dead_letters(redis)] == [second, third]
    # And the first batch, redelivered, is still just a redelivery.
    assert ingest(buffer, first, "counter-7").duplicate
    assert len(queued_ids(redis)) == 2


def test_a_conflict_is_replayed_under_a_new_batch_id(
    buffer: EventBuffer, redis: redis_lib.Redis, run_main: Callable[..., Result]
) -> None:
    # Events without an id derive theirs from the batch id and their position: the
    # replayed ones must not take the ids of the first batch's events.
    no_id = {"project_id": "p", "name": "no id", "created_at": BASE_MS}
    first = [dict(no_id, name="first"), ev("a")]
    second = [dict(no_id, name="second"), ev("b"), ev("c")]
    ingest(buffer, first, "deterministic-id")
    assert ingest(buffer, second, "deterministic-id").conflict
    before = queued_ids(redis)

    replayed = run_main("dlq", "replay", "--yes")
    assert replayed.code == 0, replayed.err
    rows = queued(redis)
    assert sorted(row["name"] for row in rows) == ["a", "b", "c", "first", "second"]
    assert len({row["id"] for row in rows}) == 5  # no id taken twice
    assert set(before) < {row["id"] for row in rows}
    assert dead_letters(redis) == []
    assert "Nothing to replay" in run_main("dlq", "replay", "--yes").out
    # The first batch, redelivered after all this, is still skipped.
    assert ingest(buffer, first, "deterministic-id").duplicate
    assert len(queued(redis)) == 5


def test_a_conflict_is_counted() -> None:
    import worker.metrics.counters as metrics_module
    from worker.ingestion import IngestResult

    metrics = metrics_module.Metrics(CollectorRegistry())
    metrics_module._metrics = metrics
    try:
        conflict = IngestResult("b", 2, 1, 0, False, 0, {}, conflict=True)
        metrics_module.record_ingest(conflict, 0.001)
    finally:
        metrics_module._metrics = None
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(generate_latest(metrics.registry).decode())
        for s in family.samples
    }
    assert samples[("eventbuffer_batch_id_conflicts_total", ())] == 1
    assert samples[("eventbuffer_ingest_batches_total", (("outcome", "batch_id_conflict"),))] == 1
    assert samples[("eventbuffer_ingest_batches_total", (("outcome", "applied"),))] == 0
    assert samples[("eventbuffer_dead_letters_total", (("reason", "batch_id_conflict"),))] == 1
    assert samples[("eventbuffer_dead_letters_total", (("reason", "invalid_event"),))] == 0


def test_shards_that_disagree_make_the_whole_batch_a_conflict(
    redis: redis_lib.Redis,
    settings: Settings,
    clock: ManualClock,
    run_main: Callable[..., Result],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The first batch went to shards 0 and 1; the second, same id, to shards 1 and 2:
    # shard 1 holds the other digest, shard 2 none. Nothing of the second is applied
    # (on shard 2 neither), it is kept whole, and its replay applies all of it once.
    buffer = EventBuffer(redis, sharded(settings, 4), clock)
    s0, s1, s2 = (session_on(n, 4, f"s{n}") for n in range(3))
    first = [ev("a", session_id=s0), ev("b", session_id=s1)]
    second = [ev("c", session_id=s1), ev("d", session_id=s2)]
    ingest(buffer, first, "reused")
    result = ingest(buffer, second, "reused")
    assert result.conflict and result.appended == 0
    assert queued_ids(redis, 4) == sorted(e["id"] for e in first)
    assert redis.get(ShardKeys("eventbuffer", 2).batch("reused")) is None
    [(header, raw)] = dead_letters(redis, 4)
    assert header.reason == "batch_id_conflict" and json.loads(raw) == second

    monkeypatch.setenv("EVENT_BUFFER_SHARDS", "4")
    assert run_main("dlq", "replay", "--yes").code == 0
    assert queued_ids(redis, 4) == sorted(e["id"] for e in first + second)
    assert ingest(buffer, second, "reused").duplicate  # the conflict, redelivered again
    assert len(queued_ids(redis, 4)) == 4 and dead_letters(redis, 4) == []


def test_a_batch_applied_in_part_before_keeps_only_what_it_had_not_applied(
    redis: redis_lib.Redis,
    settings: Settings,
    clock: ManualClock,
    run_main: Callable[..., Result],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # On a Redis Cluster each shard is its own transaction: a delivery can apply the
    # batch to shard 2 and fail before shard 1, while another batch with the same id
    # takes shard 1. That state, made by hand: the redelivery conflicts on shard 1
    # only; the dead letter holds shard 1's events (and the invalid item, which went
    # with shard 1's transaction), never shard 2's, which were applied.
    buffer = EventBuffer(redis, sharded(settings, 4), clock)
    s1, s2 = session_on(1, 4, "one"), session_on(2, 4, "two")
    batch = [
        ev("a", session_id=s1),
        ev("b", session_id=s2),
        ["not an event"],
        ev("c", session_id=s1),
    ]
    ingest(buffer, batch, "split")
    shard1 = ShardKeys("eventbuffer", 1)
    redis.delete(shard1.queue, shard1.dead)  # shard 1's part was never applied ...
    redis.set(shard1.batch("split"), "0" * 32, ex=60)  # ... another batch took its marker
    applied = queued_ids(redis, 4)
    assert applied == [batch[1]["id"]]

    result = ingest(buffer, batch, "split")
    assert result.conflict and result.appended == 0
    [(header, raw)] = dead_letters(redis, 4)
    assert header.reason == "batch_id_conflict" and "shards [2]" in header.error
    assert json.loads(raw) == [batch[0], batch[2], batch[3]]

    monkeypatch.setenv("EVENT_BUFFER_SHARDS", "4")
    assert run_main("dlq", "replay", "--yes").code == 0
    assert queued_ids(redis, 4) == sorted(batch[n]["id"] for n in (0, 1, 3))  # each once
    [(invalid, raw)] = dead_letters(redis, 4)
    assert invalid.reason == "invalid_event" and json.loads(raw) == ["not an event"]


def test_apply_without_a_keeper_refuses_a_conflict(
    buffer: EventBuffer, redis: redis_lib.Redis
) -> None:
    from worker.events import parse_event

    buffer.apply([parse_event(ev("a"))], batch_id="b")
    with pytest.raises(BatchIdConflictError, match="other content"):
        buffer.apply([parse_event(ev("b"))], batch_id="b")
    assert len(queued_ids(redis)) == 1


def test_whole_batch_dead_letters_of_a_reused_task_id_are_each_kept_once(
    buffer: EventBuffer, redis: redis_lib.Redis
) -> None:
    def keep(raw: bytes) -> bool:
        return dead_letter_batch(
            buffer, raw, "task-9", reason="ingest_failed", error="boom", task="t"
        )

    assert keep(b'[{"a":1}]') and not keep(b'[{"a":1}]')
    assert keep(b'[{"a":2}]') and not keep(b'[{"a":2}]')
    assert [raw for _, raw in dead_letters(redis)] == [b'[{"a":1}]', b'[{"a":2}]']


# -- a batch_id argument that is no batch id ------------------------------------------------


def _signature(task: str) -> Any:
    import inspect

    import tasks.ingest

    fn = tasks.ingest.ingest_event if task == "event" else tasks.ingest.ingest_events
    return inspect.signature(fn.run)


@pytest.mark.parametrize(
    ("args", "kwargs", "problem"),
    [
        ([msgspec.Raw(b'{"name":"e1"}'), msgspec.Raw(b'{"name":"e2"}')], {}, "got object"),
        ([{"name": "e1"}, {"name": "e2"}], {}, "got object"),
        ([{"name": "e1"}], {"batch_id": 5}, "got number"),
        ([{"name": "e1"}], {"batch_id": ["a"]}, "got array"),
        ([{"name": "e1"}, "x" * (MAX_BATCH_ID_CHARS + 1)], {}, "longer than"),
        ([{"name": "e1"}], {"batch_id": "a\nINFO forged"}, "unprintable"),
        ([msgspec.Raw(b"{}"), msgspec.Raw(b"{not json")], {}, "not JSON"),
    ],
)
def test_a_batch_id_argument_that_is_no_batch_id_makes_the_task_undeliverable(
    args: list[Any], kwargs: dict[str, Any], problem: str
) -> None:
    found = call_problem(_signature("event"), [args, kwargs, {}])
    assert found is not None and problem in found


@pytest.mark.parametrize(
    "batch_id",
    [None, "", "order-42", msgspec.Raw(b'"order-42"'), msgspec.Raw(b"null"), "x" * 200],
)
def test_a_short_string_batch_id_is_fine(batch_id: Any) -> None:
    assert call_problem(_signature("events"), [[[], batch_id], {}, {}]) is None


def test_a_replayed_undeliverable_body_keeps_every_argument_as_an_item() -> None:
    def items(task: str, body: bytes) -> list[Any]:
        # The worker leaves events raw (worker/bodies.py); ingest() decodes each.
        return [
            msgspec.json.decode(item) if isinstance(item, bytes) else item
            for item in bodies.items(body_batch(task, body))
        ]

    e1, e2 = {"name": "e1"}, {"name": "e2"}
    body = json.dumps([[e1, e2], {}, {}]).encode()
    assert items("eventbuffer.ingest_event", body) == [e1, e2]
    body = json.dumps([[[e1], "good-id"], {}, {}]).encode()
    assert items("eventbuffer.ingest_events", body) == [e1]
    body = json.dumps([[[e1]], {"batch_id": 5}, {}]).encode()
    assert items("eventbuffer.ingest_events", body) == [e1, 5]


@pytest.mark.slow
def test_an_event_sent_as_the_batch_id_is_kept_and_later_tasks_still_land(
    redis_url: str,
    redis: redis_lib.Redis,
    settings: Settings,
    tmp_path: Path,
    run_main: Callable[..., Result],
) -> None:
    # As the issue found it: send_task("eventbuffer.ingest_event", args=[e1, e2]) took e2
    # as the batch id (a memory address once decoded), dropped it, and skipped a later,
    # different task as a duplicate. Now each such task is an undeliverable dead letter
    # with its raw body, and tasks sent right after all land.
    env = project_env(REDIS_URL=redis_url, CLICKHOUSE_URL=settings.clickhouse_url)
    app = create_app(Settings.from_env(env))
    pairs = [(ev(f"first-{n}"), ev(f"second-{n}")) for n in range(20)]
    singles = [ev(f"single-{n}") for n in range(20)]
    reused = [ev("reused-1")], [ev("reused-2"), ev("reused-3")]
    proc = worker(env, tmp_path / "worker.log", "-Q", "ingest,celery", "-P", "solo")
    try:
        proc.wait_for(" ready.", 60)
        for e1, e2 in pairs:
            app.send_task("eventbuffer.ingest_event", args=[e1, e2], queue="ingest")
        for event in singles:
            app.send_task("eventbuffer.ingest_event", args=[event], queue="ingest")
        # A producer reusing a task id (a counter reset on restart) with other content.
        app.send_task("eventbuffer.ingest_events", args=[reused[0]], task_id="n-1", queue="ingest")
        wait_until(lambda: len(queued_ids(redis)) == 21, 60, "the singles", alive=proc.alive)
        app.send_task("eventbuffer.ingest_events", args=[reused[1]], task_id="n-1", queue="ingest")
        wait_until(lambda: len(dead_letters(redis)) == 21, 60, "dead letters", alive=proc.alive)
        proc.wait_for("kept whole as a batch_id_conflict dead letter", 30)
    finally:
        proc.stop()
        app.close()
    assert queued_ids(redis) == sorted(e["id"] for e in [*singles, *reused[0]])
    letters = dead_letters(redis)
    undeliverable = [(h, raw) for h, raw in letters if h.reason == "undeliverable_task"]
    assert len(undeliverable) == 20
    for header, raw in undeliverable:
        assert header.task == "eventbuffer.ingest_event" and "batch_id" in header.error
        [args, _, _] = json.loads(raw)  # the raw task body, both events in it
        assert [a["id"] for a in args] in [[e1["id"], e2["id"]] for e1, e2 in pairs]
    [(conflict, raw)] = [(h, raw) for h, raw in letters if h.reason == "batch_id_conflict"]
    assert conflict.claim == "n-1" and json.loads(raw) == reused[1]
    assert "ERROR" in proc.text().split("kept whole as a batch_id_conflict")[0].rsplit("\n", 1)[1]

    assert run_main("dlq", "replay", "--yes").code == 0
    everything = [*singles, *reused[0], *reused[1], *(e for pair in pairs for e in pair)]
    assert queued_ids(redis) == sorted(e["id"] for e in everything)
    assert dead_letters(redis) == []


# -- on a Redis Cluster: one transaction per shard ------------------------------------------


@pytest.mark.slow
def test_conflicts_on_a_redis_cluster(tmp_path: Path) -> None:
    # Six shards on three masters, each shard its own transaction: a conflict found on one
    # shard applies nothing on the others; a delivery that finds its own batch applied on
    # some shards (an earlier delivery failed between transactions) and another batch's
    # marker on one keeps only that shard's events. Each replay applies each event once.
    from tests.support.redis_cluster import cluster_unavailable, redis_cluster
    from worker.deadletters import iter_dead_letters
    from worker.events import Limits
    from worker.replay import plan_replay, replay
    from worker.topology import connect

    if cluster_unavailable() is not None:
        pytest.skip(str(cluster_unavailable()))
    with redis_cluster() as cluster:
        settings = Settings.from_env(
            {
                "REDIS_URL": cluster.url,
                "EVENT_BUFFER_REDIS_CLUSTER": "true",
                "CELERY_BROKER_URL": "amqp://guest:guest@127.0.0.1:5672//",
                "EVENT_BUFFER_SHARDS": "6",
                "EVENT_BUFFER_REORDER_WINDOW_MS": "0",
            }
        )
        client = connect(settings, socket_timeout=5)
        try:
            buffer = EventBuffer(client, settings)
            keyspace = buffer.keyspace

            def rows() -> list[str]:
                return sorted(
                    json.loads(row)["id"]
                    for shard in keyspace.all()
                    for row in client.lrange(shard.queue, 0, -1)
                )

            def letters() -> list[Any]:
                return [d for shard in keyspace.all() for d in iter_dead_letters(client, shard)]

            def replay_all() -> None:
                plan = plan_replay(letters(), Limits.from_settings(settings, buffer.clock))
                assert not plan.invalid
                replay(buffer, plan.ready)

            sessions = [session_on(n, 6, f"c{n}") for n in range(6)]
            first = [ev("a", session_id=sessions[0]), ev("b", session_id=sessions[1])]
            second = [ev(f"s{n}", session_id=sessions[n]) for n in (1, 2, 3, 4)]
            ingest(buffer, first, "cluster-reused")
            result = ingest(buffer, second, "cluster-reused")
            assert result.conflict and result.appended == 0
            assert rows() == sorted(e["id"] for e in first)
            [conflict] = letters()
            assert conflict.reason == "batch_id_conflict"
            assert json.loads(conflict.payload) == second
            assert ingest(buffer, second, "cluster-reused").duplicate
            replay_all()
            assert rows() == sorted(e["id"] for e in first + second)
            assert letters() == []

            whole = [ev(f"w{n}", session_id=sessions[n]) for n in range(6)]
            ingest(buffer, whole, "cluster-split")
            lost = keyspace.shard(5)  # (no earlier event is on it)
            client.delete(lost.queue)  # shard 5's transaction never ran ...
            client.set(lost.batch("cluster-split"), "0" * 32, ex=60)  # ... another batch's did
            result = ingest(buffer, whole, "cluster-split")
            assert result.conflict and result.appended == 0
            [kept] = letters()
            assert json.loads(kept.payload) == [whole[5]]
            assert ingest(buffer, whole, "cluster-split").duplicate
            replay_all()
            assert rows() == sorted(e["id"] for e in first + second + whole)
        finally:
            client.close()
