"""Real parts for tests: free ports, a real redis-server, real ``notifier serve`` processes."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import anyio
import httpx
import orjson
from redis import Redis as SyncRedis
from redis.exceptions import RedisError
from starlette.testclient import WebSocketTestSession

from notifier.broker_memory import MemoryBroker
from notifier.errors import BrokerUnavailable
from notifier.protocol import Accepted

ROOT = Path(__file__).resolve().parent.parent


def recv(ws: WebSocketTestSession, timeout: float = 5.0) -> dict[str, Any]:
    """The next frame of a TestClient socket: WebSocketDisconnect when the server closed it,
    TimeoutError when nothing came within ``timeout`` (the TestClient's own receive blocks forever)."""

    async def receive() -> dict[str, Any]:
        with anyio.fail_after(timeout):
            message: dict[str, Any] = await ws._send_rx.receive()
            return message

    message = ws.portal.call(receive)
    ws._raise_on_close(message)
    frame: dict[str, Any] = orjson.loads(message["text"])
    return frame


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def wait_until(check: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll ``check`` until it is true; fail after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except (OSError, httpx.HTTPError):
            pass
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.02)


class RedisServer:
    """A real ``redis-server`` on a free loopback port; no persistence unless ``durable``.

    ``durable``: an append-only file fsynced before every reply, in its own directory, so a
    SIGKILLed server restarted on the same port comes back with every acknowledged write.
    """

    def __init__(self, durable: bool = False) -> None:
        self.durable = durable
        binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not os.path.exists(binary):
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.port = free_port()
        self.dir = tempfile.mkdtemp(prefix="notifier-redis-")
        self.proc: subprocess.Popen[bytes] | None = None
        self.binary = binary

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                self.binary,
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "yes" if self.durable else "no",
                "--appendfsync",
                "always",
                "--dir",
                self.dir,
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        # PING answers -LOADING (not +PONG) while an append-only file is replayed.
        wait_until(self.ping, 30 if self.durable else 10, "redis-server to answer PING")

    def ping(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None


def _ask(port: int, *words: str) -> Any:
    """One command to a redis-server or sentinel on ``port`` (a fresh connection, 2 s timeouts)."""
    with SyncRedis(port=port, socket_timeout=2, socket_connect_timeout=2, decode_responses=True) as client:
        return client.execute_command(*words)


class SentinelSet:
    """A real Sentinel deployment on free loopback ports: a master, one replica (both without
    persistence: the replica gets the master's writes by replication only) and three sentinels
    (quorum 2, master down after ``down_after_ms``). ``stop()`` ends every process it started.

    ``kill_master()`` SIGKILLs the current master; the sentinels then promote the replica.
    """

    SERVICE = "notifier"

    def __init__(self, down_after_ms: int = 1000, failover_timeout_ms: int = 5000) -> None:
        self.binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        if not os.path.exists(self.binary):
            raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
        self.down_after_ms, self.failover_timeout_ms = down_after_ms, failover_timeout_ms
        self.dir = tempfile.mkdtemp(prefix="notifier-sentinel-")
        self.data_ports = [free_port(), free_port()]  # first the master, then the replica
        self.sentinel_ports = [free_port() for _ in range(3)]
        self.procs: dict[int, subprocess.Popen[bytes]] = {}

    @property
    def url(self) -> str:
        hosts = ",".join(f"127.0.0.1:{port}" for port in self.sentinel_ports)
        return f"redis+sentinel://{hosts}/{self.SERVICE}/0"

    def _spawn(self, port: int, args: list[str]) -> None:
        self.procs[port] = subprocess.Popen(
            [self.binary, *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def _ping(self, port: int) -> bool:
        try:
            return bool(_ask(port, "PING"))
        except RedisError:
            return False

    def start(self) -> SentinelSet:
        master, replica = self.data_ports
        for port in self.data_ports:
            extra = ["--replicaof", "127.0.0.1", str(master)] if port == replica else []
            self._spawn(port, [
                "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no",
                "--dir", self.dir, "--dbfilename", f"dump-{port}.rdb", *extra,
            ])  # fmt: skip
        for port in self.sentinel_ports:
            conf = Path(self.dir) / f"sentinel-{port}.conf"  # sentinels rewrite their file
            conf.write_text(
                f"port {port}\nbind 127.0.0.1\ndir {self.dir}\n"
                f"sentinel monitor {self.SERVICE} 127.0.0.1 {master} 2\n"
                f"sentinel down-after-milliseconds {self.SERVICE} {self.down_after_ms}\n"
                f"sentinel failover-timeout {self.SERVICE} {self.failover_timeout_ms}\n"
                f"sentinel parallel-syncs {self.SERVICE} 1\n"
            )
            self._spawn(port, [str(conf), "--sentinel"])
        for port in [*self.data_ports, *self.sentinel_ports]:
            wait_until(lambda p=port: self._ping(p), 10, f"redis on port {port} to answer PING")
        wait_until(self.healthy, 30, "the sentinels to see the replica and each other")
        return self

    def healthy(self) -> bool:
        """Every sentinel names the same live master, with a replica in sync and two peers."""
        try:
            masters = {self.master_port(port) for port in self.sentinel_ports}
            if len(masters) != 1 or None in masters:
                return False
            for port in self.sentinel_ports:
                state = _ask(port, "SENTINEL", "MASTER", self.SERVICE)
                if state["num-slaves"] != "1" or state["num-other-sentinels"] != "2":
                    return False
                if state["flags"] != "master":  # not s_down, o_down, failover_in_progress
                    return False
            master = masters.pop()
            replicas = [p for p in self.running_ports() if p in self.data_ports and p != master]
            return all(_ask(p, "INFO", "replication")["master_link_status"] == "up" for p in replicas)
        except RedisError:
            return False

    def running_ports(self) -> list[int]:
        return [port for port, proc in self.procs.items() if proc.poll() is None]

    def master_port(self, sentinel_port: int | None = None) -> int | None:
        """The master's port, as one sentinel (the first by default) names it."""
        port = sentinel_port or self.sentinel_ports[0]
        address = _ask(port, "SENTINEL", "GET-MASTER-ADDR-BY-NAME", self.SERVICE)
        return int(address[1]) if address else None

    def kill_master(self) -> int:
        """SIGKILL the current master; its port."""
        port = self.master_port()
        assert port is not None and port in self.data_ports
        proc = self.procs[port]
        proc.kill()
        proc.wait(10)
        return port

    def failover(self) -> int:
        """Ask a sentinel for a failover (``SENTINEL FAILOVER``): the replica is promoted and the
        old master, still running, turned into its replica. The old master's port."""
        port = self.master_port()
        assert port is not None
        _ask(self.sentinel_ports[0], "SENTINEL", "FAILOVER", self.SERVICE)
        return port

    def stop(self) -> None:
        for proc in self.procs.values():
            if proc.poll() is None:
                proc.terminate()
        for proc in self.procs.values():
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        self.procs.clear()
        shutil.rmtree(self.dir, ignore_errors=True)


def start_all(instances: Iterable[Instance]) -> None:
    """Start instances side by side (each waits for its own /readyz)."""
    instances = list(instances)
    with ThreadPoolExecutor(len(instances)) as pool:
        list(pool.map(Instance.start, instances))


def stop_all(instances: Iterable[Instance]) -> None:
    """Stop instances and print the tail of each log (pytest shows it only for a failed test)."""
    for instance in instances:
        instance.stop()
        print(f"--- {instance.url} log (tail) ---", *instance.output().splitlines()[-40:], sep="\n")
        instance.log.close()
        os.unlink(instance.log.name)


class FailingBroker(MemoryBroker):
    """The memory broker, whose publish raises BrokerUnavailable while ``failing`` is set."""

    def __init__(self, failing: bool = True) -> None:
        super().__init__()
        self.failing = failing

    async def publish(
        self, topic: str, data_json: bytes, ts: int, idempotency_key: str | None = None
    ) -> Accepted:
        if self.failing:
            raise BrokerUnavailable("broker is down (test)")
        return await super().publish(topic, data_json, ts, idempotency_key)


class Instance:
    """A real ``notifier serve`` process on a free port."""

    def __init__(self, env: dict[str, str], port: int | None = None) -> None:
        self.port = port or free_port()
        self.env = {**os.environ, **env, "NOTIFIER_PORT": str(self.port), "NOTIFIER_HOST": "127.0.0.1"}
        self.proc: subprocess.Popen[bytes] | None = None
        # Only the file's name is kept: each start opens it for the child, and no handle of ours
        # outlives the call (one left to the garbage collector is an unraisable ResourceWarning).
        self.log = tempfile.NamedTemporaryFile(prefix="notifier-instance-", suffix=".log", delete=False)
        self.log.close()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/v1/ws"

    def start(self, ready: bool = True) -> Instance:
        with open(self.log.name, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "notifier", "serve"],
                env=self.env,
                cwd=ROOT,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        path = "/readyz" if ready else "/healthz"
        wait_until(lambda: httpx.get(self.url + path, timeout=1).status_code == 200, 20, f"{self.url}{path}")
        return self

    def output(self) -> str:
        return Path(self.log.name).read_text(errors="replace")

    def metric(self, name: str) -> float:
        """The value of one sample (``name`` may include labels) in this instance's /metrics."""
        text = httpx.get(self.url + "/metrics", timeout=5).text
        for line in text.splitlines():
            if line.startswith(name + " "):
                return float(line.split()[-1])
        raise KeyError(name)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self.proc = None


def memory_instance(secret: str) -> Iterator[Instance]:
    """A started ``notifier serve`` on the memory broker, for a module-scoped fixture; stopped
    and its log removed afterwards."""
    instance = Instance({"NOTIFIER_BROKER_URL": "memory://", "NOTIFIER_JWT_SECRET": secret})
    try:
        instance.start()
        yield instance
    finally:
        instance.stop()
        os.unlink(instance.log.name)


class SlowLink:
    """A real TCP relay to a redis-server that holds every client-to-server byte ``delay`` seconds.

    Replies come back at once. A client behind it sees its commands take effect late, so
    "returns once the subscription is active" is tested with a window wide enough to matter.
    """

    def __init__(self, target_port: int, delay: float) -> None:
        self.target_port, self.delay = target_port, delay
        self.port = 0
        self._server: asyncio.Server | None = None
        self._tasks: list[asyncio.Task[None]] = []
        self._writers: list[asyncio.StreamWriter] = []

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    async def __aenter__(self) -> SlowLink:
        self._server = await asyncio.start_server(self._relay, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_exc: object) -> None:
        assert self._server is not None
        self._server.close()
        for task in self._tasks:
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:
            writer.close()
        await asyncio.gather(*(w.wait_closed() for w in self._writers), return_exceptions=True)
        await self._server.wait_closed()

    async def _relay(self, client_reader: asyncio.StreamReader, client_writer: asyncio.StreamWriter) -> None:
        self._writers.append(client_writer)
        try:
            server_reader, server_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            client_writer.close()
            return
        self._writers.append(server_writer)
        self._tasks += [
            asyncio.create_task(self._pump(client_reader, server_writer, self.delay)),
            asyncio.create_task(self._pump(server_reader, client_writer, 0.0)),
        ]

    @staticmethod
    async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, delay: float) -> None:
        loop = asyncio.get_running_loop()
        chunks: asyncio.Queue[tuple[float, bytes]] = asyncio.Queue()

        async def read() -> None:
            try:
                while data := await reader.read(65536):
                    chunks.put_nowait((loop.time() + delay, data))
            except OSError:
                pass
            chunks.put_nowait((loop.time() + delay, b""))

        reading = asyncio.create_task(read())
        try:
            while True:
                due, data = await chunks.get()
                await asyncio.sleep(max(0.0, due - loop.time()))  # latency, in arrival order
                if not data:
                    break
                writer.write(data)
                await writer.drain()
        except OSError:
            pass
        finally:
            reading.cancel()
            await asyncio.gather(reading, return_exceptions=True)
            writer.close()


# -- fixtures ---------------------------------------------------------------------------------


# -- WebSocket frames ---------------------------------------------------------------------------

Frame = dict[str, Any]


def notification(answer: Frame, data: Any) -> Frame:
    """The frame a subscriber gets for the POST that was answered with ``answer``."""
    return {
        "type": "notification",
        "id": answer["id"],
        "topic": answer["topic"],
        "data": data,
        "ts": answer["ts"],
    }


async def next_frame(ws: Any, timeout: float) -> Frame:
    """The next frame of a ``websockets`` client connection, decoded; fail after ``timeout``."""
    try:
        async with asyncio.timeout(timeout):
            raw = await ws.recv()
    except TimeoutError:
        raise AssertionError(f"no frame within {timeout}s") from None
    assert isinstance(raw, str), "every server frame is JSON text"
    frame: Frame = orjson.loads(raw)
    return frame


async def hello(ws: Any, timeout: float) -> Frame:
    frame = await next_frame(ws, timeout)
    assert frame["type"] == "hello", frame
    return frame
