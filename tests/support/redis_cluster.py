"""A real Redis Cluster on loopback for the tests: 3 masters, 3 replicas, owned by the caller.

`redis_cluster()` starts 6 `redis-server --cluster-enabled yes` nodes on free
loopback ports (each with its cluster bus port, port + 10000, free too),
AOF with `appendfsync always`, `--cluster-node-timeout 2000`, joins them with
`redis-cli --cluster create ... --cluster-replicas 1 --cluster-yes` and
waits until every node reports `cluster_state:ok` and agrees on who owns
what. A node can be SIGKILLed and restarted on its data (it rejoins: a
master whose slots were failed over comes back as a replica), a replica can
be made to take its master's slots (`CLUSTER FAILOVER TAKEOVER`), and an
empty slot can be moved to another master. Everything is torn down at the
end. The nodes are `RedisServer`s (tests/support/servers.py): the process
that answers on a port is checked to be ours before anything is written.
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass
from pathlib import Path

import redis as redis_lib

from tests.support.polling import wait_until
from tests.support.servers import RedisServer

NODE_TIMEOUT_MS = 2000
BUS_OFFSET = 10000


def cluster_unavailable() -> str | None:
    """None when this machine can run the cluster; else what is missing."""
    missing = [b for b in ("redis-server", "redis-cli") if shutil.which(b) is None]
    return f"needs {' and '.join(missing)} (apt-get install redis-server)" if missing else None


def _bindable(port: int) -> bool:
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def free_node_port() -> int:
    """A free port whose cluster bus port (port + 10000) is free too."""
    for _ in range(200):
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = int(sock.getsockname()[1])
        if port + BUS_OFFSET <= 65535 and _bindable(port + BUS_OFFSET):
            return port
    raise RuntimeError("no free port pair for a cluster node")


class ClusterNodeServer(RedisServer):
    """One node: a RedisServer with cluster mode on, AOF always, on a port with a free bus port."""

    def __init__(self, directory: Path) -> None:
        super().__init__(
            directory,
            "--cluster-enabled", "yes",
            "--cluster-config-file", "nodes.conf",
            "--cluster-node-timeout", str(NODE_TIMEOUT_MS),
            "--appendonly", "yes",
            "--appendfsync", "always",
            # A replica's full sync starts at once (Redis waits 5 s for more replicas by default).
            "--repl-diskless-sync-delay", "0",
        )  # fmt: skip
        self.port = free_node_port()

    def first_start(self, attempts: int = 5) -> None:
        """Start for the first time. A port pair found free can be taken before
        redis-server binds it (an outgoing connection's port comes from the same
        ephemeral range; a CI run saw a node exit with 1): then another pair is tried,
        in a clean directory."""
        for attempt in range(attempts):
            try:
                self.start()
                return
            except RuntimeError:
                exited = self.process is not None and self.process.poll() is not None
                if not exited or attempt == attempts - 1:
                    raise
                shutil.rmtree(self.directory, ignore_errors=True)
                self.port = free_node_port()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def info(self, section: str) -> dict[str, object]:
        client = self.client()
        try:
            return dict(client.info(section))
        finally:
            client.close()

    def cluster(self, *args: str) -> object:
        client = self.client()
        try:
            return client.execute_command("CLUSTER", *args)
        finally:
            client.close()


@dataclass
class Topology:
    """Who is who, as one node sees it (from CLUSTER NODES)."""

    ids: dict[int, str]  # port -> node id
    masters: dict[int, list[tuple[int, int]]]  # master port -> its slot ranges
    replica_of: dict[int, int]  # replica port -> its master's port
    failed: set[int]


def _text(value: object) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


def read_topology(node: ClusterNodeServer) -> Topology:
    lines = _text(node.cluster("NODES")).strip().splitlines()
    ids: dict[int, str] = {}
    master_ids: dict[str, int] = {}
    rows = []
    for line in lines:
        fields = line.split()
        port = int(fields[1].split("@")[0].rsplit(":", 1)[1])
        ids[port] = fields[0]
        rows.append((port, fields))
        if "master" in fields[2].split(","):
            master_ids[fields[0]] = port
    masters: dict[int, list[tuple[int, int]]] = {}
    replica_of: dict[int, int] = {}
    failed: set[int] = set()
    for port, fields in rows:
        flags = fields[2].split(",")
        if "fail" in flags or "fail?" in flags:
            failed.add(port)
        if "master" in flags:
            ranges = []
            for part in fields[8:]:
                if part.startswith("["):
                    continue  # a slot being migrated or imported
                low, _, high = part.partition("-")
                ranges.append((int(low), int(high or low)))
            masters[port] = ranges
        elif fields[3] in master_ids:
            replica_of[port] = master_ids[fields[3]]
    return Topology(ids, masters, replica_of, failed)


class LoopbackCluster:
    """6 nodes (3 masters, 3 replicas) on loopback; see the module doc."""

    def __init__(self, base: Path, masters: int = 3, replicas: int = 1) -> None:
        self.base = base
        self.nodes = [ClusterNodeServer(base / f"node{n}") for n in range(masters * (1 + replicas))]
        self.replicas = replicas
        self.started_in_s = 0.0

    # -- lifecycle -------------------------------------------------------------

    def start(self, timeout: float = 60.0) -> LoopbackCluster:
        for node in self.nodes:
            node.first_start()
        done = subprocess.run(
            ["redis-cli", "--cluster", "create", *(n.address for n in self.nodes),
             "--cluster-replicas", str(self.replicas), "--cluster-yes"],
            capture_output=True,
            text=True,
            timeout=timeout,
        )  # fmt: skip
        if done.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{done.stdout}\n{done.stderr}")
        self.wait_ok(timeout)
        wanted = len(self.nodes) - len(self.nodes) // (1 + self.replicas)
        wait_until(
            lambda: all(len(read_topology(n).replica_of) == wanted for n in self.nodes),
            timeout,
            "every node to know every replica",
            interval=0.1,
        )
        topology = self.topology()
        for replica, master in topology.replica_of.items():
            self.wait_replica_of(self.node(replica), self.node(master), timeout)
        return self

    def close(self) -> None:
        for node in self.nodes:
            node.kill()

    # -- reading ---------------------------------------------------------------

    @property
    def url(self) -> str:
        """One node's URL: the client discovers the rest."""
        node = next(n for n in self.nodes if n.alive())
        return f"redis://127.0.0.1:{node.port}/0"

    def live(self) -> list[ClusterNodeServer]:
        return [n for n in self.nodes if n.alive()]

    def node(self, port: int) -> ClusterNodeServer:
        return next(n for n in self.nodes if n.port == port)

    def topology(self) -> Topology:
        return read_topology(self.live()[0])

    def master_of_slot(self, slot: int) -> ClusterNodeServer:
        for port, ranges in self.topology().masters.items():
            if any(low <= slot <= high for low, high in ranges):
                return self.node(port)
        raise LookupError(f"no master serves slot {slot}")

    def replicas_of(self, master: ClusterNodeServer) -> list[ClusterNodeServer]:
        topology = self.topology()
        return [self.node(p) for p, m in topology.replica_of.items() if m == master.port]

    def state_ok(self) -> bool:
        """Every live node says cluster_state:ok, and all of them agree on the masters."""
        views = []
        for node in self.live():
            try:
                if _text(node.cluster("INFO")).find("cluster_state:ok") < 0:
                    return False
                topology = read_topology(node)
            except (redis_lib.RedisError, OSError):
                return False
            views.append(sorted((p, r) for p, r in topology.masters.items() if r))
        return all(view == views[0] for view in views)

    def wait_ok(self, timeout: float = 30.0) -> None:
        wait_until(self.state_ok, timeout, "cluster_state:ok on every node", interval=0.1)

    # -- faults ----------------------------------------------------------------

    def kill(self, node: ClusterNodeServer) -> None:
        """SIGKILL: no shutdown; its AOF (appendfsync always) and nodes.conf stay."""
        node.kill()

    def restart(self, node: ClusterNodeServer) -> None:
        """Start a killed node again on its port and data: it rejoins the cluster."""
        node.start()

    def wait_failover(self, dead: ClusterNodeServer, timeout: float = 30.0) -> ClusterNodeServer:
        """Until a replica of `dead` serves its slots; returns the promoted node."""
        before = self._slots_of(dead)

        def promoted() -> ClusterNodeServer | None:
            try:
                topology = self.topology()
            except (redis_lib.RedisError, OSError):
                return None
            for port, ranges in topology.masters.items():
                if port != dead.port and ranges and set(ranges) & before:
                    return self.node(port)
            return None

        wait_until(lambda: promoted() is not None and self.state_ok(), timeout,
                   f"a replica of {dead.address} to take over its slots", interval=0.1)  # fmt: skip
        found = promoted()
        assert found is not None
        return found

    def wait_replica_of(
        self, node: ClusterNodeServer, master: ClusterNodeServer, timeout: float = 30.0
    ) -> None:
        """Until `node` is a replica of `master` with its link up (synchronized)."""

        def synced() -> bool:
            try:
                info = node.info("replication")
            except (redis_lib.RedisError, OSError):
                return False
            return (
                info.get("role") == "slave"
                and int(str(info.get("master_port", 0))) == master.port
                and info.get("master_link_status") == "up"
                and int(str(info.get("master_sync_in_progress", 1))) == 0
            )

        wait_until(synced, timeout, f"{node.address} replicating {master.address}", interval=0.1)

    def take_over(self, replica: ClusterNodeServer, timeout: float = 30.0) -> None:
        """Make `replica` the master of its master's slots without the master's consent."""
        replica.cluster("FAILOVER", "TAKEOVER")
        wait_until(
            lambda: replica.info("replication").get("role") == "master" and self.state_ok(),
            timeout,
            f"{replica.address} to take over",
            interval=0.1,
        )

    def _slots_of(self, node: ClusterNodeServer) -> set[tuple[int, int]]:
        return set(self.topology().masters.get(node.port, []))

    # -- layout ----------------------------------------------------------------

    def move_empty_slot(self, slot: int, target: ClusterNodeServer) -> None:
        """Give an empty slot to another master (CLUSTER SETSLOT, as Redis documents it)."""
        source = self.master_of_slot(slot)
        if source.port == target.port:
            return
        topology = self.topology()
        source_id, target_id = topology.ids[source.port], topology.ids[target.port]
        assert int(_as_int(source.cluster("COUNTKEYSINSLOT", str(slot)))) == 0, "not empty"
        target.cluster("SETSLOT", str(slot), "IMPORTING", source_id)
        source.cluster("SETSLOT", str(slot), "MIGRATING", target_id)
        target.cluster("SETSLOT", str(slot), "NODE", target_id)
        source.cluster("SETSLOT", str(slot), "NODE", target_id)
        for node in self.masters():
            if node.port not in (source.port, target.port):
                node.cluster("SETSLOT", str(slot), "NODE", target_id)
        wait_until(
            lambda: self.master_of_slot(slot).port == target.port and self.state_ok(),
            30,
            f"slot {slot} served by {target.address}",
            interval=0.1,
        )

    def masters(self) -> list[ClusterNodeServer]:
        return [self.node(p) for p, ranges in self.topology().masters.items() if ranges]


def _as_int(value: object) -> int:
    return int(_text(value))


@contextmanager
def redis_cluster(masters: int = 3, replicas: int = 1) -> Iterator[LoopbackCluster]:
    """A started LoopbackCluster in a temporary directory; every node killed at the end."""
    with tempfile.TemporaryDirectory(prefix="redis-cluster-") as tmp, ExitStack() as stack:
        cluster = LoopbackCluster(Path(tmp), masters, replicas)
        stack.callback(cluster.close)
        started = time.monotonic()
        cluster.start()
        cluster.started_in_s = time.monotonic() - started
        yield cluster
