"""A private redis-server (AOF on) for `eventbuffer run` when REDIS_URL is local and down."""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from pathlib import Path
from urllib.parse import unquote, urlsplit

from redis import Redis
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import RedisError
from redis.exceptions import TimeoutError as RedisTimeoutError

from worker.cli.common import CliError, mask, one_line
from worker.cli.processes import Signals, Stopped, last_line, stop_process
from worker.settings import Settings

REDIS_START_S = 10.0
REDIS_STOP_S = 10.0


def _socket(host: str) -> socket.socket:
    return socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)


def _port_free(host: str, port: int) -> bool:
    with _socket(host) as sock:
        try:
            sock.bind((host, port))
        except OSError:
            return False
        return True


def _free_port(host: str) -> int:
    with _socket(host) as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


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


def start_private_redis(
    settings: Settings, data: Path, signals: Signals
) -> tuple[str, subprocess.Popen[bytes]]:
    """Start redis-server (AOF on) for an unreachable local REDIS_URL; returns (url, process)."""
    url = settings.redis_url
    parts = urlsplit(url)
    host = parts.hostname or "127.0.0.1"
    if parts.scheme != "redis" or host not in ("127.0.0.1", "localhost", "::1"):
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
    bind = "::1" if host == "::1" else "127.0.0.1"
    port = parts.port or 6379
    if not _port_free(bind, port):
        port = _free_port(bind)
    userinfo = parts.netloc.rpartition("@")[0]
    netloc = (userinfo + "@" if userinfo else "") + (f"[{host}]" if ":" in host else host)
    url = parts._replace(netloc=f"{netloc}:{port}").geturl()

    directory = (data / "redis").resolve()
    directory.mkdir(parents=True, exist_ok=True)
    log = (data / "logs" / "redis.log").resolve()
    # The password (if the URL has one) goes through stdin, not the command line.
    password = unquote(parts.password or "")
    command = [binary, "-"] if password else [binary]
    command += ["--port", str(port), "--bind", bind, "--dir", str(directory)]
    command += ["--appendonly", "yes", "--appendfsync", "everysec", "--logfile", str(log)]
    with log.open("ab") as out:
        process = subprocess.Popen(
            command,
            stdin=subprocess.PIPE if password else subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # Ctrl-C reaches us only: we stop Redis last
        )
    if password and process.stdin is not None:
        quoted = password.replace("\\", "\\\\").replace('"', '\\"')
        process.stdin.write(f'requirepass "{quoted}"\n'.encode())
        process.stdin.close()
    deadline = time.monotonic() + REDIS_START_S
    while not redis_answers(url):
        if process.poll() is not None or time.monotonic() > deadline:
            stop_process(process, 1.0)
            raise CliError(f"redis-server did not start: {last_line(log)} (log: {log})")
        if signals.received:
            stop_process(process, REDIS_STOP_S)
            raise Stopped
        time.sleep(0.05)
    return url, process
