"""The objects one process needs, built lazily and rebuilt after a fork.

Celery's prefork pool forks workers from a parent that must hold no Redis
connection and no open chDB directory; everything here is created on first
use inside the process that uses it.
"""

from __future__ import annotations

import os
import threading

from worker.buffer import EventBuffer
from worker.flusher import Flusher
from worker.settings import Settings
from worker.sinks import Sink, sink_for
from worker.topology import Client, connect

_lock = threading.RLock()
_settings: Settings | None = None
_redis: Client | None = None
_buffer: EventBuffer | None = None
_flusher: Flusher | None = None


def settings() -> Settings:
    global _settings
    with _lock:
        if _settings is None:
            _settings = Settings.from_env()
        return _settings


def configure(new: Settings) -> None:
    """Use these settings from now on (tests, the CLI)."""
    global _settings
    reset()
    with _lock:
        _settings = new


def redis_client() -> Client:
    """The buffer's Redis: one server, or a Redis Cluster (`EVENT_BUFFER_REDIS_CLUSTER`)."""
    global _redis
    current = settings()
    with _lock:
        if _redis is None:
            _redis = connect(
                current, socket_connect_timeout=5, socket_timeout=30, health_check_interval=30
            )
        return _redis


def buffer() -> EventBuffer:
    global _buffer
    client = redis_client()
    with _lock:
        if _buffer is None:
            _buffer = EventBuffer(client, settings())
        return _buffer


def sink() -> Sink:
    return sink_for(settings())


def flusher() -> Flusher:
    global _flusher
    client = redis_client()
    with _lock:
        if _flusher is None:
            _flusher = Flusher(client, settings(), sink)
        return _flusher


def reset() -> None:
    """Forget every object (after a fork, or when settings change)."""
    global _redis, _buffer, _flusher, _lock
    _lock = threading.RLock()
    if _redis is not None:
        _redis.close()
    _redis = _buffer = _flusher = None


def _after_fork() -> None:
    global _redis, _buffer, _flusher, _lock
    # The parent's sockets belong to the parent: drop them without closing.
    _lock = threading.RLock()
    _redis = _buffer = _flusher = None


os.register_at_fork(after_in_child=_after_fork)
