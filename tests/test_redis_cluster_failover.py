"""Failovers of the Redis Cluster buffer under load: nothing lost, nothing doubled.

A real cluster on loopback (3 masters, 3 replicas, AOF always, node timeout
2 s; tests/support/redis_cluster.py), a private plain redis-server as the
broker, embedded ClickHouse, an ingest worker (2 pool processes), a flush
worker and Beat as real Celery processes, and a foreign sender: a plain
`celery.Celery` app that knows nothing of eventbuffer and sends
`eventbuffer.ingest_events` tasks by name, each of 40 whole sessions of the
reference model (280 events; whole sessions, so durations are exact in
whatever order retried tasks run), over 6 shards. Under that steady load:

1. the buffer's keys spread over at least 2 masters;
2. SIGKILL the master of shard 0 (it holds 4 of the 6 shards): its replica
   takes over. The promoted master has no replica: ingest waits (every task
   touches its shards, is applied there, is not confirmed, and retries: no
   task succeeds), flushes of its shards stop before inserting, and
   `status` and `metrics` say so;
3. SIGKILL that promoted master too (a second master kill), before any
   replica copied what it applied: its slots have no master;
4. restart the first node (it comes back as a replica, with its AOF as of
   its kill) and make it take its slots back (CLUSTER FAILOVER TAKEOVER):
   whatever the dead promoted master applied is gone with it;
5. restart the second node: it rejoins as a replica of the first;
6. keep sending, then stop; once the broker and the buffer are empty, every
   event is in ClickHouse exactly once with the durations of the model.

Without the WAIT, step 2 acknowledges tasks whose batches step 4 throws
away (events missing), and flushes insert rows under claims step 4 forgets,
which the next claims insert again (duplicates).
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis as redis_lib
from celery import Celery
from redis.cluster import RedisCluster
from redis.exceptions import RedisClusterException

from tests.support.celery_procs import CeleryProcess, beat, ingest_backlog, project_env, worker
from tests.support.polling import wait_until
from tests.support.redis_cluster import LoopbackCluster, cluster_unavailable, redis_cluster
from tests.support.servers import start_redis
from tests.support.sinks import query_when_free
from tests.support.traffic import ReferenceTraffic
from tests.test_redis_cluster import cli
from worker.keys import Keyspace
from worker.redis_errors import is_transient
from worker.settings import Settings
from worker.sinks import open_sink
from worker.topology import Client, connect

UNAVAILABLE = cluster_unavailable()
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(UNAVAILABLE is not None, reason=str(UNAVAILABLE)),
]

SHARDS = 6
SESSIONS_PER_TASK = 40
TASKS_PER_S = 2.0


class ForeignSender:
    """A plain Celery app sending ingest tasks by name at a steady rate, in a thread."""

    def __init__(self, broker_url: str, traffic: ReferenceTraffic) -> None:
        self.app = Celery("foreign", broker=broker_url, set_as_current=False)
        self.app.conf.update(task_serializer="json", accept_content=["json"])
        self.traffic = traffic
        self.sent: list[str] = []
        self.tasks = 0
        self.errors: list[str] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="foreign-sender", daemon=True)

    def start(self) -> ForeignSender:
        self._thread.start()
        return self

    def _run(self) -> None:
        started = time.monotonic()
        while not self._stop.is_set():
            events: list[dict[str, Any]] = []
            for _ in range(SESSIONS_PER_TASK):
                events += self.traffic.session()
            try:
                self.app.send_task("eventbuffer.ingest_events", args=[events], queue="ingest")
            except Exception as exc:  # reported by stop()
                self.errors.append(repr(exc))
                return
            self.sent += [e["id"] for e in events]
            self.tasks += 1
            lag = started + self.tasks / TASKS_PER_S - time.monotonic()
            if lag > 0:
                self._stop.wait(lag)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(30)
        assert not self._thread.is_alive()
        assert not self.errors, self.errors
        self.app.close()


def buffer_open(client: Client, keyspace: Keyspace) -> tuple[int, int]:
    """(rows queued or held by the reorder window, claims open) over every shard.

    Held events count as queued: between the flush that empties a queue and the one
    that releases the last events held (a window later), the queue is empty while
    they still wait, and stopping the workers then would leave them unflushed."""
    pipe = client.pipeline(transaction=False)
    for shard in keyspace.all():
        pipe.llen(shard.queue)
        pipe.zcard(shard.held_due)
        pipe.exists(shard.claim)
    replies = pipe.execute()
    queued = sum(int(n) for n in replies[0::3]) + sum(int(n) for n in replies[1::3])
    return queued, sum(int(n) for n in replies[2::3])


def cluster_down(cluster: LoopbackCluster) -> bool:
    for node in cluster.live():
        with contextlib.suppress(redis_lib.RedisError, OSError):
            if b"cluster_state:fail" in node.cluster("INFO"):  # type: ignore[operator]
                return True
    return False


def observe(call: Callable[[], object]) -> BaseException | None:
    """What `call` raises (None if nothing)."""
    try:
        call()
    except BaseException as exc:
        return exc
    return None


@pytest.fixture
def cluster() -> Iterator[LoopbackCluster]:
    with redis_cluster() as started:
        yield started


def test_master_kills_lose_and_double_nothing_under_load(
    cluster: LoopbackCluster, tmp_path: Path
) -> None:
    broker = start_redis(tmp_path / "broker")
    broker_client = broker.client()
    chdb_url = f"chdb://{tmp_path / 'clickhouse'}"
    sink = open_sink(chdb_url)
    try:
        sink.migrate()
    finally:
        sink.close()
    env = project_env(
        REDIS_URL=cluster.url,
        EVENT_BUFFER_REDIS_CLUSTER="true",
        CELERY_BROKER_URL=broker.url,
        CLICKHOUSE_URL=chdb_url,
        EVENT_BUFFER_SHARDS=str(SHARDS),
        EVENT_BUFFER_FLUSH_INTERVAL_S="1",
        EVENT_BUFFER_LOCK_TTL_S="3",
        EVENT_BUFFER_CONSUMER_TIMEOUT_S="3",
        EVENT_BUFFER_VISIBILITY_TIMEOUT_S="60",
        EVENT_BUFFER_MAX_BATCHES_PER_FLUSH="20",
        EVENT_BUFFER_REPLICA_TIMEOUT_MS="500",
    )
    settings = Settings.from_env(env)
    keyspace = Keyspace(settings.key_prefix, SHARDS)
    client = connect(settings, socket_timeout=5, socket_connect_timeout=2)
    procs: list[CeleryProcess] = []
    sender: ForeignSender | None = None
    try:
        procs += [
            worker(env, tmp_path / "ingest.log", "-Q", "ingest", "-c", "2", "-n", "ingest@%h"),
            worker(env, tmp_path / "flush.log", "-Q", "flush", "-P", "solo", "-n", "flush@%h"),
            beat(env, tmp_path / "beat.log", tmp_path / "beat-schedule"),
        ]
        ingest_log = procs[0]
        for proc in procs[:2]:
            proc.wait_for("ready.", timeout=60)
        traffic = ReferenceTraffic("failover")
        sender = ForeignSender(broker.url, traffic).start()

        # 1. Under load, the buffer's keys are on at least 2 masters.
        wait_until(lambda: "succeeded in" in ingest_log.text(), 30, "a first ingest task")
        time.sleep(2)
        holding = set()
        for master in cluster.masters():
            node_client = master.client()
            if any(True for _ in node_client.scan_iter(match="{eventbuffer:*", count=1000)):
                holding.add(master.port)
            node_client.close()
        assert len(holding) >= 2, holding

        # 2. Kill the master of shard 0; its replica takes over, alone.
        first = cluster.master_of_slot(client.keyslot(keyspace.shard(0).tag))  # type: ignore[union-attr]
        lone_shards = [
            s.shard
            for s in keyspace.all()
            if cluster.master_of_slot(client.keyslot(s.tag)).port == first.port  # type: ignore[union-attr]
        ]
        cluster.kill(first)
        killed_at = time.monotonic()
        promoted = cluster.wait_failover(first)
        failover_s = time.monotonic() - killed_at
        # Ingest waits: tasks retry, none succeeds, while the promoted master has no replica.
        time.sleep(1.5)  # tasks in flight at the failover finish (or fail)
        succeeded = ingest_log.text().count("succeeded in")
        done = cli(env, "status")
        assert done.returncode == 0, done.stderr
        status = done.stdout
        assert f"! Master {promoted.address} has 0 of the 1 replica(s)" in status, status
        done = cli(env, "metrics")
        assert done.returncode == 0, done.stderr
        metrics = done.stdout
        for n in lone_shards:
            assert f'eventbuffer_waiting_for_replicas{{shard="{n}"}} 1.0' in metrics
        # A process that starts now, with REDIS_URL naming the dead node, cannot discover
        # the cluster (redis-py's RedisClusterException, not a RedisError): transient.
        dead_url = f"redis://127.0.0.1:{first.port}/0"
        uncovered = [observe(lambda: RedisCluster.from_url(dead_url, socket_connect_timeout=1))]
        time.sleep(2)
        succeeded_alone = ingest_log.text().count("succeeded in") - succeeded

        # 3. Kill the promoted master too: its slots have no master now.
        cluster.kill(promoted)
        wait_until(lambda: cluster_down(cluster), 30, "the cluster to see the slots uncovered")
        # What the cluster client raises now, for a new client and for a command.
        uncovered.append(observe(lambda: connect(settings, socket_timeout=2).ping()))
        uncovered.append(observe(lambda: client.pttl(keyspace.shard(0).backoff)))
        uncovered.append(observe(lambda: client.pttl(keyspace.shard(2).backoff)))

        # 4. The first node comes back (a replica, with its data as of its kill) and
        #    takes its slots back; what the promoted master applied is gone.
        cluster.restart(first)
        wait_until(
            lambda: first.info("replication").get("role") == "slave", 30, "first as a replica"
        )
        cluster.take_over(first)

        # 5. The second node rejoins as the first's replica.
        cluster.restart(promoted)
        cluster.wait_replica_of(promoted, first)
        recovered_at = time.monotonic()

        # 6. Keep sending a little, then drain and count.
        time.sleep(3)
        sender.stop()

        def drained() -> bool:
            try:
                queued, claims = buffer_open(client, keyspace)
                return ingest_backlog(broker_client) == 0 and queued == 0 and claims == 0
            except (redis_lib.RedisError, OSError):
                return False

        wait_until(drained, 120, "the broker and the buffer to drain", interval=0.5)
        drained_s = time.monotonic() - recovered_at
        dead_letters = sum(int(client.llen(shard.dead)) for shard in keyspace.all())
        for proc in procs:
            proc.stop()
        rows = query_when_free(
            chdb_url, "SELECT toString(id), count(), groupArray(duration) FROM events GROUP BY id"
        )
    finally:
        if sender is not None:
            with contextlib.suppress(Exception):
                sender.stop()
        for proc in procs:
            proc.kill()
        client.close()
        broker_client.close()
        broker.kill()

    sent = set(sender.sent)
    assert len(sent) == len(sender.sent) == len(traffic.expected)
    found = {row[0]: (int(row[1]), [int(d) for d in row[2]]) for row in rows}
    missing = sent - found.keys()
    doubled = {i: n for i, (n, _) in found.items() if n > 1}
    wrong = {i: d for i, (_, d) in found.items() if d != [traffic.expected.get(i, -1)]}
    logs = "".join(p.read_text(errors="replace") for p in sorted(tmp_path.glob("*.log")))
    transient = Counter(re.findall(r"Redis refuses writes \((\w+):", logs))
    unexpected = re.findall(r"batch \S+ failed \(\d of \d attempts\): ([^\n]{0,160})", logs)
    flush_errors = Counter(
        "not replicated" if "replica(s) required" in line else line[:80]
        for line in re.findall(r"flush of shard \d+ failed, will retry next run: ([^\n]*)", logs)
    )
    task_failures = Counter(
        re.findall(r"Task eventbuffer\.process_buffer\[[^\]]+\] raised unexpected: (\S+)", logs)
    )
    print(
        f"\nfailover after {failover_s:.1f} s; drained {drained_s:.1f} s after the recovery; "
        f"{len(sent)} events in {sender.tasks} tasks\n"
        f"ingest retries by error: {dict(transient)}\n"
        f"flush shard errors: {dict(flush_errors)}; process_buffer failures: "
        f"{dict(task_failures)}"
    )
    print(
        f"missing {len(missing)}, doubled {len(doubled)}, wrong durations {len(wrong)}, "
        f"dead letters {dead_letters}, tasks succeeded while unreplicated {succeeded_alone}"
    )
    raised = [None if e is None else f"{type(e).__name__}: {e}" for e in uncovered]
    print(
        f"the cluster client raised: for a new client naming the dead master {raised[0]}; "
        "with a master's slots uncovered, for a new client, a command on the uncovered "
        f"slots, one on another master's: {raised[1:]}"
    )
    assert not unexpected, f"ingest failures not classified transient: {unexpected[:5]}"
    assert not missing, f"{len(missing)} events lost (logs in {tmp_path})"
    assert not doubled, f"{len(doubled)} events doubled (logs in {tmp_path})"
    assert not found.keys() - sent
    assert not wrong, f"{len(wrong)} durations differ from the model: {list(wrong.items())[:5]}"
    assert dead_letters == 0
    # While the promoted master had no replica, ingest waited: no task succeeded.
    assert succeeded_alone == 0, f"{succeeded_alone} tasks succeeded unreplicated"
    # The failover was seen: ingest waited out the dead master, and the promoted master
    # without a replica refused to confirm writes (to ingest, or to the flush's claims and
    # acks: ingest tasks now wait in place, up to 10 s between attempts, and may not
    # try during that stretch).
    assert transient["ConnectionError"] > 0, transient
    assert transient["NotReplicatedError"] > 0 or flush_errors["not replicated"] > 0
    assert isinstance(uncovered[0], RedisClusterException), uncovered
    assert all(is_transient(error) for error in uncovered if error is not None), uncovered
