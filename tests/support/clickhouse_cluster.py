"""A real ClickHouse cluster on loopback for the tests: ZooKeeper and N x M servers.

`clickhouse_cluster()` starts Debian's ZooKeeper (3.8, one Java process) and
`shards` x `replicas` Debian clickhouse-server 18.16 processes, each in its
own directory with its own ports, the macros `{shard}`/`{replica}` and the
cluster `eventbuffer` in `remote_servers` (`internal_replication` on: a
Distributed insert writes one replica per shard, replication copies it).
Everything is owned by the caller and torn down at the end; a node can be
SIGKILLed and restarted on its data.

`modern_cluster()` starts `shards` chDB servers (ClickHouse 26.x, see
tests/support/chdb_server.py) sharing the same kind of `remote_servers`: chDB has no
Keeper client for Replicated tables and no distributed DDL, so its shards are
plain MergeTree tables with a token dedup window, created host by host.
"""

from __future__ import annotations

import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from clickhouse_driver import Client

from tests.support.native_server import (
    SERVER_CONFIG,
    ChdbServer,
    _answers,
    _log_tail,
    _stop,
    free_port,
    server_binary,
)

CLUSTER = "eventbuffer"
ZOOKEEPER_JAR = Path("/usr/share/java/zookeeper.jar")
# A simple slf4j binding shipped with Debian (zookeeper logs nothing without one).
SLF4J_BINDING = Path("/usr/share/java/slf4j-simple.jar")
USERS_CONFIG = Path(SERVER_CONFIG).with_name("users.xml")


def cluster_unavailable() -> str | None:
    """None when this machine can run the 18.16 cluster; else what is missing."""
    missing = []
    if server_binary() is None or not USERS_CONFIG.is_file():
        missing.append("clickhouse-server (Debian package)")
    if not ZOOKEEPER_JAR.is_file():
        missing.append("zookeeper (Debian package)")
    if shutil.which("java") is None:
        missing.append("java (a JRE, zookeeper's dependency)")
    return f"needs {' and '.join(missing)}" if missing else None


class ZooKeeper:
    """A standalone ZooKeeper on a free loopback port, data in `directory`."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.port = free_port()
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 60.0) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        (self.directory / "zoo.cfg").write_text(
            # Short ticks: sessions of a killed server expire in seconds.
            "tickTime=500\n"
            f"dataDir={self.directory}/data\n"
            f"clientPort={self.port}\n"
            "clientPortAddress=127.0.0.1\n"
            "admin.enableServer=false\n"  # else Jetty listens on 8080
            "4lw.commands.whitelist=srvr\n"
            "maxClientCnxns=0\n"
        )
        (self.directory / "log4j.properties").write_text(
            "log4j.rootLogger=WARN, CONSOLE\n"
            "log4j.appender.CONSOLE=org.apache.log4j.ConsoleAppender\n"
            "log4j.appender.CONSOLE.layout=org.apache.log4j.PatternLayout\n"
            "log4j.appender.CONSOLE.layout.ConversionPattern=%d %p %c{1}: %m%n\n"
        )
        java = shutil.which("java")
        assert java, "java is not installed"
        with open(self.directory / "stdout.log", "wb") as output:
            self.process = subprocess.Popen(
                [
                    java,
                    "-Xmx256m",
                    "-XX:+UseSerialGC",
                    "-XX:TieredStopAtLevel=1",  # starts faster; the load is tiny
                    "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn",
                    f"-Dlog4j.configuration=file:{self.directory}/log4j.properties",
                    "-cp",
                    f"{self.directory}:{ZOOKEEPER_JAR}:{SLF4J_BINDING}",
                    "org.apache.zookeeper.server.quorum.QuorumPeerMain",
                    str(self.directory / "zoo.cfg"),
                ],
                cwd=self.directory,
                stdin=subprocess.DEVNULL,
                stdout=output,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout
        while not self._ok():
            if self.process.poll() is not None:
                raise RuntimeError(f"zookeeper exited with {self.process.returncode}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"zookeeper not ready after {timeout:.0f}s")
            time.sleep(0.1)

    def _ok(self) -> bool:
        # `ruok` says imok before the server takes sessions; `srvr` names the
        # mode only once it serves.
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=1) as sock:
                sock.sendall(b"srvr")
                return b"Mode:" in sock.recv(4096)
        except OSError:
            return False

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process)


@dataclass
class Node:
    """One clickhouse-server 18.16 of the cluster."""

    shard: int
    replica: int
    directory: Path
    tcp_port: int = field(default_factory=free_port)
    http_port: int = field(default_factory=free_port)
    interserver_port: int = field(default_factory=free_port)
    process: subprocess.Popen[bytes] | None = None
    extra_args: tuple[str, ...] = ()

    @property
    def name(self) -> str:
        return f"s{self.shard}r{self.replica}"

    @property
    def url(self) -> str:
        return f"clickhouse://default@127.0.0.1:{self.tcp_port}/default"

    def configure(self, zookeeper_port: int, nodes: Sequence[Node]) -> None:
        self.directory.mkdir(parents=True, exist_ok=True)
        shutil.copy(SERVER_CONFIG, self.directory / "config.xml")
        shutil.copy(USERS_CONFIG, self.directory / "users.xml")
        shards = sorted({node.shard for node in nodes})
        remote = "".join(
            "<shard><internal_replication>true</internal_replication>"
            + "".join(
                f"<replica><host>127.0.0.1</host><port>{node.tcp_port}</port></replica>"
                for node in nodes
                if node.shard == shard
            )
            + "</shard>"
            for shard in shards
        )
        (self.directory / "config.d").mkdir(exist_ok=True)
        (self.directory / "config.d" / "cluster.xml").write_text(
            "<yandex>\n"
            f'  <zookeeper replace="replace"><node><host>127.0.0.1</host>'
            f"<port>{zookeeper_port}</port></node>"
            "<session_timeout_ms>4000</session_timeout_ms></zookeeper>\n"
            f'  <macros replace="replace"><shard>{self.shard:02d}</shard>'
            f"<replica>{self.name}</replica></macros>\n"
            f'  <remote_servers replace="replace"><{CLUSTER}>{remote}</{CLUSTER}>'
            "</remote_servers>\n"
            "  <interserver_http_host>127.0.0.1</interserver_http_host>\n"
            "</yandex>\n"
        )

    def start(self) -> None:
        """Start (or restart, on the same data and ports) without waiting."""
        binary = server_binary()
        assert binary, "clickhouse-server is not installed"
        base = self.directory
        command = [
            binary,
            f"--config-file={base}/config.xml",
            "--",
            f"--path={base}/data/",
            f"--tmp_path={base}/tmp/",
            f"--user_files_path={base}/user_files/",
            f"--format_schema_path={base}/format_schemas/",
            f"--tcp_port={self.tcp_port}",
            f"--http_port={self.http_port}",
            f"--interserver_http_port={self.interserver_port}",
            f"--logger.log={base}/server.log",
            f"--logger.errorlog={base}/server.err.log",
            "--logger.console=0",
            *self.extra_args,
        ]
        with open(base / "stdout.log", "ab") as output:
            self.process = subprocess.Popen(
                command, cwd=base, stdin=subprocess.DEVNULL, stdout=output, stderr=subprocess.STDOUT
            )

    def wait_ready(self, timeout: float = 60.0) -> None:
        """Until the server answers queries and reaches ZooKeeper."""
        assert self.process is not None
        deadline = time.monotonic() + timeout
        while not (_answers(self.tcp_port) and self._sees_zookeeper()):
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.name} exited with {self.process.returncode}:\n"
                    f"{_log_tail(self.directory)}"
                )
            if time.monotonic() > deadline:
                raise TimeoutError(f"{self.name} not ready:\n{_log_tail(self.directory)}")
            time.sleep(0.1)

    def _sees_zookeeper(self) -> bool:
        client = Client("127.0.0.1", port=self.tcp_port, connect_timeout=1, send_receive_timeout=5)
        try:
            client.execute("SELECT count() FROM system.zookeeper WHERE path = '/'")
            return True
        except Exception:  # not connected yet
            return False
        finally:
            client.disconnect()

    def kill(self) -> None:
        """SIGKILL: no shutdown, nothing flushed; the data directory stays."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None:
            _stop(self.process)


