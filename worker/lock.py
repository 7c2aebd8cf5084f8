"""The flush lock: redis-py's token lock, kept alive while a flush works.

redis-py's `Lock` already does the right things (SET NX PX with a random
token, release and extend by compare-and-act Lua). This wrapper adds a
watchdog thread that extends the lock every third of its TTL while held, so
a slow insert does not lose it, and records when an extension failed (the
lock expired and may belong to someone else now): the flusher checks
`lost` between chunks and stops. Correctness never depends on the lock
alone: ack.lua refuses a claim held under another token, and dedup tokens
make a doubly-inserted chunk harmless.
"""

from __future__ import annotations

import logging
import threading
from types import TracebackType

from redis import Redis
from redis.exceptions import LockError, RedisError
from redis.lock import Lock

from worker.errors import LockLostError
from worker.replies import text

log = logging.getLogger(__name__)


__all__ = ["FlushLock", "LockLostError", "lock_holder"]


class FlushLock:
    def __init__(self, redis: Redis, name: str, ttl_s: float) -> None:
        self.name = name
        self.ttl_s = ttl_s
        self._lock = Lock(redis, name, timeout=ttl_s, blocking=False, thread_local=False)
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        self.lost = False

    @property
    def token(self) -> bytes:
        token = self._lock.local.token
        if token is None:
            raise LockLostError(f"{self.name} is not held")
        return token if isinstance(token, bytes) else str(token).encode()

    def acquire(self) -> bool:
        """Take the lock if free; never waits. Starts the watchdog on success."""
        if not self._lock.acquire(blocking=False):
            return False
        self.lost = False
        self._stop.clear()
        self._watchdog = threading.Thread(
            target=self._keep_alive, name=f"lock-watchdog:{self.name}", daemon=True
        )
        self._watchdog.start()
        return True

    def _keep_alive(self) -> None:
        interval = self.ttl_s / 3
        while not self._stop.wait(interval):
            try:
                self._lock.extend(self.ttl_s, replace_ttl=True)
            except (LockError, RedisError) as exc:
                log.warning("flush lock %s could not be extended: %s", self.name, exc)
                self.lost = True
                return

    def check(self) -> None:
        """Raise LockLostError if the watchdog saw the lock slip away."""
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


def lock_holder(redis: Redis, name: str) -> tuple[str, int] | None:
    """(token, milliseconds left) of whoever holds the lock, or None."""
    pipe = redis.pipeline(transaction=False)
    pipe.get(name)
    pipe.pttl(name)
    token, ttl = pipe.execute()
    if token is None:
        return None
    return text(token), int(ttl)
