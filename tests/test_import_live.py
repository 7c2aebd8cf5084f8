"""An import beside live traffic: the live path keeps flushing, history touches no live state.

The import runs as the real command in a subprocess, writing into the same
embedded ClickHouse directory the test's flusher writes live events to (chDB
is open in one process at a time: the import holds it only per chunk). The
import is pointed at the test's Redis, and must leave it alone: no visitor,
no last view, no `events:received` message for its events. Live events are
applied and flushed meanwhile; every one lands once, and the time from apply
to ClickHouse is reported (measured, not asserted).
"""

from __future__ import annotations

import json
import subprocess
import time
from pathlib import Path

import redis as redis_lib

from tests.support.exports import generate_export
from tests.support.importing import import_command, import_env, landed, query
from worker.buffer import EventBuffer
from worker.events import parse_event
from worker.flusher import Flusher
from worker.settings import Settings
from worker.sinks.chdb import ChdbSink, close_all, path_from_url


def test_live_flushes_go_on_while_an_import_runs(
    tmp_path: Path, redis: redis_lib.Redis, settings: Settings, sink: ChdbSink
) -> None:
    export = generate_export(tmp_path / "export", 30_000, files=3)
    pubsub = redis.pubsub()
    pubsub.subscribe("events:received")
    before = set(redis.keys("*"))
    env = import_env(
        settings.clickhouse_url, REDIS_URL=settings.redis_url, EVENT_BUFFER_IMPORT_CHUNK_ROWS="3000"
    )
    process = subprocess.Popen(
        import_command("--json", *export.files),
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    buffer = EventBuffer(redis, settings)
    flusher = Flusher(redis, settings, lambda: ChdbSink(path_from_url(settings.clickhouse_url)))
    sent = 0
    latencies: list[float] = []
    pending: list[float] = []
    try:
        while process.poll() is None or buffer.get_buffer_size():
            now_ms = int(time.time() * 1000)
            batch = [
                parse_event(
                    {
                        "project_id": "live",
                        "name": "click",
                        "profile_id": f"v-{(sent + i) % 50}",
                        "created_at": now_ms,
                        "properties": {"live": str(sent + i)},
                    }
                )
                for i in range(100)
            ]
            buffer.apply(batch)
            sent += len(batch)
            pending.append(time.monotonic())
            summary = flusher.process_buffer()
            close_all()
            if summary.rows and not summary.errors:
                flushed_at = time.monotonic()
                latencies += [flushed_at - t for t in pending]
                pending = []
            time.sleep(0.05)
        out, err = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
    assert process.returncode == 0, err.decode()[-2000:]
    summary = json.loads(out.decode().strip().splitlines()[-1])
    assert (summary["imported"], summary["duplicates"]) == (export.events, 0)
    rows = landed(settings.clickhouse_url)
    imported = {n: c for n, (c, _, _) in rows.items() if n}
    assert len(imported) == export.events and set(imported.values()) == {1}
    [(live_rows, live_distinct)] = query(
        settings.clickhouse_url,
        "SELECT count(), uniqExact(properties['live']) FROM events WHERE project_id = 'live'",
    )
    assert live_rows == live_distinct == sent
    # History left live state alone: no visitors, last views or messages of its own.
    assert buffer.get_active_visitor_count("shop") == 0
    assert buffer.get_active_visitor_count("blog") == 0
    assert buffer.get_last_screen_view(session_id="s-1") is None
    new_keys = {k.decode() for k in set(redis.keys("*")) - before}
    assert not [k for k in new_keys if "shop" in k or "blog" in k or "s-1" in k], new_keys
    messages = []
    while (message := pubsub.get_message(timeout=0.01)) is not None:
        if message["type"] == "message":
            messages.append(message["data"])
    assert not [m for m in messages if b'"shop"' in m or b'"blog"' in m]
    pubsub.close()
    latencies.sort()
    p99 = latencies[int(len(latencies) * 0.99) - 1] if latencies else 0.0
    print(
        f"live: {sent} events beside an import of {export.events}; apply-to-flushed "
        f"p50 {latencies[len(latencies) // 2]:.3f} s, p99 {p99:.3f} s"
    )