@dataclass
class Cluster:
    name: str
    nodes: list[Node]
    zookeeper: ZooKeeper | None
    started_in_s: float

    @property
    def url(self) -> str:
        """The node the tests connect to (shard 1, replica 1)."""
        return self.nodes[0].url

    def node(self, shard: int, replica: int) -> Node:
        return next(n for n in self.nodes if (n.shard, n.replica) == (shard, replica))


@contextmanager
def clickhouse_cluster(shards: int = 2, replicas: int = 2) -> Iterator[Cluster]:
    """ZooKeeper plus shards x replicas clickhouse-server 18.16 on loopback."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="clickhouse-cluster-") as tmp, ExitStack() as stack:
        base = Path(tmp)
        zookeeper = ZooKeeper(base / "zookeeper")
        stack.callback(zookeeper.stop)
        nodes = [
            Node(shard, replica, base / f"s{shard}r{replica}")
            for shard in range(1, shards + 1)
            for replica in range(1, replicas + 1)
        ]
        for node in nodes:
            node.configure(zookeeper.port, nodes)
            stack.callback(node.stop)
        # ZooKeeper first: 18.16's DDL worker crashes the server (a null
        # pointer in zkutil) when ZooKeeper does not answer at start-up.
        zookeeper.start()
        for node in nodes:
            node.start()
        with ThreadPoolExecutor(len(nodes)) as pool:
            list(pool.map(lambda node: node.wait_ready(), nodes))
        yield Cluster(CLUSTER, nodes, zookeeper, time.monotonic() - started)


@contextmanager
def modern_cluster(shards: int = 2) -> Iterator[Cluster]:
    """`shards` chDB servers (ClickHouse 26.x), one replica each, no Keeper."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="chdb-cluster-") as tmp, ExitStack() as stack:
        base = Path(tmp)
        ports = [free_port() for _ in range(shards)]
        remote = "".join(
            f"<shard><replica><host>127.0.0.1</host><port>{port}</port></replica></shard>"
            for port in ports
        )
        servers = []
        for shard, port in enumerate(ports, start=1):
            server = ChdbServer(
                base / f"s{shard}",
                f"    <remote_servers><{CLUSTER}>{remote}</{CLUSTER}></remote_servers>\n",
            )
            server.port = port
            stack.callback(server.stop)
            server.start()
            servers.append(server)
        nodes = [
            Node(shard, 1, server.directory, tcp_port=server.port)
            for shard, server in enumerate(servers, start=1)
        ]
        yield Cluster(CLUSTER, nodes, None, time.monotonic() - started)
