"""The lock that lets several `eventbuffer migrate` run at once (hosts, processes).

The migrations table is created first (IF NOT EXISTS: idempotent), then each
`migrate` takes the lock: a `CREATE TABLE eventbuffer_migrations_lock`
*without* IF NOT EXISTS. ClickHouse creates a table name once: exactly one
caller succeeds, the others get TABLE_ALREADY_EXISTS and wait until it is
dropped. On a cluster the CREATE and DROP run `ON CLUSTER`: every host
executes the distributed DDL queue (one ordered queue in Keeper) in the same
order, so the first CREATE in the queue wins on every host and the later ones
fail on every host. The holder reads what is recorded only once it holds the
lock (on a cluster after `SYSTEM SYNC REPLICA` of the record table), so the
others find the migrations done. A lock left by a killed `migrate` is broken:
at once when its holder was a process of this host that no longer runs, else
after `lock_timeout_s`. Every migration's DDL is idempotent
(worker/sinks/migration_plans.py), so even a lock broken while its holder
still ran could only repeat work, never undo it.

Breaking is itself exclusive: several waiters may find the same stale lock,
and two that each dropped it would let two in (the second breaker dropping
the lock the first had just taken again). So the right to break the lock of
one holder is a second lock, `eventbuffer_migrations_lock_break_<digest of
that holder>`, taken the same way. Its winner reads the holder again, drops
the lock only if it is still that holder's (no one else may drop it: they
would need the break lock), drops the break lock and then takes the lock
through the normal path like every other waiter; the losers go back to
waiting. A break lock whose own holder died is broken the same way (its name
is then the digest of that breaker).
"""

from __future__ import annotations

import hashlib
import os
import re
import socket
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from worker.errors import SinkError
from worker.sinks.schema import (
    MIGRATIONS_LOCK_TABLE,
    Run,
    create_lock_table,
    database_expr,
    drop_lock_table,
    string_literal,
)

TABLE_ALREADY_EXISTS = 57
LOCK_TIMEOUT_S = 600.0
LOCK_POLL_S = 0.5


_HOLDER = re.compile(r"^host=(?P<host>[^ ]*) pid=(?P<pid>\d+) since=(?P<since>\d+)$")


@dataclass(frozen=True)
class Holder:
    host: str
    pid: int
    since: int  # the server's epoch seconds when it took the lock

    def __str__(self) -> str:
        return f"host={self.host} pid={self.pid} since={self.since}"


def _server_now(run: Run) -> int:
    return int(run("SELECT toUInt32(toUnixTimestamp(now()))")[0][0])


def read_holder(
    run: Run, database: str | None, table: str = MIGRATIONS_LOCK_TABLE
) -> Holder | None:
    rows = run(
        "SELECT default_expression FROM system.columns WHERE "
        f"database = {database_expr(database)} AND table = {string_literal(table)} "
        "AND name = 'holder'"
    )
    if not rows:
        return None
    text = str(rows[0][0]).strip().strip("'").replace("\\'", "'")
    match = _HOLDER.match(text)
    if match is None:
        return Holder(text, 0, 0)
    return Holder(match["host"], int(match["pid"]), int(match["since"]))


def break_lock_table(holder: Holder) -> str:
    """The table whose CREATE wins the right to break `holder`'s lock."""
    digest = hashlib.sha256(str(holder).encode()).hexdigest()[:16]
    return f"{MIGRATIONS_LOCK_TABLE}_break_{digest}"


def _process_gone(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    except PermissionError:  # alive, another user's
        return False
    return False


def _host() -> str:
    return re.sub(r"[^A-Za-z0-9._-]", "_", socket.gethostname()) or "unknown"


def _already_exists(exc: SinkError) -> bool:
    return exc.code == TABLE_ALREADY_EXISTS or "already exists" in str(exc)


def _stale(holder: Holder, me: Holder, timeout_s: float) -> str | None:
    """Why `holder`'s lock may be broken, or None while it may not."""
    if holder.host == me.host and holder.pid != me.pid and _process_gone(holder.pid):
        return "its process is gone"
    if me.since - holder.since > timeout_s:
        return f"held over {timeout_s:g} s"
    return None


def _break(
    run: Run,
    database: str | None,
    cluster: str | None,
    table: str,
    stale: Holder,
    me: Holder,
    timeout_s: float,
) -> bool:
    """Drop `table` (a lock) if it is still `stale`'s, as the only breaker of `stale`'s
    lock: whether this call dropped it."""
    guard = break_lock_table(stale)
    try:
        run(create_lock_table(database, cluster, str(me), guard))
    except SinkError as exc:
        if not _already_exists(exc):
            raise
        breaker = read_holder(run, database, guard)
        if breaker is not None and _stale(breaker, me, timeout_s) is not None:
            _break(run, database, cluster, guard, breaker, me, timeout_s)
        return False  # another waiter breaks it (or, its breaker dead, it was just cleared)
    try:
        if read_holder(run, database, table) != stale:
            return False  # released, or broken and taken again, since it was read
        run(drop_lock_table(database, cluster, table))
        return True
    finally:
        run(drop_lock_table(database, cluster, guard))


@contextmanager
def migrations_lock(
    run: Run,
    database: str | None,
    cluster: str | None,
    *,
    timeout_s: float = LOCK_TIMEOUT_S,
    on_wait: Callable[[str], None] | None = None,
) -> Iterator[None]:
    """Hold the migrations lock for the block (see the module's docstring)."""
    shown: Holder | None = None
    while True:
        me = Holder(_host(), os.getpid(), _server_now(run))
        try:
            run(create_lock_table(database, cluster, str(me)))
            break
        except SinkError as exc:
            if not _already_exists(exc):
                raise
        holder = read_holder(run, database)
        if holder is None:
            continue  # released in between: try again
        why = _stale(holder, me, timeout_s)
        if why is not None and _break(
            run, database, cluster, MIGRATIONS_LOCK_TABLE, holder, me, timeout_s
        ):
            if on_wait is not None:
                on_wait(f"breaking the migrations lock of {holder} ({why})")
            continue
        if on_wait is not None and holder != shown:
            on_wait(f"waiting for another migrate to finish ({holder})")
            shown = holder
        time.sleep(LOCK_POLL_S)
    try:
        yield
    finally:
        run(drop_lock_table(database, cluster))
