"""The `eventbuffer` command: a local stack in one command, and tools to look inside.

    eventbuffer run        Redis (found or started), schema, ingest + flush workers and Beat
    eventbuffer migrate    create the ClickHouse database and table (idempotent)
    eventbuffer flush      drain the buffer into ClickHouse now, in this process
    eventbuffer status     queues, claims, dead letters, locks, last flushes, active visitors
                           (--json: one JSON object; --watch: a live view)
    eventbuffer metrics    print the Prometheus metrics once (Redis gauges, worker counters)
    eventbuffer query SQL  run a (read-only unless --write) query against ClickHouse
    eventbuffer demo       send realistic traffic and wait until it has landed

Expected failures (bad settings, Redis or ClickHouse unreachable, embedded
ClickHouse busy) end with ONE line on stderr: exit code 2 for bad settings
and refused usage, 1 for runtime failures. Passwords in URLs are never shown.

Embedded ClickHouse (chDB) can be open in only one process at a time: every
command opens it as late as possible, closes it right after use, and retries
for a while when another process (a flush worker) holds it.

Modules: `app` (parser, dispatch, errors and exit codes), `common` (shared
helpers), one module per command (`run`, `migrate`, `flush`, `status`
and its live view `watch`, `query`, `demo`, `metrics`), and what `run`
and `demo` are built from (`local_redis`, `processes`, `traffic`).
"""

from worker.cli.app import main

__all__ = ["main"]
