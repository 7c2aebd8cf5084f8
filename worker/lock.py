"""The flush lock: redis-py's token lock, kept alive while a flush works, and
taken over at once from a holder that is provably dead.

redis-py's `Lock` already does the right things (SET NX PX with a token,
release and extend by compare-and-act Lua). This wrapper adds:

- **Acquisition at maxmemory**: the SET NX PX runs in lock_acquire.lua,
  flagged allow-oom, since a full Redis refuses a plain SET and the flush
  that would free the memory could never start.

- **A watchdog** thread that extends the lock to its full TTL every third of
  it while held, so a slow insert does not lose it, and records when an
  extension failed (the lock expired or was taken over and may belong to
  someone else now): the flusher checks `lost` between chunks and stops.
- **A stall bound**: the watchdog is a thread, so it would go on extending
  the lock of a flush whose main thread hangs in an INSERT that never
  returns. The flusher reports its progress (`progress()`: a chunk
  inserted, a batch acknowledged); once the last report is older than
  `stall_s`, the watchdog stops extending, logs one WARNING and marks the
  lock lost. Its heartbeat goes stale and the next flusher takes the shard
  over, fenced as below; the stalled flusher stops at its next check.
- **A token that names its holder**:
  `eb1|<host>|<pid>|<process start>|<pid space>|<ttl ms>|<random hex>`.
  The process start time (clock ticks after boot, from /proc) tells a
  reused pid from the holder; the pid space (boot id, pid namespace and
  host name, hashed) says where the pid means that process: the same kernel
  boot and the same container. The lock and its holder are one Redis value, set
  atomically, and ack.lua compares the whole token as before.
- **A heartbeat** that costs nothing extra: each extension sets the lock's
  TTL back to the holder's `ttl ms`, so `ttl ms - PTTL` is the time since
  its last extension, measured on Redis' clock (no host clock is compared
  with another).
- **Takeover** (`lock_takeover.lua`, compare-and-swap on the token) when
  the lock is held and its holder is provably dead:
  - its pid space is this process's, and its pid is gone, a zombie, or
    now another process (start time differs): taken over at once;
  - its heartbeat is stale, whatever its host: no extension for
    `STALE_INTERVALS` watchdog intervals (two thirds of its TTL), taken
    over only if it is still not extended when the script runs. A pid on
    another host cannot be checked, so silence is the only evidence there.
  A token that does not name its holder (an older version) is never taken
  over: its lock expires by its TTL.

A holder judged dead that was only frozen (SIGSTOP, a VM pause, a C call
holding the GIL) is fenced when it wakes: its watchdog's extension fails
(the lock holds another token) and its next lock check stops the flush;
ack.lua refuses an acknowledgement under another token; its INSERTs carry
the claim's dedup tokens, which ClickHouse drops as duplicates. Correctness
never depends on the lock alone.
"""

from __future__ import annotations

import hashlib
import logging
import os
import socket
import threading
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from types import TracebackType
from urllib.parse import unquote

from redis.exceptions import LockError
from redis.lock import Lock

from worker.clock import SYSTEM_CLOCK, Clock
from worker.errors import LockLostError
from worker.keys import escape
from worker.redis_errors import REDIS_FAILURES
from worker.replies import number, text
from worker.scripts import Scripts
from worker.topology import Client

log = logging.getLogger(__name__)


__all__ = [
    "FlushLock",
    "LockLostError",
    "LockState",
    "Process",
    "lock_state",
    "make_token",
    "read_lock",
    "this_process",
]

TOKEN_VERSION = "eb1"
# The watchdog extends the lock every 1/WATCHDOG_INTERVALS of its TTL ...
WATCHDOG_INTERVALS = 3
# ... and a holder that went this many intervals without an extension is stale.
STALE_INTERVALS = 2


@dataclass(frozen=True)
class Process:
    """A process, as a lock token names it."""

    host: str
    pid: int
    # Clock ticks after boot at which it started (/proc/<pid>/stat), 0 if unknown.
    started: int
    # Where `pid` names this process: its boot and pid namespace, hashed ("" if unknown).
    pidspace: str

    @property
    def name(self) -> str:
        return f"{self.host}:{self.pid}"


@dataclass(frozen=True)
class LockState:
    """A held flush lock, as Redis has it now."""

    token: str
    ttl_ms: int  # PTTL: how long it lives unless extended (-1: no expiry)
    holder: Process | None  # None: a token that does not name its holder
    holder_ttl_ms: int  # what its holder extends it to (0: unknown)
    # Time since its holder last extended it (None: unknown).
    heartbeat_age_ms: int | None
    # No extension for STALE_INTERVALS watchdog intervals: taken over by the next flusher.
    stale: bool

    @property
    def who(self) -> str:
        """host:pid, or the token of a holder that does not say."""
        return self.holder.name if self.holder is not None else self.token

    def describe(self) -> str:
        """Who holds it and how its heartbeat is, for a line of text."""
        if self.heartbeat_age_ms is None:
            left = f"{self.ttl_ms / 1000:.0f} s left" if self.ttl_ms >= 0 else "no expiry"
            return f"{self.who} ({left})"
        beat = f"heartbeat {self.heartbeat_age_ms / 1000:.0f} s ago"
        return f"{self.who} ({beat}, {'stale' if self.stale else 'fresh'})"


