"""ClickHouse servers for the native-protocol tests.

`local_server()` runs the distribution's `clickhouse-server` binary privately:
its own temp directory, free ports, no root, torn down afterwards. Debian ships
18.16, far older than the `events` schema needs, so it serves the
compatibility tests.

`chdb_server()` runs ClickHouse 26.x from the chDB package as a native-protocol
server (see tests/support/chdb_server.py): a modern server on any machine that has
chDB, which eventbuffer depends on.

`modern_server()` yields the URL of a current server: `CLICKHOUSE_TEST_URL`
if set, else a chDB server, else a testcontainers container when Docker is
reachable, else None.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from clickhouse_driver import Client

from tests.support.servers import free_port

CHDB_RUNNER = Path(__file__).resolve().parent / "chdb_server.py"
# A chDB server stops by itself after this long, should a test run leak it.
CHDB_SERVER_LIFETIME_S = 3600
SERVER_BINARY = "/usr/sbin/clickhouse-server"
SERVER_CONFIG = "/etc/clickhouse-server/config.xml"
MODERN_IMAGE = "clickhouse/clickhouse-server:25.8"


def server_binary() -> str | None:
    """The local clickhouse-server binary, or None when it is not installed."""
    if not Path(SERVER_CONFIG).is_file():
        return None
    found = shutil.which("clickhouse-server")
    if found:
        return found
    return SERVER_BINARY if os.access(SERVER_BINARY, os.X_OK) else None


@contextmanager
def local_server(timeout: float = 30.0, http_port: int | None = None) -> Iterator[str]:
    """Run a private clickhouse-server; yield its `clickhouse://` URL. Its HTTP
    interface listens on `http_port` when given (else on a free port)."""
    binary = server_binary()
    if binary is None:
        raise FileNotFoundError(f"clickhouse-server or {SERVER_CONFIG} is not installed")
    with tempfile.TemporaryDirectory(prefix="clickhouse-test-") as tmp:
        base = Path(tmp)
        tcp_port, interserver_port = free_port(), free_port()
        http_port = http_port or free_port()
        command = [
            binary,
            f"--config-file={SERVER_CONFIG}",
            "--",
            f"--path={base}/data/",
            f"--tmp_path={base}/tmp/",
            f"--user_files_path={base}/user_files/",
            f"--format_schema_path={base}/format_schemas/",
            f"--tcp_port={tcp_port}",
            f"--http_port={http_port}",
            f"--interserver_http_port={interserver_port}",
            f"--logger.log={base}/server.log",
            f"--logger.errorlog={base}/server.err.log",
            "--logger.console=0",
        ]
        with open(base / "stdout.log", "wb") as output:
            process = subprocess.Popen(
                command,
                cwd=base,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        try:
            _wait_until_ready(process, tcp_port, timeout, base)
            yield f"clickhouse://default@127.0.0.1:{tcp_port}/default"
        finally:
            _stop(process)


class ChdbServer:
    """A chDB process serving the native protocol on a free port of 127.0.0.1."""

    def __init__(self, directory: Path, extra_config: str = "") -> None:
        self.directory = directory
        self.port = free_port()
        self.extra_config = extra_config
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"clickhouse://default@127.0.0.1:{self.port}/default"

    def start(self, timeout: float = 60.0) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "config.xml").write_text(
            "<clickhouse>\n"
            "    <listen_host>127.0.0.1</listen_host>\n"
            f"    <tcp_port>{self.port}</tcp_port>\n"
            "    <logger><level>warning</level><console>1</console></logger>\n"
            "    <query_log><database>system</database><table>query_log</table></query_log>\n"
            f"{self.extra_config}"
            "</clickhouse>\n"
        )
        with open(self.directory / "stdout.log", "wb") as output:
            self.process = subprocess.Popen(
                [
                    sys.executable,
                    str(CHDB_RUNNER),
                    str(self.directory),
                    str(CHDB_SERVER_LIFETIME_S),
                ],
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        _wait_until_ready(self.process, self.port, timeout, self.directory, "chDB server")

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process)


@contextmanager
def chdb_server(extra_config: str = "") -> Iterator[str]:
    """Run ClickHouse 26.x from the chDB package; yield its `clickhouse://` URL."""
    with tempfile.TemporaryDirectory(prefix="chdb-server-") as tmp:
        server = ChdbServer(Path(tmp), extra_config)
        try:
            server.start()
            yield server.url
        finally:
            server.stop()


def _wait_until_ready(
    process: subprocess.Popen[bytes],
    port: int,
    timeout: float,
    base: Path,
    what: str = "clickhouse-server",
) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"{what} exited with {process.returncode}:\n{_log_tail(base)}")
        if _answers(port):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} not ready after {timeout:.0f}s:\n{_log_tail(base)}")
        time.sleep(0.1)


def _answers(port: int) -> bool:
    # Probe the port first: clickhouse-driver logs a traceback for every
    # refused connection.
    try:
        socket.create_connection(("127.0.0.1", port), timeout=1).close()
    except OSError:
        return False
    client = Client("127.0.0.1", port=port, connect_timeout=1, send_receive_timeout=5)
    try:
        return bool(client.execute("SELECT 1") == [(1,)])
    except Exception:  # listening but not serving queries yet
        return False
    finally:
        client.disconnect()


def _stop(process: subprocess.Popen[bytes]) -> None:
    if process.poll() is not None:
        return
    process.send_signal(signal.SIGTERM)
    try:
        process.wait(timeout=15)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


def _log_tail(base: Path, lines: int = 30) -> str:
    chunks = []
    for name in ("stdout.log", "server.err.log"):
        path = base / name
        if path.is_file():
            text = path.read_text(errors="replace").splitlines()[-lines:]
            chunks.append(f"--- {name}\n" + "\n".join(text))
    return "\n".join(chunks)


def docker_available() -> bool:
    """Whether a Docker engine answers (quickly) for testcontainers to use."""
    if shutil.which("docker") is None:
        return False
    try:
        result = subprocess.run(["docker", "info"], capture_output=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return result.returncode == 0


def chdb_serves() -> str | None:
    """None if this machine can run a chDB server; else why not."""
    try:
        import chdb
    except ImportError as exc:
        return f"chDB is not installed ({exc})"
    major = int(str(getattr(chdb, "engine_version", "0")).split(".")[0] or 0)
    if major < 26:
        # SYSTEM START LISTEN in clickhouse-local arrived in ClickHouse 26.
        return f"chDB's engine is ClickHouse {chdb.engine_version}, which cannot listen"
    return None


@contextmanager
def modern_server() -> Iterator[str | None]:
    """Yield the URL of a ClickHouse >= 22.2, or None when there is none to use."""
    url = os.environ.get("CLICKHOUSE_TEST_URL")
    if url:
        yield url
        return
    why_not = chdb_serves()
    if why_not is None:
        with chdb_server() as url:
            yield url
        return
    if not docker_available():
        yield None
        return
    try:
        from testcontainers.community.clickhouse import ClickHouseContainer
    except ImportError:  # testcontainers before the community/ split
        from testcontainers.clickhouse import ClickHouseContainer

    with ClickHouseContainer(MODERN_IMAGE) as container:
        # clickhouse://test:test@<host>:<mapped 9000>/test
        yield container.get_connection_url()
