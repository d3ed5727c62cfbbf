"""The deployment: ``deploy/local-cluster`` (real redis-server, nginx and three instances), and the
docker-compose, Prometheus and Grafana files."""

from __future__ import annotations

import asyncio
import json
import os
import queue
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx
import jwt
import pytest
import yaml
from support import ROOT, free_port, wait_until
from websockets.asyncio.client import ClientConnection, connect

LOCAL_CLUSTER = ROOT / "deploy" / "local-cluster"
COMPOSE_FILE = ROOT / "docker-compose.yml"
PROMETHEUS_FILE = ROOT / "deploy" / "prometheus.yml"
GRAFANA = ROOT / "deploy" / "grafana"
SECRET = "deploy-test-secret-0123456789abcdef0123456789abcdef"
START_TIMEOUT = 60.0
STOP_TIMEOUT = 40.0
CLIENTS = 30
# Per instance, so that test_full_instance_refusal_goes_to_the_next_instance can fill one.
MAX_CONNECTIONS = 15
LINE = re.compile(
    r"^(redis|redis-master|redis-replica|sentinel|instance|nginx|prometheus): (\S+) \(pid (\d+)\)$"
)
SERVICES = {"redis", "notifier1", "notifier2", "notifier3", "nginx", "prometheus", "grafana"}
CLUSTER_COMPOSE_FILE = ROOT / "deploy" / "docker-compose.cluster.yml"
REDIS_NODES = {f"redis-{n}" for n in range(1, 7)}
CLUSTER_SERVICES = (SERVICES - {"redis"}) | REDIS_NODES | {"redis-cluster-init"}


def token(sub: str, scope: str = "subscribe publish") -> str:
    return jwt.encode({"sub": sub, "scope": scope, "exp": int(time.time()) + 3600}, SECRET, algorithm="HS256")


# -- running deploy/local-cluster ------------------------------------------------------------


@dataclass
class Cluster:
    """A running ``deploy/local-cluster`` and what it printed."""

    proc: subprocess.Popen[str]
    stderr: IO[str]
    lines: queue.Queue[str | None] = field(default_factory=queue.Queue)
    url: str = ""
    instances: list[str] = field(default_factory=list)
    pids: dict[int, str] = field(default_factory=dict)
    ports: list[int] = field(default_factory=list)
    logs: Path | None = None
    printed: list[str] = field(default_factory=list)  # every stdout line parsed so far
    broker: str = ""  # the URL on the one `redis:` line: what the instances use

    def errors(self) -> str:
        return Path(self.stderr.name).read_text(errors="replace")

    @contextmanager
    def explained(self) -> Iterator[None]:
        """On failure, add the end of every process's log to the error."""
        try:
            yield
        except BaseException as exc:
            for log in sorted(self.logs.glob("*.log")) if self.logs and self.logs.exists() else []:
                tail = log.read_text(errors="replace").splitlines()[-15:]
                exc.add_note(f"--- {log.name}\n" + "\n".join(tail))
            raise

    def read_until_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            try:
                line = self.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                message = f"no `ready:` line in {START_TIMEOUT}s; stderr:\n{self.errors()}"
                raise TimeoutError(message) from None
            if line is None:
                self.proc.wait(STOP_TIMEOUT)
                raise AssertionError(f"local-cluster exited ({self.proc.returncode}) before `ready:`:\n"
                                     f"{self.errors()}")
            self.parse(line)
            if line.startswith("ready: "):
                self.url = line.removeprefix("ready: ")
                return

    def parse(self, line: str) -> None:
        self.printed.append(line)
        if line.startswith("logs: "):
            self.logs = Path(line.split()[1])
        if line.startswith("redis: "):
            self.broker = line.split()[1]
        match = LINE.match(line)
        if match is None:
            return
        kind, url, pid = match.groups()
        self.pids[int(pid)] = kind
        self.ports.append(int(url.rsplit(":", 1)[1].split("/")[0]))
        if kind == "instance":
            self.instances.append(url)

    def drain_lines(self) -> None:
        while True:
            try:
                line = self.lines.get(timeout=STOP_TIMEOUT)
            except queue.Empty:
                return
            if line is None:
                return
            self.parse(line)


