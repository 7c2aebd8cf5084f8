"""`eventbuffer run`: Redis (found or started), schema, ingest + flush workers and Beat."""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from contextlib import suppress
from pathlib import Path

from redis import Redis
from rich.console import Console

from worker.cli.common import ERROR_PREFIX, CliError, is_embedded, mask, one_line, version
from worker.cli.local_redis import PrivateRedis, redis_answers
from worker.cli.processes import (
    Child,
    Signals,
    Stopped,
    became_ready,
    child_env,
    describe_exit,
    last_line,
    spawn,
    stop_process,
)
from worker.cli.stack_lock import DirectoryLock, RedisOwner
from worker.errors import EvictionPolicyError
from worker.keys import Keyspace
from worker.names import DEFAULT_QUEUE, FLUSH_QUEUE, INGEST_QUEUE
from worker.redis_memory import check_eviction
from worker.settings import Settings

CHILD_STOP_S = 10.0
# The ingest workers `run` starts, one list of `celery worker` options per
# process (compose.yaml and the README recommend the same; benchmarks/
# bench_standard.py measures it against Celery's defaults).
INGEST_LAYOUT: list[list[str]] = [["-P", "solo"], ["-P", "solo"]]
READY_WAIT_S = 60.0


def supervise(
    children: list[Child],
    redis: PrivateRedis | None,
    signals: Signals,
    console: Console,
    owner: RedisOwner | None = None,
) -> str | None:
    """Wait for a signal (None) or for a worker to die (its message).

    A private Redis that exits is restarted on its port (CliError if it keeps exiting).
    The stack's claim on its Redis (`owner`) is kept alive meanwhile.
    """
    started = time.monotonic()
    announced = False
    while not signals.wait(0.25):
        if owner is not None:
            owner.refresh()
        for child in children:
            code = child.process.poll()
            if code is not None:
                return (
                    f"the {child.what} exited unexpectedly ({describe_exit(code)}); "
                    f"last log line: {last_line(child.log) or '(none)'} (log: {child.log})"
                )
            if became_ready(child):
                console.print(f"✓ {child.what} ready (pid {child.process.pid})", style="green")
        if redis is not None and redis.exited():
            why = redis.restart(signals)
            console.print(
                f"redis-server exited ({why}); restarted on port {redis.port} with its AOF "
                f"(pid {redis.pid}, log {redis.log})",
                style="yellow",
            )
        if not announced and all(c.ready for c in children):
            announced = True
            console.print("Everything is up. Ctrl-C stops it all.", style="bold green")
        elif not announced and time.monotonic() - started > READY_WAIT_S:
            announced = True
            late = ", ".join(f"{c.what} (log: {c.log})" for c in children if not c.ready)
            console.print(f"Still not ready after {READY_WAIT_S:.0f} s: {late}", style="yellow")
    return None


def migrate(settings: Settings, env: dict[str, str], signals: Signals) -> None:
    """`eventbuffer migrate` in a child process; CliError (one line) if it fails.

    Not in this process: loading chDB (or the native driver) would stay in the
    supervisor's memory for as long as `run` runs (chDB's engine is large), and the
    child also releases embedded ClickHouse before the flush worker needs it.
    """
    process = subprocess.Popen(
        [sys.executable, "-m", "worker.cli", "migrate"],
        env=env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        start_new_session=True,  # Ctrl-C reaches us only: we stop it
    )
    while True:
        try:
            _, errors = process.communicate(timeout=0.1)
            break
        except subprocess.TimeoutExpired:
            if signals.received:
                stop_process(process, CHILD_STOP_S, force=signals)
                raise Stopped from None
    if process.returncode != 0:
        # The child's own one-line error (after anything a library printed), else its last line.
        text = errors.decode(errors="replace")
        lines = [line.strip() for line in text.splitlines() if line.strip()]
        own = [line.removeprefix(ERROR_PREFIX) for line in lines if line.startswith(ERROR_PREFIX)]
        why = one_line((own or lines or [describe_exit(process.returncode)])[-1])
        where = mask(settings.clickhouse_url)
        if where not in why:
            why += f" (CLICKHOUSE_URL={where})"
        raise CliError(f"cannot create table `{settings.clickhouse_table}`: {why}")


def print_banner(
    console: Console,
    settings: Settings,
    redis: PrivateRedis | None,
    children: list[Child],
) -> None:
    console.print(f"eventbuffer {version()}: local stack in {os.getcwd()}", style="bold")
    how = f"private redis-server, pid {redis.pid}, AOF in data/redis" if redis else "existing"
    console.print(f"  Redis       {mask(settings.redis_url)} ({how})")
    kind = "embedded chDB" if is_embedded(settings) else "server"
    console.print(
        f"  ClickHouse  {mask(settings.clickhouse_url)} ({kind}, table "
        f"`{settings.clickhouse_table}` ready)"
    )
    for child in children:
        console.print(f"  {child.name:<10}  {child.what}, pid {child.process.pid}, log {child.log}")
    console.print(f"  Beat runs process_buffer every {settings.flush_interval_s} s.")
    console.print("Send events:")
    console.print("  eventbuffer demo                    # realistic traffic, then a summary")
    # One statement per line, each under 80 columns: a terminal must not wrap it mid-string.
    console.print("  python: from worker.producer import EventProducer", soft_wrap=True)
    console.print("          with EventProducer() as p:", soft_wrap=True)
    console.print('              p.send({"project_id": "p1", "name": "signup",', soft_wrap=True)
    console.print('                      "created_at": "2026-01-01T12:00:00Z"})', soft_wrap=True)
    console.print("Look inside (from this directory):")
    console.print("  eventbuffer status")
    console.print(
        f'  eventbuffer query "SELECT name, count() FROM {settings.clickhouse_table} GROUP BY name"'
    )


