"""A private redis-server (AOF on, `noeviction`) for `eventbuffer run` when REDIS_URL is
local and down."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections import deque
from pathlib import Path
from urllib.parse import unquote, urlsplit

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from worker.cli.common import CliError, mask, one_line
from worker.cli.processes import Signals, Stopped, describe_exit, last_line, stop_process
from worker.settings import Settings

REDIS_START_S = 10.0
REDIS_STOP_S = 10.0
# A private Redis that exits is restarted after 0.25 s, 0.5 s, 1 s, ... unless
# it exited more than MAX_RESTARTS times in RESTART_WINDOW_S: then `run` stops.
RESTART_BACKOFF_S = 0.25
MAX_RESTARTS = 5
RESTART_WINDOW_S = 60.0


def _port_free(host: str, port: int) -> bool:
    """True if a server can listen on `port`: nothing listens there.

    SO_REUSEADDR, as redis-server sets it: connections of a Redis that died
    with clients connected linger on its port (TIME-WAIT, FIN-WAIT) for about
    a minute, and they do not keep a new server from listening there; only a
    live listener does.
    """
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def redis_answers(url: str) -> bool:
    """True if Redis answers PING; False if nothing listens; CliError for other failures."""
    client = Redis.from_url(url, socket_connect_timeout=1, socket_timeout=1)
    try:
        return bool(client.ping())
    except (RedisConnectionError, RedisTimeoutError):
        return False
    except RedisError as exc:
        raise CliError(f"Redis at {mask(url)} answered with an error: {one_line(exc)}") from None
    finally:
        client.close()


class PrivateRedis:
    """redis-server (AOF on, data in data/redis, `maxmemory-policy noeviction`) on REDIS_URL's
    own port.

    It always serves the port REDIS_URL names, where producers look for it:
    `start` refuses a port another program listens on, and `restart` brings a
    Redis that exited back on the same port with its AOF.
    """

    def __init__(self, settings: Settings, data: Path) -> None:
        url = settings.redis_url
        parts = urlsplit(url)
        host = parts.hostname or "127.0.0.1"
        local = host in ("127.0.0.1", "localhost", "::1")
        if parts.scheme != "redis" and local:
            # A local address already: the scheme is what `run` cannot serve.
            raise CliError(
                f"Redis at {mask(url)} is unreachable; `eventbuffer run` starts a private "
                f"redis-server only for a plain redis:// URL, not {parts.scheme}:// (TLS or a "
                "socket): start that Redis yourself, or use redis://127.0.0.1:6379/0"
            )
        if not local:
            raise CliError(
                f"Redis at {mask(url)} is unreachable; start it, or point REDIS_URL at a local "
                "address (e.g. unset it) so that `eventbuffer run` starts a private redis-server"
            )
        binary = shutil.which("redis-server")
        if binary is None:
            raise CliError(
                f"no Redis at {mask(url)} and no redis-server on PATH: install redis-server "
                "(e.g. `apt-get install redis-server`, `brew install redis`) or set REDIS_URL "
                "to a running Redis"
            )
        self.url = url
        self.bind = "::1" if host == "::1" else "127.0.0.1"
        self.port = parts.port or 6379
        directory = (data / "redis").resolve()
        directory.mkdir(parents=True, exist_ok=True)
        self.log = (data / "logs" / "redis.log").resolve()
        # The password (if the URL has one) goes through stdin, not the command line.
        self.password = unquote(parts.password or "")
        command = [binary, "-"] if self.password else [binary]
        command += ["--port", str(self.port), "--bind", self.bind, "--dir", str(directory)]
        command += ["--appendonly", "yes", "--appendfsync", "everysec", "--logfile", str(self.log)]
        # Redis' default, said outright: an evicted key is events lost (worker/redis_memory.py).
        command += ["--maxmemory-policy", "noeviction"]
        self.command = command
        self.process: subprocess.Popen[bytes] | None = None
        self.exits: deque[float] = deque()

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def exited(self) -> bool:
        return self.process is not None and self.process.poll() is not None

    def start(self, signals: Signals) -> None:
        """Start redis-server and wait until it answers; CliError if it cannot."""
        if not _port_free(self.bind, self.port):
            raise CliError(
                f"nothing answers as Redis at {mask(self.url)}, but another program listens on "
                f"port {self.port}; stop it, or set REDIS_URL to a free port (for `run` and "
                "your producers alike)"
            )
        with self.log.open("ab") as out:
            self.process = process = subprocess.Popen(
                self.command,
                stdin=subprocess.PIPE if self.password else subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,  # Ctrl-C reaches us only: we stop Redis last
            )
        if self.password and process.stdin is not None:
            quoted = self.password.replace("\\", "\\\\").replace('"', '\\"')
            process.stdin.write(f'requirepass "{quoted}"\n'.encode())
            process.stdin.close()
        deadline = time.monotonic() + REDIS_START_S
        while not redis_answers(self.url):
            if process.poll() is not None or time.monotonic() > deadline:
                stop_process(process, 1.0)
                raise CliError(
                    f"redis-server did not start: {last_line(self.log)} (log: {self.log})"
                )
            if signals.received:
                stop_process(process, REDIS_STOP_S)
                raise Stopped
            time.sleep(0.05)

    def restart(self, signals: Signals) -> str:
        """Start it again after it exited, backing off; returns why it had exited.

        A start that fails counts as one more exit; past MAX_RESTARTS exits in
        RESTART_WINDOW_S, CliError with the last reason.
        """
        assert self.process is not None
        why = describe_exit(self.process.returncode)
        problem = f"{why}; last log line: {last_line(self.log) or '(none)'} (log: {self.log})"
        while True:
            now = time.monotonic()
            self.exits.append(now)
            while now - self.exits[0] > RESTART_WINDOW_S:
                self.exits.popleft()
            if len(self.exits) > MAX_RESTARTS:
                raise CliError(
                    f"the private redis-server exited {len(self.exits)} times in "
                    f"{RESTART_WINDOW_S:.0f} s, giving up: {problem}"
                )
            if signals.wait(RESTART_BACKOFF_S * 2 ** (len(self.exits) - 1)):
                raise Stopped
            try:
                self.start(signals)
            except CliError as exc:
                problem = str(exc)
                continue
            return why

    def stop(self) -> None:
        if self.process is not None:
            stop_process(self.process, REDIS_STOP_S)  # SIGTERM: Redis syncs the AOF (not forced)