def start_cluster(
    tmp: Path, instances: int, env: dict[str, str | None] | None = None, ready: bool = True, *args: str
) -> Cluster:
    """``deploy/local-cluster --instances N ARGS`` on a free port; by default, once it printed ``ready:``.
    ``env`` adds to its environment; a ``None`` value removes that variable."""
    stderr = open(tmp / "local-cluster.err", "w")  # closed by stop_cluster
    environment: dict[str, str | None] = {
        **os.environ, "NOTIFIER_JWT_SECRET": SECRET, "NOTIFIER_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
        **(env or {}),
    }
    proc = subprocess.Popen(
        [sys.executable, str(LOCAL_CLUSTER), "--instances", str(instances), "--port", str(free_port()),
         *args],
        cwd=ROOT,
        env={name: value for name, value in environment.items() if value is not None},
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=stderr,
        text=True,
        start_new_session=True,
    )
    cluster = Cluster(proc, stderr)
    assert proc.stdout is not None
    stdout = proc.stdout

    def read() -> None:
        for line in stdout:
            cluster.lines.put(line.rstrip("\n"))
        cluster.lines.put(None)

    threading.Thread(target=read, daemon=True).start()
    if ready:
        try:
            cluster.read_until_ready()
        except BaseException:
            stop_cluster(cluster)
            raise
    return cluster


