"""One `eventbuffer run` per data directory, and one per Redis.

Two stacks in one directory would share its log files and, each with a
private `redis-server`, append to the same AOF; two stacks on one Redis run
two Beats and twice the workers on one buffer. `run` takes both before it
starts anything:

- the directory: `data/run.lock`, `flock`ed for the stack's lifetime (the
  kernel releases it when the process ends, however it ends), holding the
  owner's pid for the message a second `run` prints;
- the Redis: `<prefix>:run-owner` (`Keyspace.run_owner`) holds
  "<host>:<pid> in <directory>" with a TTL the supervisor refreshes, so a
  stack killed with SIGKILL frees it within `OWNER_TTL_S`.
"""

from __future__ import annotations

import fcntl
import os
import socket
import time
from contextlib import suppress
from pathlib import Path
from typing import IO

from redis import Redis
from redis.exceptions import RedisError

from worker.cli.common import CliError, mask

LOCK_FILE = "run.lock"
OWNER_TTL_S = 30
REFRESH_S = 5.0


class DirectoryLock:
    """The data directory's lock, held while the stack runs."""

    def __init__(self, data: Path) -> None:
        self.path = data / LOCK_FILE
        self._file: IO[str] | None = None

    def acquire(self) -> None:
        """Take the lock, or raise CliError naming the stack that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(self.path, "a+")  # noqa: SIM115  (held open for the stack's life)
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "?"
            handle.close()
            raise CliError(
                f"another `eventbuffer run` (pid {holder}) is running in this directory "
                f"({self.path.parent.resolve()}): one stack per data directory. Stop it "
                f"(Ctrl-C in its terminal, or `kill {holder}`), or run from another directory",
                2,
            ) from None
        handle.seek(0)
        handle.truncate()
        handle.write(f"{os.getpid()}\n")
        handle.flush()
        self._file = handle

    def release(self) -> None:
        if self._file is not None:
            self._file.close()  # closing drops the flock
            self._file = None


class RedisOwner:
    """This stack's claim on its Redis, refreshed while it runs."""

    def __init__(self, redis: Redis, key: str, url: str) -> None:
        self.redis = redis
        self.key = key
        self.url = url
        self.me = f"{socket.gethostname()}:{os.getpid()} in {Path.cwd()}"
        self._refreshed = 0.0
        self.held = False

    def claim(self) -> None:
        """Claim the Redis, or raise CliError naming the stack that uses it.

        A Redis that refuses the write (full, read-only) is not claimed: the
        stack goes on, as it would have before this check existed.
        """
        try:
            if self.redis.set(self.key, self.me, nx=True, ex=OWNER_TTL_S):
                self.held, self._refreshed = True, time.monotonic()
                return
            holder = self.redis.get(self.key)
        except RedisError:
            return
        if holder is None:  # expired in between
            self.claim()
            return
        who = holder.decode("utf-8", "replace") if isinstance(holder, bytes) else str(holder)
        raise CliError(
            f"another `eventbuffer run` ({who}) uses the Redis at {mask(self.url)}: one stack "
            "per Redis (two would run two Beats on one buffer). Stop it, or give this one "
            f"its own REDIS_URL (it frees the claim within {OWNER_TTL_S} s of stopping)",
            2,
        )

    def refresh(self) -> None:
        """Keep the claim alive; called from the supervisor's loop (every REFRESH_S at most)."""
        now = time.monotonic()
        if not self.held or now - self._refreshed < REFRESH_S:
            return
        self._refreshed = now
        with suppress(RedisError):  # a Redis restarting or full: next time
            self.redis.set(self.key, self.me, ex=OWNER_TTL_S)

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            if self.redis.get(self.key) == self.me.encode():
                self.redis.delete(self.key)
        except RedisError:
            pass  # it expires
        finally:
            self.redis.close()