def ingest_workers(env: dict[str, str], logs: Path, fast: list[str]) -> list[Child]:
    """The ingest workers of `INGEST_LAYOUT`, on `ingest` and Celery's default queue.

    The default queue too: a task sent by name without `queue=` lands there.
    """
    workers = []
    for n, options in enumerate(INGEST_LAYOUT):
        name = "ingest" if len(INGEST_LAYOUT) == 1 else f"ingest{n + 1}"
        what = "ingest worker" if len(INGEST_LAYOUT) == 1 else f"ingest worker {n + 1}"
        queues = f"{INGEST_QUEUE},{DEFAULT_QUEUE}"
        argv = ["worker", "-Q", queues, *options, "-n", f"{name}@%h", *fast]
        workers.append(spawn(name, what, argv, env, logs))
    return workers


# Files `run` and its children create: for this user only (no group, no others).
PRIVATE_UMASK = 0o077


def private_directory(path: Path) -> Path:
    """`path` created (or made) readable by this user only.

    `data/` holds Redis' AOF (every buffered event), the logs and embedded
    ClickHouse: under a umask of 022 they would be world-readable. A data
    directory from an older run keeps its files' modes, but nobody else can
    reach them through it any more.
    """
    path.mkdir(mode=0o700, parents=True, exist_ok=True)
    path.chmod(0o700)
    return path


def cmd_run(args: argparse.Namespace, settings: Settings, console: Console) -> int:
    # Inherited by Redis, the workers, Beat and the migration: AOF, logs, chDB
    # data and Beat's schedule are created 0600 (directories 0700).
    previous_umask = os.umask(PRIVATE_UMASK)
    try:
        return _run(settings, console)
    finally:
        os.umask(previous_umask)


def _run(settings: Settings, console: Console) -> int:
    data = private_directory(Path("data"))
    logs = private_directory(data / "logs")
    directory = DirectoryLock(data)
    directory.acquire()  # one stack per data directory: before anything is started
    signals = Signals()
    signals.install()
    redis: PrivateRedis | None = None
    owner: RedisOwner | None = None
    children: list[Child] = []
    failure: str | None = None
    try:
        if not redis_answers(settings.redis_url):
            redis = PrivateRedis(settings, data)
            redis.start(signals)
        signals.check()
        # ... and one per Redis (a second stack would run a second Beat on the same buffer).
        owner = RedisOwner(
            Redis.from_url(settings.redis_url, socket_timeout=5, socket_connect_timeout=5),
            Keyspace(settings.key_prefix, settings.shards).run_owner,
            settings.redis_url,
        )
        owner.claim()
        # The workers would each stop with this line: say it once, before starting any.
        try:
            for warning in check_eviction(settings):
                console.print(warning, style="yellow")
        except EvictionPolicyError as exc:
            raise CliError(str(exc).removeprefix("eventbuffer: "), 2) from None
        env = child_env(settings.redis_url)
        # Every worker process counts in one directory: `eventbuffer metrics` run here
        # reads it, and with EVENT_BUFFER_METRICS_PORT the first worker to take the port
        # serves them all (the others say so in their logs).
        metrics_dir = (data / "metrics").resolve()
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir(parents=True)
        env["PROMETHEUS_MULTIPROC_DIR"] = str(metrics_dir)
        migrate(settings, env, signals)
        fast = ["--without-mingle", "--without-gossip"]
        children = [
            *ingest_workers(env, logs, fast),
            spawn(
                "flush",
                "flush worker",
                # One pool process (embedded ClickHouse admits one process at a
                # time), replaced every 10 tasks: chDB keeps memory for every
                # session it opens, writes and closes, and a fresh process returns it.
                # The replacement starts within ~0.5 s (worker/prefork.py);
                # benchmarks/bench_e2e.py measures the latency against a server.
                [
                    "worker",
                    "-Q",
                    FLUSH_QUEUE,
                    "-c",
                    "1",
                    "--max-tasks-per-child",
                    "10",
                    "-n",
                    "flush@%h",
                    *fast,
                ],
                env,
                logs,
            ),
            spawn(
                "beat", "beat", ["beat", "--schedule", str(data / "celerybeat-schedule")], env, logs
            ),
        ]
        print_banner(console, settings, redis, children)
        failure = supervise(children, redis, signals, console, owner)
    except Stopped:
        pass
    finally:
        if children or redis is not None:
            console.print("Stopping…")
        for child in children:
            if child.process.poll() is None:
                with suppress(ProcessLookupError):
                    child.process.terminate()
        for child in children:  # warm shutdown: running tasks finish first
            stop_process(child.process, CHILD_STOP_S, force=signals)
        if owner is not None:
            owner.release()
        if redis is not None:
            redis.stop()
        signals.restore()
        directory.release()
    if failure:
        raise CliError(failure)
    console.print("Stopped.")
    return 0