def stop_cluster(cluster: Cluster, signum: int = signal.SIGTERM) -> int:
    """Signal local-cluster, wait for it with a deadline; kill whatever it left behind."""
    proc = cluster.proc
    try:
        if proc.poll() is None:
            os.kill(proc.pid, signum)
            try:
                proc.wait(STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        cluster.drain_lines()
    finally:
        for pid in leftover_processes(cluster.pids):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        if proc.stdout is not None:
            proc.stdout.close()
        cluster.stderr.close()
    return proc.returncode


def leftover_processes(groups: dict[int, str]) -> list[int]:
    """Live processes in the process groups local-cluster created (their leaders' pids)."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        state, _ppid, pgrp = text.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) in groups and state != "Z":
            found.append(int(stat.parent.name))
    return found


def port_open(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    running = start_cluster(tmp_path_factory.mktemp("cluster"), 3)
    try:
        yield running
    finally:
        stop_cluster(running)


def http() -> httpx.AsyncClient:
    return httpx.AsyncClient(trust_env=False, timeout=10)


def metric(instance: str, name: str) -> float:
    text = httpx.get(instance + "/metrics", timeout=5, trust_env=False).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    return 0.0


def metrics(cluster: Cluster, name: str) -> list[float]:
    return [metric(instance, name) for instance in cluster.instances]


async def open_client(url: str, sub: str, topics: str | None = "news") -> ClientConnection:
    ws_url = url.replace("http://", "ws://", 1) + f"/v1/ws?token={token(sub, 'subscribe')}"
    ws = await connect(ws_url + (f"&topics={topics}" if topics else ""), proxy=None, open_timeout=10)
    try:
        async with asyncio.timeout(10):
            hello = json.loads(await ws.recv())
    except TimeoutError:
        await ws.close()
        raise AssertionError(f"{sub}: no hello within 10 s of the handshake through {url}") from None
    assert hello["type"] == "hello", hello
    return ws


@asynccontextmanager
async def client(url: str, sub: str, topics: str | None = "news") -> AsyncIterator[ClientConnection]:
    ws = await open_client(url, sub, topics)
    try:
        yield ws
    finally:
        await ws.close()


@asynccontextmanager
async def open_many(
    url: str, prefix: str, n: int, together: bool = True
) -> AsyncIterator[list[ClientConnection]]:
    """``n`` clients of users ``prefix0``... on topic ``news``, opened all at once or one by one;
    all closed on the way out, whatever happened."""
    async with AsyncExitStack() as stack:
        if together:
            async with asyncio.TaskGroup() as group:
                tasks = [group.create_task(stack.enter_async_context(client(url, f"{prefix}{i}")))
                         for i in range(n)]
            clients = [task.result() for task in tasks]
        else:
            clients = [await stack.enter_async_context(client(url, f"{prefix}{i}")) for i in range(n)]
        yield clients


async def received_before(ws: ClientConnection, sentinel: str) -> list[str]:
    """Ids of the notifications ``ws`` receives before the one with id ``sentinel``."""
    ids: list[str] = []
    while True:
        frame = json.loads(await ws.recv())
        if frame["type"] != "notification":
            continue
        if frame["id"] == sentinel:
            return ids
        ids.append(frame["id"])


async def post(client: httpx.AsyncClient, url: str, topic: str, data: object) -> str:
    response = await client.post(
        url + "/v1/notifications",
        json={"topic": topic, "data": data},
        headers={"Authorization": f"Bearer {token('backend', 'publish')}"},
    )
    assert response.status_code == 202, response.text
    notification_id: str = response.json()["id"]
    return notification_id


# -- the local cluster: traffic through nginx -------------------------------------------------


@pytest.fixture
def idle(cluster: Cluster) -> Cluster:
    """The module's cluster once the sockets of earlier tests are gone from every instance."""
    wait_until(lambda: sum(metrics(cluster, "notifier_connections")) == 0, 10, "no open connection")
    return cluster


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.anyio
async def test_clients_through_nginx_spread_over_instances(idle: Cluster) -> None:
    with idle.explained():
        async with asyncio.timeout(30), open_many(idle.url, "user", CLIENTS):
            wait_until(lambda: sum(metrics(idle, "notifier_connections")) == CLIENTS, 10,
                       f"the instances to count {CLIENTS} connections")
            per_instance = metrics(idle, "notifier_connections")
    assert sum(1 for n in per_instance if n > 0) > 1, per_instance


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.anyio
async def test_notifications_posted_anywhere_reach_every_subscriber_once(idle: Cluster) -> None:
    delivered = sum(metrics(idle, "notifier_notifications_delivered_total"))
    with idle.explained():
        async with asyncio.timeout(30), open_many(idle.url, "reader", CLIENTS) as clients, http() as client:
            # Through nginx, wherever it sends each POST, then once on every instance directly.
            posted = [await post(client, idle.url, "news", {"n": n}) for n in range(6)]
            posted += [await post(client, url, "news", {"via": url}) for url in idle.instances]
            sentinel = await post(client, idle.url, "news", "last")
            # One topic reaches each subscriber in id order, so what comes before the sentinel is
            # all it will get of the others: each must be there exactly once.
            received = await asyncio.gather(*(received_before(ws, sentinel) for ws in clients))
    assert [int(i) for i in posted] == sorted(int(i) for i in posted)
    assert received == [posted] * CLIENTS
    expected = delivered + CLIENTS * (len(posted) + 1)
    wait_until(lambda: sum(metrics(idle, "notifier_notifications_delivered_total")) == expected, 10,
               "notifier_notifications_delivered_total to count every frame")


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.anyio
async def test_user_topic_reaches_the_user_on_every_instance(idle: Cluster) -> None:
    with idle.explained():
        async with asyncio.timeout(30), AsyncExitStack() as stack:
            # One socket of alice on each instance for sure, and three more wherever nginx puts them.
            alice = [await stack.enter_async_context(client(url, "alice", None)) for url in idle.instances]
            alice += [await stack.enter_async_context(client(idle.url, "alice", None)) for _ in range(3)]
            bob = await stack.enter_async_context(client(idle.url, "bob", None))
            async with http() as publisher:
                for_alice = await post(publisher, idle.url, "user:alice", {"hello": "alice"})
                alice_sentinel = await post(publisher, idle.url, "user:alice", "last")
                bob_sentinel = await post(publisher, idle.url, "user:bob", "last")
            received = await asyncio.gather(*(received_before(ws, alice_sentinel) for ws in alice))
            bob_received = await received_before(bob, bob_sentinel)
    assert received == [[for_alice]] * len(alice)
    assert bob_received == []


@pytest.mark.slow
@pytest.mark.redis
def test_nginx_serves_the_api_but_not_metrics(cluster: Cluster) -> None:
    with httpx.Client(trust_env=False, timeout=5) as client:
        assert client.get(cluster.url + "/metrics").status_code == 404
        assert client.get(cluster.url + "/metrics?format=text").status_code == 404
        assert client.get(cluster.url + "/healthz").status_code == 200
        assert client.get(cluster.url + "/readyz").status_code == 200
        assert "notifier_connections" in client.get(cluster.instances[0] + "/metrics").text


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.anyio
async def test_full_instance_refusal_goes_to_the_next_instance(idle: Cluster) -> None:
    # Afterwards nginx leaves the full instance out for its fail_timeout (10 s): the other tests
    # on this cluster hold whichever instances get their sockets.
    with idle.explained():
        full = idle.instances[0]
        async with asyncio.timeout(30), open_many(full, "filler", MAX_CONNECTIONS, together=False):
            # nginx does not see those sockets: to least_conn the full instance looks the emptiest,
            # so it is tried, answers 503, and nginx hands the handshake to the next one.
            async with open_many(idle.url, "late", 6, together=False):
                pass
        assert idle.logs is not None
        log = idle.logs / "nginx.log"
        wait_until(lambda: "upstream_status=503, 101" in log.read_text(), 10,
                   "nginx's log to show a handshake retried after a 503")


@pytest.mark.slow
@pytest.mark.redis
def test_nginx_reaches_the_instances_over_unix_sockets_unless_told_tcp(
    cluster: Cluster, tmp_path: Path
) -> None:
    def upstreams(running: Cluster) -> set[str]:
        """The upstream address of each request nginx logged, after a few requests through it."""
        assert running.logs is not None
        with httpx.Client(trust_env=False, timeout=5) as client:
            for _ in range(6):
                assert client.get(running.url + "/readyz").status_code == 200
        log = running.logs / "nginx.log"
        wait_until(lambda: log.read_text().count("GET /readyz") >= 6, 10, "nginx to log the requests")
        # $upstream_addr lists every instance tried: "a, b" after a retry.
        fields = re.findall(r"upstream=(.*?) upstream_status=", log.read_text())
        # "-": nginx answered itself (its 404 for /metrics).
        return {address for field in fields for address in field.split(", ") if address != "-"}

    with cluster.explained():
        by_default = upstreams(cluster)
        assert by_default, "nginx logged no upstream"
        assert all(u.startswith("unix:") and u.endswith(".sock") for u in by_default), by_default
    tcp = start_cluster(tmp_path, 2, None, True, "--upstream", "tcp")
    try:
        with tcp.explained():
            over_tcp = upstreams(tcp)
            assert over_tcp and over_tcp <= {url.removeprefix("http://") for url in tcp.instances}, over_tcp
    finally:
        assert stop_cluster(tcp) == 0, tcp.errors()


# -- the local cluster: starting and stopping --------------------------------------------------


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_local_cluster_stops_everything_on_signal(signum: int, tmp_path: Path) -> None:
    cluster = start_cluster(tmp_path, 2)
    kinds = sorted(cluster.pids.values())
    assert kinds == ["instance", "instance", "nginx", "redis"], cluster.pids
    assert all(port_open(port) for port in cluster.ports)
    assert cluster.logs is not None and cluster.logs.exists()

    status = stop_cluster(cluster, signum)

    assert status == 0, cluster.errors()
    assert leftover_processes(cluster.pids) == []
    assert not any(port_open(port) for port in cluster.ports)
    assert not cluster.logs.exists()


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.anyio
async def test_local_cluster_with_sentinel_prints_its_url_and_serves_through_nginx(tmp_path: Path) -> None:
    """``--redis sentinel``: a master, a replica and three sentinels; one ``redis:`` line names
    the ``redis+sentinel://`` URL the instances use; a notification goes end to end through nginx;
    SIGTERM stops every process it started."""
    cluster = await asyncio.to_thread(start_cluster, tmp_path, 2, None, True, "--redis", "sentinel")
    try:
        with cluster.explained():
            redis_lines = [line for line in cluster.printed if line.startswith("redis: ")]
            assert redis_lines == [f"redis: {cluster.broker}"], cluster.printed
            assert cluster.broker.startswith("redis+sentinel://") and cluster.broker.endswith("/notifier/0")
            assert sorted(cluster.pids.values()) == [
                "instance", "instance", "nginx", "redis-master", "redis-replica", "sentinel", "sentinel",
                "sentinel",
            ], cluster.pids
            async with asyncio.timeout(30), client(cluster.url, "sentinel-reader") as ws, http() as poster:
                sent = await post(poster, cluster.url, "news", {"via": "sentinel"})
                last = await post(poster, cluster.url, "news", "last")
                assert await received_before(ws, last) == [sent]
    finally:
        status = await asyncio.to_thread(stop_cluster, cluster)
    assert status == 0, cluster.errors()
    assert leftover_processes(cluster.pids) == []
    assert not any(port_open(port) for port in cluster.ports)


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.anyio
async def test_local_cluster_with_redis_cluster_prints_its_url_and_serves(tmp_path: Path) -> None:
    """``--redis cluster``: six cluster-enabled redis-servers (three masters, one replica each);
    one ``redis:`` line names the ``redis+cluster://`` URL of the masters, which the instances
    use; a notification goes end to end through nginx; SIGTERM stops every process it started."""
    cluster = await asyncio.to_thread(start_cluster, tmp_path, 2, None, True, "--redis", "cluster")
    try:
        with cluster.explained():
            redis_lines = [line for line in cluster.printed if line.startswith("redis: ")]
            assert redis_lines == [f"redis: {cluster.broker}"], cluster.printed
            assert sorted(cluster.pids.values()) == [
                "instance", "instance", "nginx", *["redis-master"] * 3, *["redis-replica"] * 3,
            ], cluster.pids
            masters = [line.split()[1] for line in cluster.printed if line.startswith("redis-master: ")]
            assert cluster.broker == "redis+cluster://" + ",".join(
                m.removeprefix("redis://") for m in masters
            ), cluster.printed
            nodes = [port for port, kind in zip(cluster.ports, cluster.pids.values(), strict=True)
                     if kind.startswith("redis-")]
            assert len(nodes) == 6 and all(port < 55536 and port_open(port + 10000) for port in nodes)
            async with asyncio.timeout(30), client(cluster.url, "cluster-reader") as ws, http() as poster:
                sent = await post(poster, cluster.url, "news", {"via": "cluster"})
                last = await post(poster, cluster.url, "news", "last")
                assert await received_before(ws, last) == [sent]
    finally:
        status = await asyncio.to_thread(stop_cluster, cluster)
    assert status == 0, cluster.errors()
    assert leftover_processes(cluster.pids) == []
    assert not any(port_open(port) for port in cluster.ports)
    assert cluster.logs is not None and not cluster.logs.exists()


def test_local_cluster_redis_cluster_refuses_a_port_without_room_for_its_bus() -> None:
    done = subprocess.run(
        [sys.executable, str(LOCAL_CLUSTER), "--redis", "cluster", "--redis-port", "60000"],
        cwd=ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode == 2
    assert "--redis-port: with --redis cluster, must be below 55536" in done.stderr, done.stderr
    assert done.stdout == ""


@pytest.mark.slow
@pytest.mark.redis
def test_local_cluster_stops_everything_when_an_instance_dies(tmp_path: Path) -> None:
    cluster = start_cluster(tmp_path, 2, env={"NOTIFIER_MAX_CONNECTIONS": "0"}, ready=False)
    try:
        cluster.proc.wait(START_TIMEOUT)
    finally:
        stop_cluster(cluster)
    assert cluster.proc.returncode == 1
    errors = cluster.errors()
    assert "local-cluster: error: instance" in errors and "NOTIFIER_MAX_CONNECTIONS" in errors, errors
    assert "redis" in cluster.pids.values()
    assert leftover_processes(cluster.pids) == []


@pytest.mark.slow
@pytest.mark.redis
@pytest.mark.anyio
async def test_local_cluster_without_a_secret_prints_a_dev_token_that_works(tmp_path: Path) -> None:
    cluster = start_cluster(tmp_path, 1, env={"NOTIFIER_JWT_SECRET": None}, ready=False)
    try:
        # `dev token:` and `demo:` come before anything is started, so before `ready:`.
        printed: dict[str, str] = {}
        deadline = time.monotonic() + START_TIMEOUT
        while "demo" not in printed:
            try:
                line = cluster.lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise TimeoutError(f"no `dev token:` and `demo:` lines in {START_TIMEOUT}s; "
                                   f"stderr:\n{cluster.errors()}") from None
            assert line is not None, f"local-cluster exited before `ready:`:\n{cluster.errors()}"
            cluster.parse(line)
            assert not line.startswith("ready: "), f"`ready:` before the dev token and demo URL: {printed}"
            for key in ("dev token", "demo"):
                if line.startswith(key + ": "):
                    printed[key] = line.removeprefix(key + ": ")
        cluster.read_until_ready()
        dev_token = printed["dev token"]
        assert printed["demo"] == f"{cluster.url}/#token={dev_token}"
        assert "NOTIFIER_JWT_SECRET is not set" in cluster.errors()

        claims = jwt.decode(dev_token, options={"verify_signature": False})
        assert isinstance(claims.get("exp"), int) and claims["exp"] > time.time() + 3600, claims
        assert set(claims["scope"].split()) >= {"subscribe", "publish"}, claims

        with cluster.explained():
            # The instances accept it, through nginx: a publish, and a socket that gets its hello.
            async with http() as client:
                response = await client.post(
                    cluster.url + "/v1/notifications",
                    json={"topic": "news", "data": "with the dev token"},
                    headers={"Authorization": f"Bearer {dev_token}"},
                )
            assert response.status_code == 202, response.text
            ws_url = cluster.url.replace("http://", "ws://", 1) + f"/v1/ws?token={dev_token}"
            async with asyncio.timeout(10), connect(ws_url, proxy=None, open_timeout=10) as ws:
                hello = json.loads(await ws.recv())
            assert hello["type"] == "hello" and hello["user"] == claims["sub"], hello
    finally:
        status = stop_cluster(cluster)
    assert status == 0, cluster.errors()
    assert leftover_processes(cluster.pids) == []


def test_local_cluster_says_what_to_install() -> None:
    result = subprocess.run(
        [sys.executable, str(LOCAL_CLUSTER), "--port", str(free_port()), "--nginx", "/nonexistent/nginx"],
        env={**os.environ, "NOTIFIER_JWT_SECRET": SECRET},
        capture_output=True, text=True, timeout=30,
    )
    assert result.returncode != 0
    assert result.stdout == ""
    assert result.stderr.count("\n") == 1 and "apt-get install nginx" in result.stderr, result.stderr
    assert os.access(LOCAL_CLUSTER, os.X_OK)
    assert LOCAL_CLUSTER.read_text().startswith("#!/usr/bin/env python3\n")


# -- docker-compose, Prometheus, Grafana -----------------------------------------------------


def compose_file() -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(COMPOSE_FILE.read_text())
    return loaded


def test_compose_config_validates_and_needs_the_secret(tmp_path: Path) -> None:
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    env_file = tmp_path / "empty.env"  # keep a developer's .env out of it
    env_file.write_text("")
    command = [compose, "--env-file", str(env_file), "-f", str(COMPOSE_FILE), "config"]
    env = {k: v for k, v in os.environ.items() if k != "NOTIFIER_JWT_SECRET"}

    without = subprocess.run([*command, "-q"], env=env, capture_output=True, text=True, timeout=60)
    assert without.returncode != 0 and "NOTIFIER_JWT_SECRET" in without.stderr, without.stderr

    env["NOTIFIER_JWT_SECRET"] = SECRET
    valid = subprocess.run([*command, "-q"], env=env, capture_output=True, text=True, timeout=60)
    assert valid.returncode == 0, valid.stderr
    services = subprocess.run([*command, "--services"], env=env, capture_output=True, text=True, timeout=60)
    assert set(services.stdout.split()) == SERVICES


def test_cluster_compose_config_validates_and_needs_the_secret(tmp_path: Path) -> None:
    compose = shutil.which("docker-compose")
    if compose is None:
        pytest.skip("docker-compose is not installed (apt-get install docker-compose)")
    env_file = tmp_path / "empty.env"  # keep a developer's .env out of it
    env_file.write_text("")
    command = [compose, "--env-file", str(env_file), "-f", str(CLUSTER_COMPOSE_FILE), "config"]
    env = {k: v for k, v in os.environ.items() if k != "NOTIFIER_JWT_SECRET"}

    without = subprocess.run([*command, "-q"], env=env, capture_output=True, text=True, timeout=60)
    assert without.returncode != 0 and "NOTIFIER_JWT_SECRET" in without.stderr, without.stderr

    env["NOTIFIER_JWT_SECRET"] = SECRET
    valid = subprocess.run(command, env=env, capture_output=True, text=True, timeout=60)
    assert valid.returncode == 0, valid.stderr
    services = subprocess.run([*command, "--services"], env=env, capture_output=True, text=True, timeout=60)
    assert set(services.stdout.split()) == CLUSTER_SERVICES
    # Paths are relative to deploy/: they must land on the repository's files.
    resolved = yaml.safe_load(valid.stdout)["services"]
    assert Path(resolved["notifier1"]["build"]["context"]).resolve() == ROOT.resolve()
    mounts = [str(v.get("source") if isinstance(v, dict) else v.split(":")[0])
              for name in ("nginx", "prometheus", "grafana") for v in resolved[name]["volumes"]]
    for needed in ("nginx.conf", "deploy/prometheus.yml", "deploy/grafana/dashboards"):
        assert (ROOT / needed).exists() and str((ROOT / needed).resolve()) in mounts, (needed, mounts)


def test_cluster_compose_runs_six_cluster_nodes_a_one_shot_create_and_the_instances_on_them() -> None:
    services: dict[str, Any] = yaml.safe_load(CLUSTER_COMPOSE_FILE.read_text())["services"]
    assert set(services) == CLUSTER_SERVICES
    assert {name for name, service in services.items() if service.get("ports")} == {
        "nginx", "prometheus", "grafana"
    }
    for name in sorted(REDIS_NODES):
        node = services[name]
        command = " ".join(node["command"])
        for flag in ("--cluster-enabled yes", "--appendonly yes", "--maxmemory-policy noeviction"):
            assert flag in command, (name, flag)
        assert re.search(r"--maxmemory \d+mb", command), name
        assert "healthcheck" in node and node["hostname"] == name
    init = services["redis-cluster-init"]
    script = " ".join(init["command"])
    assert "--cluster create" in script and "--cluster-replicas 1" in script and "--cluster-yes" in script
    assert "cluster_state:ok" in script
    assert init["restart"] == "no"
    assert {name: dep["condition"] for name, dep in init["depends_on"].items()} == {
        name: "service_healthy" for name in REDIS_NODES
    }
    instances = sorted(name for name in services if name.startswith("notifier"))
    assert instances == ["notifier1", "notifier2", "notifier3"]
    for name in instances:
        env = services[name]["environment"]
        assert env["NOTIFIER_BROKER_URL"] == "redis+cluster://redis-1:6379,redis-2:6379,redis-3:6379"
        assert env["NOTIFIER_JWT_SECRET"].startswith("${NOTIFIER_JWT_SECRET:?")
        assert services[name]["depends_on"] == {
            "redis-cluster-init": {"condition": "service_completed_successfully"}
        }
    upstreams = services["nginx"]["environment"]["NOTIFIER_UPSTREAMS"]
    assert re.findall(r"server (\S+);", upstreams) == [f"{name}:8000" for name in instances]


def test_compose_publishes_ports_only_for_nginx_prometheus_and_grafana() -> None:
    services = compose_file()["services"]
    assert set(services) == SERVICES
    assert {name for name, service in services.items() if service.get("ports")} == {
        "nginx", "prometheus", "grafana"
    }
    assert any(str(p).endswith(":80") for p in services["nginx"]["ports"])
    instances = sorted(name for name in services if name.startswith("notifier"))
    for name in instances:
        env = services[name]["environment"]
        assert env["NOTIFIER_BROKER_URL"] == "redis://redis:6379/0"
        assert env["NOTIFIER_HOST"] == "0.0.0.0"
        assert env["NOTIFIER_JWT_SECRET"].startswith("${NOTIFIER_JWT_SECRET:?")
        assert services[name]["build"]["dockerfile"] == "deploy/Dockerfile"
    upstreams = services["nginx"]["environment"]["NOTIFIER_UPSTREAMS"]
    assert re.findall(r"server (\S+);", upstreams) == [f"{name}:8000" for name in instances]
    assert "healthcheck" in services["redis"]
    redis_command = services["redis"]["command"]
    assert redis_command[redis_command.index("--maxmemory-policy") + 1] == "noeviction"
    assert redis_command[redis_command.index("--maxmemory") + 1].endswith("mb")
    dockerfile = (ROOT / "deploy" / "Dockerfile").read_text()
    assert "FROM python:3.11-slim" in dockerfile and "USER notifier" in dockerfile
    assert "HEALTHCHECK" in dockerfile and "/healthz" in dockerfile


def test_prometheus_scrapes_every_instance() -> None:
    config = yaml.safe_load(PROMETHEUS_FILE.read_text())
    [job] = [job for job in config["scrape_configs"] if job["job_name"] == "notifier"]
    targets = [t for group in job["static_configs"] for t in group["targets"]]
    instances = sorted(name for name in compose_file()["services"] if name.startswith("notifier"))
    assert targets == [f"{name}:8000" for name in instances]
    assert job.get("metrics_path", "/metrics") == "/metrics"


def test_grafana_dashboard_shows_the_contract_metrics() -> None:
    datasources = yaml.safe_load((GRAFANA / "provisioning" / "datasources" / "prometheus.yml").read_text())
    [datasource] = datasources["datasources"]
    assert datasource["url"] == "http://prometheus:9090"
    providers = yaml.safe_load((GRAFANA / "provisioning" / "dashboards" / "notifier.yml").read_text())
    mounts = compose_file()["services"]["grafana"]["volumes"]
    assert f"./deploy/grafana/dashboards:{providers['providers'][0]['options']['path']}:ro" in mounts

    dashboard = json.loads((GRAFANA / "dashboards" / "notifier.json").read_text())
    targets = [t for panel in dashboard["panels"] for t in panel["targets"]]
    assert {t["datasource"]["uid"] for t in targets} == {datasource["uid"]}
    exprs = "\n".join(t["expr"] for t in targets)
    for needed in (
        "sum by (instance) (notifier_connections",
        "rate(notifier_notifications_published_total",
        "rate(notifier_notifications_delivered_total",
        "histogram_quantile(0.5, sum by (le) (rate(notifier_delivery_latency_seconds_bucket",
        "histogram_quantile(0.99, sum by (le) (rate(notifier_delivery_latency_seconds_bucket",
        "sum by (reason) (rate(notifier_notifications_dropped_total",
        "notifier_broker_connected",
        "sum by (outcome) (rate(notifier_handshakes_total",
        "notifier_broker_resubscribes_total",
    ):
        assert needed in exprs, needed

    # Grafana keys panels by id, and draws overlapping panels over each other.
    ids = [panel["id"] for panel in dashboard["panels"]]
    assert len(ids) == len(set(ids)), ids
    boxes = {f"{panel['id']} {panel['title']}": panel["gridPos"] for panel in dashboard["panels"]}
    for name, box in boxes.items():
        assert box["x"] >= 0 and box["x"] + box["w"] <= 24, name
    names = sorted(boxes)
    for i, a in enumerate(names):
        for b in names[i + 1:]:
            first, second = boxes[a], boxes[b]
            apart = (first["x"] + first["w"] <= second["x"] or second["x"] + second["w"] <= first["x"]
                     or first["y"] + first["h"] <= second["y"] or second["y"] + second["h"] <= first["y"])
            assert apart, f"panels {a!r} and {b!r} overlap"
