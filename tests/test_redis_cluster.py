"""The buffer on a real Redis Cluster: 3 masters, 3 replicas, started on loopback.

One cluster serves the module (tests/support/redis_cluster.py); each test has
its own key prefix, so its shards' hash tags, and the slots they hash to,
are its own. What is checked on it: the apply, the flush, dead letters, the
sweep, the flush lock and `status`/metrics over every master; pub/sub
reaching subscribers on every node; WAIT (a batch, a claim) refusing to
count a write that its master's replica has not confirmed (the replica is
SIGSTOPped for it); the start-up checks of a cluster buffer's broker. And
the figures of the README's "Scaling out": the apply's events/s with 6
shards on 3 masters against 1 shard on one Redis, in the same run.

The failover scenarios, with Celery workers under load, are in
tests/test_redis_cluster_failover.py.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.celery_procs import ROOT, project_env, worker
from tests.support.clock import ManualClock
from tests.support.cluster_buffer import (
    SESSIONS_PER_BATCH,
    SHARDS,
    batches,
    client_fixture,  # noqa: F401 (fixture `client`)
    cluster_fixture,  # noqa: F401 (fixture `cluster`)
    cluster_settings,
    keys_by_master,
    landed,
    needs_cluster,
    shard_master,
    stopped,
)
from tests.support.redis_cluster import LoopbackCluster
from tests.support.traffic import ReferenceTraffic
from worker.buffer import EventBuffer
from worker.deadletters import iter_dead_letters
from worker.errors import EvictionPolicyError, NotReplicatedError, SettingsError
from worker.events import Limits
from worker.flusher import Flusher
from worker.ingestion import ingest
from worker.keys import CHANNEL_RECEIVED, CHANNEL_SAVED
from worker.lock import FlushLock, read_lock
from worker.redis_errors import is_transient
from worker.redis_memory import check_eviction
from worker.reorder import release_due
from worker.replay import plan_replay, replay
from worker.settings import Settings
from worker.sinks.chdb import ChdbSink
from worker.state import read_state
from worker.sweeper import Sweeper
from worker.topology import Client

pytestmark = needs_cluster


@pytest.fixture
def sink(tmp_path: Path) -> Iterator[ChdbSink]:
    made = ChdbSink(str(tmp_path / "clickhouse"), "events")
    made.migrate()
    made.close()
    try:
        yield made
    finally:
        made.close()


def test_sessions_over_six_shards_land_exactly_once_with_the_reference_durations(
    cluster: LoopbackCluster, client: Client, sink: ChdbSink, tmp_path: Path
) -> None:
    settings = cluster_settings(cluster, "eb-exact", tmp_path)
    clock = ManualClock(int(time.time() * 1000))
    buffer = EventBuffer(client, settings, clock)
    traffic = ReferenceTraffic("exact")
    for events in batches(traffic, 6):
        ingest(buffer, events, str(uuid.uuid4()))
    # The reorder window passes: each shard's held events reach their sessions (on its master).
    clock.advance(settings.reorder_window_ms)
    for shard in buffer.shards():
        assert release_due(buffer.scripts, shard, settings, clock).late == 0
    # Every shard's keys carry their hash tag; six shards land on at least two masters.
    spread = keys_by_master(cluster, "eb-exact")
    assert len(spread) >= 2, spread
    state = read_state(client, buffer.keyspace, int(time.time() * 1000), 300, 1)
    assert sum(len(m.shards) for m in state.masters) == SHARDS
    assert {m.replicas for m in state.masters} == {1} and state.cluster_masters == 3
    assert state.queued == len(traffic.expected)
    # Visitors of every shard, found by a SCAN of every master.
    assert state.active_visitors == {"faults": 97}

    flusher = Flusher(client, settings, lambda: sink)
    summary = flusher.process_buffer(max_batches=10)
    assert not summary.errors, summary.as_dict()
    found = landed(sink)
    assert found == {event_id: [d] for event_id, d in traffic.expected.items()}
    assert EventBuffer(client, settings).get_buffer_size() == 0


def test_events_received_and_saved_reach_a_subscriber_on_every_node(
    cluster: LoopbackCluster, client: Client, sink: ChdbSink, tmp_path: Path
) -> None:
    settings = cluster_settings(
        cluster, "eb-pubsub", tmp_path, EVENT_BUFFER_PUBLISH_THROTTLE_MS="0"
    )
    subscribers = []
    for node in cluster.live():
        pubsub = node.client().pubsub(ignore_subscribe_messages=True)
        pubsub.subscribe(CHANNEL_RECEIVED, CHANNEL_SAVED)
        subscribers.append((node, pubsub))
    try:
        time.sleep(0.2)  # the subscriptions are made
        buffer = EventBuffer(client, settings)
        ingest(buffer, batches(ReferenceTraffic("pubsub"), 1)[0], "pubsub-batch")
        Flusher(client, settings, lambda: sink).process_buffer(max_batches=10)
        for node, pubsub in subscribers:
            channels: set[str] = set()
            deadline = time.monotonic() + 5
            while channels != {CHANNEL_RECEIVED, CHANNEL_SAVED} and time.monotonic() < deadline:
                message = pubsub.get_message(timeout=0.2)
                if message:
                    channels.add(message["channel"].decode())
            assert channels == {CHANNEL_RECEIVED, CHANNEL_SAVED}, node.address
    finally:
        for _, pubsub in subscribers:
            pubsub.close()


def test_dead_letters_sweep_and_the_flush_lock_on_a_cluster(
    cluster: LoopbackCluster, client: Client, tmp_path: Path
) -> None:
    settings = cluster_settings(cluster, "eb-ops", tmp_path, EVENT_BUFFER_LOCK_TTL_S="3")
    buffer = EventBuffer(client, settings)
    bad = [{"project_id": "p", "name": "x"} for _ in range(12)]  # no created_at
    events = batches(ReferenceTraffic("ops"), 1)[0]
    ingest(buffer, bad + events, "ops-batch")
    letters = [
        letter for shard in buffer.keyspace.all() for letter in iter_dead_letters(client, shard)
    ]
    assert len(letters) == 12
    # A replay that still fails validation keeps them; removing them works on their master.
    plan = plan_replay(letters, Limits.from_settings(settings, buffer.clock), None)
    assert len(plan.invalid) == 12 and not plan.ready
    assert replay(buffer, plan.ready).removed == 0

    # The sweep walks every shard: past the session timeout, the last views are queued
    # (there are none: every session ended) and every visitor, on every master, is pruned.
    later = ManualClock(int(time.time() * 1000) + settings.session_timeout_s * 1000 + 60_000)
    swept = Sweeper(client, settings, later).sweep()
    assert swept.shards == list(range(SHARDS)) and swept.visitors_pruned == SESSIONS_PER_BATCH

    # The flush lock: taken, extended by its watchdog, released, on its shard's master.
    lock = FlushLock(client, buffer.keyspace.shard(3).lock, 3)
    assert lock.acquire()
    try:
        time.sleep(1.3)  # one watchdog extension
        state = read_lock(client, lock.name)
        assert state is not None and state.heartbeat_age_ms is not None
        assert state.heartbeat_age_ms < 1000 and not lock.lost
        assert not FlushLock(client, lock.name, 3).acquire()  # held by a live holder
    finally:
        lock.release()
    assert read_lock(client, lock.name) is None


def test_a_batch_is_not_acknowledged_until_its_masters_replica_has_it(
    cluster: LoopbackCluster, client: Client, tmp_path: Path
) -> None:
    settings = cluster_settings(cluster, "eb-wait", tmp_path)
    buffer = EventBuffer(client, settings)
    master = shard_master(cluster, client, buffer.keyspace, 0)
    [replica] = cluster.replicas_of(master)
    events = [
        {"project_id": "p", "name": "click", "created_at": int(time.time() * 1000),
         "session_id": f"s{n}", "id": str(uuid.uuid4())}
        for n in range(200)
    ]  # fmt: skip
    with stopped(replica):
        with pytest.raises(NotReplicatedError) as raised:
            ingest(buffer, events, "wait-batch")
        assert raised.value.node == master.address and raised.value.confirmed == 0
        assert is_transient(raised.value)  # the ingest task retries it
        # The retry finds the batch applied (its marker) and must wait all the same.
        with pytest.raises(NotReplicatedError):
            ingest(buffer, events, "wait-batch")
    # Confirmed once the replica is back: the retry succeeds, and applied nothing twice.
    result = ingest(buffer, events, "wait-batch")
    assert result.duplicate
    assert buffer.get_buffer_size() == 200
    replica_client = replica.client()
    try:
        tag = buffer.keyspace.shard(0).queue
        assert replica_client.execute_command("READONLY") and replica_client.llen(tag) > 0
    finally:
        replica_client.close()


def test_no_row_is_inserted_under_a_claim_its_masters_replica_has_not_confirmed(
    cluster: LoopbackCluster, client: Client, sink: ChdbSink, tmp_path: Path
) -> None:
    settings = cluster_settings(cluster, "eb-claim", tmp_path)
    clock = ManualClock(int(time.time() * 1000))
    buffer = EventBuffer(client, settings, clock)
    traffic = ReferenceTraffic("claim")
    [events] = batches(traffic, 1)
    traffic_events = [(e["id"], e["session_id"]) for e in events]
    ingest(buffer, events, "claim-batch")
    clock.advance(settings.reorder_window_ms)  # each flush releases its shard's held events
    for shard in buffer.shards():
        release_due(buffer.scripts, shard, settings, clock)
    shard = next(s for s in buffer.keyspace.all() if client.llen(s.queue))
    master = shard_master(cluster, client, buffer.keyspace, shard.shard)
    [replica] = cluster.replicas_of(master)
    on_master = [
        s.shard
        for s in buffer.keyspace.all()
        if shard_master(cluster, client, buffer.keyspace, s.shard).port == master.port
    ]
    flusher = Flusher(client, settings, lambda: sink, clock)
    with stopped(replica):
        result = flusher.process_buffer()
    failed = {r.shard for r in result.shards if isinstance(r.error, NotReplicatedError)}
    assert failed == {n for n in on_master if client.llen(buffer.keyspace.shard(n).queue)}
    assert shard.shard in failed
    # Nothing of the shards on that master reached ClickHouse (their claims stay open);
    # the shards of the other masters flushed.
    held = {
        event_id
        for events in [traffic_events]
        for event_id, session in events
        if buffer.keyspace.route(session).shard in on_master
    }
    found = set(landed(sink))
    assert found and not found & held
    assert found == set(traffic.expected) - held
    assert client.hget(shard.claim, "id") is not None
    flusher.process_buffer(max_batches=10)
    assert landed(sink) == {event_id: [d] for event_id, d in traffic.expected.items()}
    assert buffer.get_buffer_size() == 0


def cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    """`eventbuffer ARGS` of this checkout in a process of its own."""
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        env={**env, "COLUMNS": "200"},
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )


def test_status_and_metrics_name_each_shards_master_and_its_replicas(
    cluster: LoopbackCluster, client: Client, tmp_path: Path
) -> None:
    settings = cluster_settings(cluster, "eb-status", tmp_path)
    ingest(EventBuffer(client, settings), batches(ReferenceTraffic("status"), 1)[0], "status")
    regular = 1  # of a ReferenceTraffic session's 7 events: the rest wait for the window
    env = project_env(
        REDIS_URL=cluster.url,
        EVENT_BUFFER_REDIS_CLUSTER="true",
        CELERY_BROKER_URL="redis://127.0.0.1:1/0",  # nothing there: status says so, quickly
        EVENT_BUFFER_SHARDS=str(SHARDS),
        EVENT_BUFFER_KEY_PREFIX="eb-status",
        CLICKHOUSE_URL=settings.clickhouse_url,
    )
    done = cli(env, "status", "--json")
    assert done.returncode == 0, done.stderr
    data = json.loads(done.stdout)
    assert sorted(n for m in data["masters"] for n in m["shards"]) == list(range(SHARDS))
    assert all(m["replicas"] == 1 and not m["short"] for m in data["masters"])
    assert data["totals"]["queued"] == regular * SESSIONS_PER_BATCH
    assert data["totals"]["held_sessions"] == SESSIONS_PER_BATCH
    text = cli(env, "status")
    assert text.returncode == 0, text.stderr
    for master in data["masters"]:
        assert f"Master {master['node']}: shard(s)" in text.stdout
    metrics = cli(env, "metrics")
    assert metrics.returncode == 0, metrics.stderr
    for n in range(SHARDS):
        assert f'eventbuffer_replicas{{shard="{n}"}} 1.0' in metrics.stdout
        assert f'eventbuffer_waiting_for_replicas{{shard="{n}"}} 0.0' in metrics.stdout
    held = sum(
        float(line.rsplit(" ", 1)[1])
        for line in metrics.stdout.splitlines()
        if line.startswith("eventbuffer_held_sessions{")
    )
    assert held == SESSIONS_PER_BATCH
    # Memory: every master of the cluster, each with its own INFO memory.
    masters = sorted(f"127.0.0.1:{port}" for port in cluster.topology().masters)
    buffer = [m for m in data["memory"] if m["redis"] == "buffer"]
    assert sorted(m["node"] for m in buffer) == masters
    assert all(m["policy"] == "noeviction" and m["db"] is None for m in buffer)
    for node in masters:
        assert any(line.split()[:2] == [node, "buffer"] for line in text.stdout.splitlines())
        labels = f'node="{node}",redis="buffer"'
        assert f"eventbuffer_redis_used_memory_bytes{{{labels}}}" in metrics.stdout
    assert "! Redis 127.0.0.1:1 (broker): cannot read its memory" in text.stdout


def test_a_cluster_buffer_refuses_a_missing_or_cluster_valued_broker(
    cluster: LoopbackCluster, tmp_path: Path
) -> None:
    base = {"REDIS_URL": cluster.url, "EVENT_BUFFER_REDIS_CLUSTER": "true"}
    for broker in ("", cluster.url.replace("/0", "/1")):
        with pytest.raises(SettingsError) as refused:
            Settings.from_env({**base, "CELERY_BROKER_URL": broker})
        assert "CELERY_BROKER_URL" in str(refused.value)
        assert "CELERY_RESULT_BACKEND" in str(refused.value)
    # Another node of the cluster: only the server can tell; the worker asks it at start-up.
    other = next(n for n in cluster.live() if f":{n.port}/" not in cluster.url)
    env = project_env(
        **base,
        CELERY_BROKER_URL=f"redis://127.0.0.1:{other.port}/0",
        CLICKHOUSE_URL=f"chdb://{tmp_path / 'clickhouse'}",
    )
    proc = worker(env, tmp_path / "worker.log", "-Q", "ingest", "-c", "1")
    assert proc.process is not None
    assert proc.process.wait(60) == 2
    log = proc.text()
    assert "CELERY_BROKER_URL names a Redis Cluster node" in log
    assert "CELERY_RESULT_BACKEND" in log
    # Results are off without a result backend, rather than on the cluster.
    settings = Settings.from_env({**base, "CELERY_BROKER_URL": "amqp://guest@127.0.0.1//"})
    assert settings.effective_result_backend == ""
    assert settings.effective_min_replicas == 1


def test_an_evicting_policy_on_any_master_is_refused_naming_that_master(
    cluster: LoopbackCluster, tmp_path: Path
) -> None:
    settings = cluster_settings(cluster, "eb-evict", tmp_path)  # an AMQP broker: not asked
    assert check_eviction(settings) == []
    # Not the node REDIS_URL names: the check asks every master, not the one it knows.
    seed = int(cluster.url.rsplit(":", 1)[1].split("/")[0])
    master = next(cluster.node(p) for p in cluster.topology().masters if p != seed)
    client = master.client()
    client.config_set("maxmemory-policy", "volatile-lru")
    try:
        with pytest.raises(EvictionPolicyError) as refused:
            check_eviction(settings)
    finally:
        client.config_set("maxmemory-policy", "noeviction")
        client.close()
    line = str(refused.value)
    assert f"Redis 127.0.0.1:{master.port} (buffer) has maxmemory-policy volatile-lru" in line
    others = [p for p in cluster.topology().masters if p != master.port]
    assert all(f":{p} " not in line for p in others)
