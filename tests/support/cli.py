"""What the command line's tests share: its environment, running it as a process,
and watching the processes `eventbuffer run` starts."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import redis as redis_lib

from tests.support.polling import wait_until
from tests.support.servers import free_port
from worker.events import Event, parse_event
from worker.keys import ShardKeys
from worker.sinks.chdb import ChdbSink, path_from_url

ROOT = Path(__file__).resolve().parents[2]
SHARD = ShardKeys("eventbuffer", 0)


def cli_env(**overrides: str) -> dict[str, str]:
    """The environment of a `python -m worker.cli` child: this checkout, none of the
    session's eventbuffer, Celery, Redis or ClickHouse settings, a wide terminal."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("EVENT_BUFFER_", "CELERY_"))
        and k not in ("REDIS_URL", "CLICKHOUSE_URL")
    }
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH", "")]))
    env["COLUMNS"] = "200"
    env.update(overrides)
    return env


def run_cli(
    args: list[str], env: dict[str, str], cwd: Path = ROOT, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "worker.cli", *args],
        env=env,
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def closed_port() -> int:
    """A port nothing listens on (for a server that must not answer)."""
    return free_port()


def event(name: str, at: int, **fields: Any) -> Event:
    return parse_event({"project_id": "p1", "name": name, "created_at": at, **fields})


def chdb_count(url: str, sql: str) -> int:
    sink = ChdbSink(path_from_url(url))
    try:
        return int(sink.query(sql)[0][0])
    finally:
        sink.close()


def _process_table() -> dict[int, tuple[int, str]]:
    """pid -> (parent pid, state) of every process."""
    table: dict[int, tuple[int, str]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            state, ppid = stat.rsplit(")", 1)[1].split()[:2]
            table[int(entry.name)] = (int(ppid), state)
    return table


def descendants(pid: int) -> set[int]:
    table = _process_table()
    found: set[int] = set()
    todo = [pid]
    while todo:
        parent = todo.pop()
        for child, (ppid, _) in table.items():
            if ppid == parent and child not in found:
                found.add(child)
                todo.append(child)
    return found


def alive(pid: int) -> bool:
    state = _process_table().get(pid, (0, "X"))[1]
    return state not in ("Z", "X")


def wait_for(check: Callable[[], bool], timeout: float, what: str, log: Path | None = None) -> None:
    """`wait_until` that shows `run`'s output when it gives up."""
    detail = (lambda: f"--- run output ---\n{log.read_text()}") if log else None
    wait_until(check, timeout, what, interval=0.2, detail=detail)


def stack_up(process: subprocess.Popen[bytes], log: Path, timeout: float = 40) -> None:
    """Until `run` (writing to `log`) says everything is up; fails if it exited instead."""
    wait_for(
        lambda: "Everything is up" in log.read_text() or process.poll() is not None,
        timeout,
        "the stack",
        log,
    )
    assert process.poll() is None, log.read_text()


def redis_pids(log: Path) -> list[int]:
    """The private redis-server's pids, as `run` printed them: first start, then each restart."""
    text = log.read_text()
    first = re.findall(r"private redis-server, pid (\d+)", text)
    return [int(pid) for pid in first + re.findall(r"restarted on port \d+ .*\(pid (\d+)", text)]


LINGERING = {"04", "05", "06", "0B"}  # /proc/net/tcp states: FIN_WAIT1/2, TIME_WAIT, CLOSING


def lingering_connections(port: int) -> int:
    """TCP sockets on local `port` left by a closed server (FIN-WAIT, CLOSING, TIME-WAIT)."""
    rows = Path("/proc/net/tcp").read_text().splitlines()[1:]
    local = f"0100007F:{port:04X}"
    return sum(1 for row in rows if row.split()[1] == local and row.split()[3] in LINGERING)


def run_main_redis(redis: redis_lib.Redis) -> str:
    kwargs = redis.connection_pool.connection_kwargs
    return f"redis://{kwargs['host']}:{kwargs['port']}/{kwargs.get('db', 0)}"


@contextmanager
def running_stack(
    cwd: Path, env: dict[str, str], **popen: Any
) -> Iterator[tuple[subprocess.Popen[bytes], Path, set[int]]]:
    """`eventbuffer run` in `cwd`, its output in `cwd`/run.out: (the process, that log,
    the set of its processes to kill on the way out, which a test may add to: those it
    started are found again then, but not once `run` has exited). Whatever of them still
    runs at the end is killed."""
    log = cwd / "run.out"
    with log.open("wb") as out:
        process = subprocess.Popen(
            [sys.executable, "-m", "worker.cli", "run"],
            cwd=cwd,
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
            **popen,
        )
    seen: set[int] = set()
    try:
        yield process, log, seen
    finally:
        seen |= descendants(process.pid)
        if process.poll() is None:
            process.kill()
            process.wait()
        for pid in seen:
            if alive(pid):
                os.kill(pid, signal.SIGKILL)
