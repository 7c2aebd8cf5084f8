"""Servers the tests and benchmarks start and own, and probes for the ones they may use.

`RedisServer` starts a private redis-server on a free port. Before a test
writes to it (`FLUSHALL` above all), `ensure_ours()` checks that the server
answering on that port is still this process, by its pid and run id: a port
taken by someone else in between (ours failed to bind it) must never be
flushed.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path

import redis as redis_lib

START_S = 10.0


def free_port(host: str = "127.0.0.1") -> int:
    """A port nothing listens on right now (the kernel's pick)."""
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


def port_open(host: str, port: int, timeout: float = 1.0) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def rabbitmq_reachable() -> bool:
    """Is a RabbitMQ broker listening on 127.0.0.1:5672 (guest/guest)?"""
    return port_open("127.0.0.1", 5672)


def docker_reachable() -> bool:
    """Does a Docker engine answer (testcontainers needs one)?"""
    if not shutil.which("docker"):
        return False
    try:
        return subprocess.run(["docker", "info"], capture_output=True, timeout=5).returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False


class NotOurServer(RuntimeError):
    """Something other than this RedisServer's process answers on its port."""


class RedisServer:
    """A redis-server process the tests own: start, SIGKILL, restart on the same data."""

    def __init__(self, directory: Path, *extra: str) -> None:
        self.directory = directory
        self.port = free_port()
        self.extra = extra
        self.process: subprocess.Popen[bytes] | None = None
        self.run_id = ""

    @property
    def url(self) -> str:
        return self.db_url(0)

    def db_url(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def client(self, db: int = 0) -> redis_lib.Redis:
        return redis_lib.Redis(port=self.port, db=db)

    def start(self) -> RedisServer:
        """Start on this server's port (the same one after a kill: its data stays)."""
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = subprocess.Popen(
            [
                binary,
                "--port", str(self.port),
                "--bind", "127.0.0.1",
                "--dir", str(self.directory),
                "--save", "",
                "--appendonly", "no",
                *self.extra,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )  # fmt: skip
        client = self.client()
        deadline = time.monotonic() + START_S
        try:
            while True:
                if self.process.poll() is not None:
                    raise RuntimeError(
                        f"redis-server on port {self.port} exited with {self.process.returncode}"
                    )
                try:
                    info = client.info("server")
                    # INFO answers while the data set is still loading (an AOF after a
                    # kill); other commands get LOADING errors until it is done.
                    if not int(client.info("persistence").get("loading", 0)):
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"redis-server on port {self.port} kept loading")
                    time.sleep(0.02)
                except redis_lib.ConnectionError:
                    if time.monotonic() > deadline:
                        raise RuntimeError(
                            f"redis-server on port {self.port} did not start"
                        ) from None
                    time.sleep(0.02)
        finally:
            client.close()
        if int(info["process_id"]) != self.process.pid:
            self.kill()
            raise NotOurServer(
                f"another Redis (pid {info['process_id']}) answers on port {self.port}"
            )
        self.run_id = str(info["run_id"])
        return self

    def ensure_ours(self) -> None:
        """Raise NotOurServer unless this server's process is alive and is what answers."""
        if self.process is None or self.process.poll() is not None:
            raise NotOurServer(f"the redis-server started on port {self.port} is not running")
        client = self.client()
        try:
            info = client.info("server")
        finally:
            client.close()
        if str(info["run_id"]) != self.run_id or int(info["process_id"]) != self.process.pid:
            raise NotOurServer(f"another Redis answers on port {self.port}")

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()


def start_redis(directory: Path, *extra: str, attempts: int = 3) -> RedisServer:
    """A started RedisServer, on another free port if its first one was taken meanwhile."""
    for attempt in range(attempts):
        server = RedisServer(directory, *extra)
        try:
            return server.start()
        except (NotOurServer, RuntimeError):
            if attempt == attempts - 1:
                raise
    raise AssertionError("unreachable")