def _stat(pid: int) -> tuple[str, int] | None:
    """(state, start time in clock ticks) of a process from /proc; None if there is none.

    Raises OSError when /proc cannot tell.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return None
    fields = stat.rsplit(")", 1)[1].split()  # the command name may hold spaces and ")"
    return fields[0], int(fields[19])  # fields 3 and 22 of proc(5)


def _pidspace(host: str) -> str:
    """This process's kernel boot, pid namespace and host name, hashed ("" where they
    cannot be read). The host name keeps apart VMs cloned from one snapshot, which
    share a boot id."""
    try:
        if int(os.readlink("/proc/self")) != os.getpid():
            return ""  # a /proc of another pid namespace: its pids are not ours
        boot = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        namespace = os.readlink("/proc/self/ns/pid")
    except (OSError, ValueError):
        return ""
    return hashlib.sha1(f"{boot}/{namespace}/{host}".encode()).hexdigest()[:12]


@cache
def _process(pid: int) -> Process:
    try:
        found = _stat(pid)
    except (OSError, ValueError, IndexError):
        found = None
    host = socket.gethostname()
    pidspace = _pidspace(host) if found is not None else ""
    return Process(host, pid, found[1] if found else 0, pidspace)


def this_process() -> Process:
    """The calling process (computed once per pid: a forked child is another process)."""
    return _process(os.getpid())


def make_token(ttl_ms: int, holder: Process | None = None) -> str:
    """A new lock token naming `holder` (default: this process), which extends to `ttl_ms`."""
    p = holder or this_process()
    fields = (escape(p.host), p.pid, p.started, p.pidspace, ttl_ms, uuid.uuid4().hex)
    return "|".join([TOKEN_VERSION, *map(str, fields)])


def lock_state(token: object, pttl: object) -> LockState:
    """A held lock from its GET and PTTL replies."""
    value, left = text(token), number(pttl)
    parts = value.split("|")
    holder, holder_ttl = None, 0
    if len(parts) == 7 and parts[0] == TOKEN_VERSION:
        try:
            holder = Process(unquote(parts[1]), int(parts[2]), int(parts[3]), parts[4])
            holder_ttl = int(parts[5])
        except ValueError:
            holder, holder_ttl = None, 0
    age = max(0, holder_ttl - left) if holder_ttl > 0 and left >= 0 else None
    stale = age is not None and age > holder_ttl * STALE_INTERVALS // WATCHDOG_INTERVALS
    return LockState(value, left, holder, holder_ttl, age, stale)


def read_lock(redis: Client, name: str) -> LockState | None:
    """The lock `name` as held now, or None if it is free."""
    pipe = redis.pipeline(transaction=False)
    pipe.get(name)
    pipe.pttl(name)
    token, ttl = pipe.execute()
    if token is None:
        return None
    return lock_state(token, ttl)


def gone(holder: Process) -> str | None:
    """Why `holder`'s process is certainly gone, or None if it may be alive.

    Only a holder of this process's pid space can be checked.
    """
    if not holder.pidspace or holder.pidspace != this_process().pidspace:
        return None
    try:
        found = _stat(holder.pid)
    except (OSError, ValueError, IndexError):
        return None
    if found is None:
        return "its process is gone"
    state, started = found
    if started != holder.started:
        return "its pid belongs to another process now"
    if state in ("Z", "X"):
        return "its process has exited"
    return None


def dead_holder(state: LockState) -> tuple[str, int] | None:
    """(why, the most ms the lock may have left for the takeover; -1: any) if its
    holder is provably dead, else None."""
    if state.holder is None:
        return None
    why = gone(state.holder)
    if why is not None:
        return why, -1
    if state.stale and state.heartbeat_age_ms is not None:
        # Still stale when the script runs: no extension since it was read.
        return f"its heartbeat is {state.heartbeat_age_ms / 1000:.0f} s old", state.ttl_ms
    return None


class FlushLock:
    def __init__(
        self,
        redis: Client,
        name: str,
        ttl_s: float,
        *,
        stall_s: float | None = None,
        clock: Clock = SYSTEM_CLOCK,
        what: str = "",
        on_stall: Callable[[], None] | None = None,
    ) -> None:
        """`stall_s`: the watchdog gives the lock up once `progress()` was last called
        this long ago (None: never); `clock` tells the progress's age; `what` names
        what the lock guards in that WARNING (e.g. "shard 3"); `on_stall` is called
        (on the watchdog's thread) when it gives the lock up (a metric)."""
        self.name = name
        self.ttl_s = ttl_s
        self.redis = redis
        self.stall_s = stall_s
        self.clock = clock
        self.what = what or name
        self.on_stall = on_stall
        self._progress_ms = clock.now_ms()
        self._lock = Lock(redis, name, timeout=ttl_s, blocking=False, thread_local=False)
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        self.lost = False
        # Set (with `lost`) when the watchdog gave the lock up for want of progress.
        self.stalled = False
        # Set when acquire() took the lock over from a dead holder: whom, and why.
        self.took_over: str | None = None

    @property
    def token(self) -> bytes:
        token = self._lock.local.token
        if token is None:
            raise LockLostError(f"{self.name} is not held")
        return token if isinstance(token, bytes) else str(token).encode()

    def acquire(self) -> bool:
        """Take the lock if free, or from a provably dead holder; never waits.

        Starts the watchdog on success.
        """
        token = make_token(int(self.ttl_s * 1000))
        self.took_over = None
        if not self._acquire(token) and not self._take_over(token):
            return False
        self.lost = False
        self.stalled = False
        self.progress()
        self._stop.clear()
        self._watchdog = threading.Thread(
            target=self._keep_alive, name=f"lock-watchdog:{self.name}", daemon=True
        )
        self._watchdog.start()
        return True

    def _acquire(self, token: str) -> bool:
        """Take the lock if free: redis-py's SET NX PX, but in lock_acquire.lua, which runs
        when Redis is at maxmemory too (the flush that frees memory must be able to start)."""
        if not Scripts(self.redis).acquire_lock(self.name, token, int(self.ttl_s * 1000)):
            return False
        self._lock.local.token = token.encode()
        return True

    def _take_over(self, token: str) -> bool:
        state = read_lock(self.redis, self.name)
        if state is None:  # released since
            return self._acquire(token)
        verdict = dead_holder(state)
        if verdict is None:
            return False
        why, most_left_ms = verdict
        ttl_ms = int(self.ttl_s * 1000)
        if not Scripts(self.redis).take_over_lock(
            self.name, state.token, token, ttl_ms, most_left_ms
        ):
            return False  # another flusher was first, or the holder came back
        self._lock.local.token = token.encode()
        self.took_over = f"{state.who}: {why}"
        log.warning("took over flush lock %s from %s", self.name, self.took_over)
        return True

    def progress(self) -> None:
        """The flush moved on (a chunk inserted, a batch acknowledged): keep extending."""
        self._progress_ms = self.clock.now_ms()

    def _keep_alive(self) -> None:
        interval = self.ttl_s / WATCHDOG_INTERVALS
        while not self._stop.wait(interval) and self.keep_alive_once():
            pass

    def keep_alive_once(self) -> bool:
        """One watchdog step: extend the lock, or give it up (False: the watchdog stops).

        Given up when the flush made no progress for `stall_s` (the lock is
        left to go stale, so another flusher takes it over) or when the
        extension failed (expired, or taken over already).
        """
        since_ms = self.clock.now_ms() - self._progress_ms
        if self.stall_s is not None and since_ms > self.stall_s * 1000:
            log.warning(
                "flush of %s made no progress for %.0f s (over EVENT_BUFFER_FLUSH_STALL_S=%g): "
                "no longer extending its lock %s, so another flusher can take it over",
                self.what,
                since_ms / 1000,
                self.stall_s,
                self.name,
                extra={"lock": self.name, "stalled_s": round(since_ms / 1000, 3)},
            )
            self.stalled = self.lost = True
            if self.on_stall is not None:
                self.on_stall()
            return False
        try:
            self._lock.extend(self.ttl_s, replace_ttl=True)
        except REDIS_FAILURES as exc:  # LockError too: a RedisError
            log.warning("flush lock %s could not be extended: %s", self.name, exc)
            self.lost = True
            return False
        return True

    def check(self) -> None:
        """Raise LockLostError if the watchdog saw the lock slip away, or gave it up."""
        if self.stalled:
            raise LockLostError(
                f"flush lock {self.name} given up: no progress for over {self.stall_s:g} s"
            )
        if self.lost:
            raise LockLostError(f"flush lock {self.name} expired or was taken over")

    def release(self) -> None:
        self._stop.set()
        if self._watchdog is not None:
            self._watchdog.join()
            self._watchdog = None
        try:
            self._lock.release()
        except LockError:
            # Expired or taken over: it is no longer ours to release.
            log.info("flush lock %s was no longer held at release", self.name)

    def __enter__(self) -> bool:
        return self.acquire()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._lock.local.token is not None:
            self.release()
