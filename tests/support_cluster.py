"""A real Redis Cluster for tests: six ``redis-server --cluster-enabled yes`` processes on free
loopback ports (three masters, one replica each), joined with ``redis-cli --cluster create``."""

from __future__ import annotations

import os
import random
import shutil
import socket
import subprocess
import tempfile
import time
from typing import Any

from redis import Redis as SyncRedis
from redis.exceptions import RedisError
from support import wait_until


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def cluster_port(taken: list[int]) -> int:
    """A free port whose cluster bus port (port + 10000) is free too: below 55536."""
    for _ in range(1000):
        port = random.randrange(20000, 50000)
        if port not in taken and _bindable(port) and _bindable(port + 10000):
            return port
    raise RuntimeError("no free port pair for a cluster node")


def ask(port: int, *words: Any) -> Any:
    """One command to the node on ``port`` (a fresh connection, 2 s timeouts)."""
    with SyncRedis(port=port, socket_timeout=2, socket_connect_timeout=2, decode_responses=True) as client:
        return client.execute_command(*words)


class ClusterSet:
    """Three masters and three replicas, no persistence (a replica has the master's writes by
    replication only). ``stop()`` ends every process it started."""

    def __init__(self, node_timeout_ms: int = 2000) -> None:
        self.binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.cli = shutil.which("redis-cli") or "/usr/bin/redis-cli"
        if not os.path.exists(self.binary):
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.node_timeout_ms = node_timeout_ms
        self.dir = tempfile.mkdtemp(prefix="notifier-cluster-")
        self.ports: list[int] = []
        for _ in range(6):
            self.ports.append(cluster_port(self.ports))
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        return "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in self.ports[:3])

    def start(self) -> ClusterSet:
        for port in self.ports:
            self.procs[port] = self._spawn(port)
        for port in self.ports:
            wait_until(lambda p=port: self._ping(p), 10, f"redis on port {port}")
        subprocess.run(
            [self.cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.ports),
             "--cluster-replicas", "1", "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60,
        )  # fmt: skip
        wait_until(self.healthy, 30, "the cluster to be ok with a replica per master")
        return self

    def _spawn(self, port: int) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            [self.binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no", "--dir", self.dir, "--cluster-enabled", "yes",
             "--cluster-config-file", f"nodes-{port}.conf",
             "--cluster-node-timeout", str(self.node_timeout_ms)],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )  # fmt: skip

    def _ping(self, port: int) -> bool:
        try:
            return bool(ask(port, "PING"))
        except RedisError:
            return False

    def healthy(self) -> bool:
        """Every running node says cluster_state:ok, three masters each with a synced replica."""
        try:
            for port in self.running_ports():
                if "cluster_state:ok" not in ask(port, "CLUSTER", "INFO"):
                    return False
            masters = self.masters()
            if len(masters) != 3:
                return False
            for port in self.running_ports():
                info = ask(port, "INFO", "replication")
                if info["role"] == "slave" and info["master_link_status"] != "up":
                    return False
            return all(ask(m, "INFO", "replication")["connected_slaves"] >= 1 for m in masters)
        except RedisError:
            return False

    def running_ports(self) -> list[int]:
        return [port for port, proc in self.procs.items() if proc.poll() is None]

    def masters(self) -> list[int]:
        return sorted(p for p in self.running_ports() if ask(p, "INFO", "replication")["role"] == "master")

    def owner(self, key: str) -> int:
        """The port of the master owning ``key``'s slot."""
        slot = int(ask(self.running_ports()[0], "CLUSTER", "KEYSLOT", key))
        for start, end, master, *_replicas in ask(self.running_ports()[0], "CLUSTER", "SLOTS"):
            if start <= slot <= end:
                return int(master[1])
        raise LookupError(key)

    def replica_of(self, master: int) -> int:
        for port in self.running_ports():
            info = ask(port, "INFO", "replication")
            if info["role"] == "slave" and int(info["master_port"]) == master:
                return port
        raise LookupError(master)

    def failover(self, master: int) -> int:
        """``CLUSTER FAILOVER`` on ``master``'s replica (a coordinated failover: the master still
        runs and becomes its replica); returns the promoted replica's port once it is master."""
        replica = self.replica_of(master)
        ask(replica, "CLUSTER", "FAILOVER")
        wait_until(lambda: ask(replica, "INFO", "replication")["role"] == "master", 15, "the promotion")
        wait_until(self.healthy, 30, "the cluster to settle after the failover")
        return replica

    def kill_master(self, master: int) -> tuple[int, float]:
        """SIGKILL ``master``'s process (no coordination: its replica is promoted by the cluster
        once ``node_timeout_ms`` has passed without an answer); returns the replica's port and
        the seconds from the kill to its promotion."""
        replica = self.replica_of(master)
        killed = time.monotonic()
        self.procs[master].kill()
        self.procs[master].wait(10)
        wait_until(
            lambda: ask(replica, "INFO", "replication")["role"] == "master",
            30 + self.node_timeout_ms / 1000,
            "the replica's promotion after the master was killed",
        )
        return replica, time.monotonic() - killed

    def restart(self, port: int) -> None:
        """Start the node on ``port`` again with its own nodes.conf (no data: no persistence); a
        master replaced meanwhile rejoins as its replacement's replica. Returns once the cluster
        has three masters each with a synced replica again."""
        assert self.procs[port].poll() is not None, "the node still runs"
        self.procs[port] = self._spawn(port)
        wait_until(lambda: self._ping(port), 10, f"redis on port {port} again")
        wait_until(self.healthy, 60, "the cluster to be ok with a replica per master again")

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 10
        for proc in self.procs.values():
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)
