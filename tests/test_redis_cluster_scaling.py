"""The figures of the README's "Scaling out": the apply rate of six shards on three
masters against one shard on one Redis, as a ratio within one run."""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path

import redis as redis_lib

from tests.support.cluster_buffer import (
    SHARDS,
    client_fixture,  # noqa: F401 (fixture `client`)
    cluster_fixture,  # noqa: F401 (fixture `cluster`)
    cluster_settings,
    needs_cluster,
    shard_master,
)
from tests.support.redis_cluster import LoopbackCluster
from tests.support.servers import start_redis
from tests.support.traffic import RealisticTraffic
from worker.buffer import EventBuffer
from worker.ingestion import ingest
from worker.keys import Keyspace
from worker.settings import Settings
from worker.topology import Client

pytestmark = needs_cluster


BALANCE = {0: 0, 1: 1}  # shard -> index of the master (by slot range) it is moved to


ROUNDS = 3


# (events per batch, batches per round): an ingest task's batch, and a bigger one, whose
# per-shard transactions are five times as large.
SIZES = ((300, 15), (1500, 3))


def _cpu_s(clients: list[redis_lib.Redis]) -> list[float]:
    """CPU seconds each server has used (INFO cpu: user + sys)."""
    out = []
    for c in clients:
        info = c.info("cpu")
        out.append(float(info["used_cpu_user"]) + float(info["used_cpu_sys"]))
    return out


def _round(
    buffer: EventBuffer,
    stream: RealisticTraffic,
    servers: list[redis_lib.Redis],
    size: tuple[int, int],
) -> tuple[float, float, float]:
    """(events/s, the busiest master's and all masters' CPU µs per event) of one round."""
    per_batch, count = size
    work = [stream.events(per_batch) for _ in range(count)]
    before = _cpu_s(servers)
    started = time.perf_counter()
    for events in work:
        ingest(buffer, events, str(uuid.uuid4()))
    elapsed = time.perf_counter() - started
    used = [b - a for a, b in zip(before, _cpu_s(servers), strict=True)]
    events = per_batch * count
    return events / elapsed, max(used) / events * 1e6, sum(used) / events * 1e6


def test_apply_rate_of_six_shards_on_three_masters_against_one_shard_on_one_redis(
    cluster: LoopbackCluster, client: Client, tmp_path: Path
) -> None:
    """Validation and apply of batches of realistic events (`ingest()`, what an ingest
    task runs), rounds alternating between the layouts on the same stream; medians.
    Every server has AOF with appendfsync always; the cluster's 6 shards are moved to
    2 per master first."""
    settings = cluster_settings(cluster, "eventbuffer", tmp_path)
    keyspace = Keyspace("eventbuffer", SHARDS)
    ranges = sorted(cluster.masters(), key=lambda m: min(cluster.topology().masters[m.port]))
    for shard, index in BALANCE.items():
        cluster.move_empty_slot(client.keyslot(keyspace.shard(shard).tag), ranges[index])  # type: ignore[union-attr]
    client.nodes_manager.initialize()  # type: ignore[union-attr]
    per_master: dict[int, int] = {}
    for n in range(SHARDS):
        port = shard_master(cluster, client, keyspace, n).port
        per_master[port] = per_master.get(port, 0) + 1
    assert sorted(per_master.values()) == [2, 2, 2]

    single_server = start_redis(
        tmp_path / "single", "--appendonly", "yes", "--appendfsync", "always"
    )
    single = redis_lib.Redis.from_url(single_server.url)
    try:
        layouts = {
            "6 shards on 3 masters, WAIT for 1 replica": EventBuffer(client, settings),
            "6 shards on 3 masters, no WAIT": EventBuffer(
                client,
                cluster_settings(cluster, "eventbuffer", tmp_path, EVENT_BUFFER_MIN_REPLICAS="0"),
            ),
            "1 shard on one Redis": EventBuffer(
                single, Settings.from_env({"REDIS_URL": single_server.url})
            ),
        }
        masters = [m.client() for m in cluster.masters()]
        servers = {name: [single] if "one Redis" in name else masters for name in layouts}
        stream = RealisticTraffic(seed=11)
        rounds: dict[tuple[str, int], list[tuple[float, float, float]]] = {}
        for _ in range(ROUNDS):
            for size in SIZES:
                for name, buffer in layouts.items():
                    found = _round(buffer, stream, servers[name], size)
                    rounds.setdefault((name, size[0]), []).append(found)
        for m in masters:
            m.close()
    finally:
        single.close()
        single_server.stop()

    def median(values: list[float]) -> float:
        return sorted(values)[len(values) // 2]

    figures = {
        f"{name}, batches of {per_batch}": {
            "events_per_s": round(median([r[0] for r in found])),
            "busiest_master_cpu_us_per_event": round(median([r[1] for r in found]), 2),
            "all_masters_cpu_us_per_event": round(median([r[2] for r in found]), 2),
        }
        for (name, per_batch), found in rounds.items()
    }
    (tmp_path / "cluster_figures.json").write_text(json.dumps({"medians": figures}))
    print(f"\napply, medians of {ROUNDS} rounds: {json.dumps(figures, indent=1)}")
    assert all(f["events_per_s"] > 0 for f in figures.values())
