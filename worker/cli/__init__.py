"""The `eventbuffer` command: a local stack in one command, and tools to look inside.

    eventbuffer run        Redis (found or started), schema, ingest + flush workers and Beat
    eventbuffer migrate    create or upgrade the ClickHouse table: versioned migrations
                           (--status: applied and pending)
    eventbuffer flush      drain the buffer into ClickHouse now, in this process
    eventbuffer status     queues, claims, dead letters, locks, last flushes, active visitors
                           (--json: one JSON object; --watch: a live view)
    eventbuffer metrics    print the Prometheus metrics once (Redis gauges, worker counters)
    eventbuffer query SQL  run a (read-only unless --write) query against ClickHouse
    eventbuffer demo       send realistic traffic and wait until it has landed
    eventbuffer dlq        list, show, replay or purge dead letters
    eventbuffer forget     erase a person's events everywhere (ClickHouse, buffer, dead
                           letters, later arrivals), audited
    eventbuffer import     import history from export files (resumable, exactly once)

Expected failures (bad settings, Redis or ClickHouse unreachable, embedded
ClickHouse busy) end with ONE line on stderr: exit code 2 for bad settings
and refused usage, 1 for runtime failures. Passwords in URLs are never shown.

Embedded ClickHouse (chDB) can be open in only one process at a time: every
command opens it as late as possible, closes it right after use, and retries
for a while when another process (a flush worker) holds it.

Modules: `app` (parser, dispatch, errors and exit codes), `common` (shared
helpers), one module per command, named after it (`run`, `migrate`,
`status` and its live view `watch`, `query`, `demo`, `dlq` with
`dlq_pick` and `dlq_replay`, `forget`), with `_cmd` where a library module
or a Python keyword bears the command's name (`flush_cmd`, `import_cmd`,
`metrics_cmd`), and what `run` and `demo` are built from (`local_redis`,
`processes`, `traffic`).
"""

from __future__ import annotations

import sys

__all__ = ["main"]

# What the command line needs beyond what a producer needs (a producer-only install,
# README "Installing only the producer", has none of them).
_FULL_INSTALL = ("rich", "chdb", "clickhouse_driver", "prometheus_client")


def main(argv: list[str] | None = None) -> int:
    try:
        from worker.cli.app import main as run
    except ModuleNotFoundError as exc:
        if exc.name not in _FULL_INSTALL:
            raise
        print(
            f"eventbuffer: the command line needs the full install ({exc.name} is missing): "
            "`pip install eventbuffer` with its dependencies; this one has only what "
            "EventProducer needs",
            file=sys.stderr,
        )
        return 2
    return run(argv)
