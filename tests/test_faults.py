"""Fault injection against real processes: redis-server, ``notifier serve`` instances and nginx.

Each test builds its own topology, injects one fault (Redis killed and restarted, an instance
SIGTERMed under load, a client that never reads, a flood of garbage frames, Redis frozen, Redis
restarted at once), and says in its docstring what was injected, what was sent and what
arrived; the assertions are exactly that. Every wait has a deadline; every process started
here is stopped in a ``finally`` through its own Popen object or process group. Figures of a
run are printed (``pytest -s`` shows them).
"""

from __future__ import annotations

import asyncio
import base64
import inspect
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
import support
from conftest import SECRET, mint_token
from support import ROOT, Instance, RedisServer, free_port, notification, start_all, stop_all, wait_until
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidStatus
from websockets.protocol import State

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.slow]

Json = dict[str, Any]

# The machine running these is shared and often busy: deadlines are generous, never tight.
OPEN_TIMEOUT = 20.0  # a WebSocket handshake
FRAME_TIMEOUT = 20.0  # the next frame we are sure is coming
CONNECTIONS = "notifier_connections"
DROPPED_SLOW = 'notifier_notifications_dropped_total{reason="slow_consumer"}'
BROKER_CONNECTED = "notifier_broker_connected"
GOING_AWAY = 1001
NGINX_TEMPLATE = ROOT / "nginx.conf"
# nginx.conf's placeholders, matched as deploy/local-cluster and the nginx image match them.
PLACEHOLDER = re.compile(r"\$(\{)?(NOTIFIER_\w*)(?(1)\})")
SBIN = ["/usr/local/sbin", "/usr/sbin", "/sbin"]


# -- processes ----------------------------------------------------------------------------------


def kill(server: RedisServer) -> None:
    """SIGKILL: no shutdown, no last write; the process is reaped so the port is free again."""
    assert server.proc is not None
    server.proc.kill()
    server.proc.wait(10)
    server.proc = None


@asynccontextmanager
async def redis_running(server: RedisServer) -> AsyncIterator[RedisServer]:
    try:
        await asyncio.to_thread(server.start)
        yield server
    finally:
        if server.proc is not None and server.proc.poll() is None:
            os.kill(server.proc.pid, signal.SIGCONT)  # harmless unless a test left it frozen
        await asyncio.to_thread(server.stop)
        shutil.rmtree(server.dir, ignore_errors=True)


@asynccontextmanager
async def running(*instances: Instance) -> AsyncIterator[None]:
    try:
        await asyncio.to_thread(start_all, instances)
        yield
    finally:
        await asyncio.to_thread(stop_all, instances)


class Nginx:
    """The repository's ``nginx.conf`` rendered as ``deploy/local-cluster`` renders it (listen on
    a free loopback port, the given instances as upstreams), run by a real nginx in a temporary
    prefix, in its own process group."""

    def __init__(self, upstreams: list[Instance]) -> None:
        search = os.pathsep.join([os.environ.get("PATH", os.defpath), *SBIN])
        binary = shutil.which("nginx", path=search)
        if binary is None:
            raise RuntimeError("nginx is not installed (apt-get install nginx)")
        self.binary = binary
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="notifier-nginx-"))
        self.dir.chmod(0o755)  # nginx started as root runs its workers as another user
        values = {
            "NOTIFIER_LISTEN": f"127.0.0.1:{self.port}",
            "NOTIFIER_UPSTREAMS": " ".join(f"server 127.0.0.1:{i.port};" for i in upstreams),
        }
        self.conf = self.dir / "nginx.conf"
        self.conf.write_text(PLACEHOLDER.sub(lambda m: values[m.group(2)], NGINX_TEMPLATE.read_text()))
        self.log = self.dir / "nginx.log"
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(
                [
                    self.binary,
                    "-p",
                    f"{self.dir}/",
                    "-c",
                    str(self.conf),
                    "-e",
                    "stderr",
                    "-g",
                    "daemon off;",
                ],
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )

        def serving() -> bool:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise RuntimeError(f"nginx exited with {self.proc.returncode}:\n{self.log.read_text()}")
            return httpx.get(self.url + "/healthz", timeout=2, trust_env=False).status_code == 200

        wait_until(serving, 20, f"nginx to answer {self.url}/healthz")

    def stop(self) -> None:
        proc = self.proc
        if proc is not None and proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(5)
        self.proc = None
        if self.log.exists():
            print(
                "--- nginx log (tail) ---", *self.log.read_text(errors="replace").splitlines()[-30:], sep="\n"
            )
        shutil.rmtree(self.dir, ignore_errors=True)


def rss_bytes(pid: int) -> int:
    """Resident set size of a process, from /proc/<pid>/status (VmRSS, in kB)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise KeyError(f"no VmRSS for pid {pid}")


# -- clients ------------------------------------------------------------------------------------


def fresh(prefix: str = "fault") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def ws_url(base: str, token: str, topics: list[str] | None = None, since: int | None = None) -> str:
    query = {"token": token}
    if topics:
        query["topics"] = ",".join(topics)
    if since is not None:
        query["since"] = str(since)
    return base.replace("http://", "ws://", 1) + "/v1/ws?" + urlencode(query)


def ws_connect(url: str) -> connect:
    return connect(
        url, max_size=None, compression=None, proxy=None, open_timeout=OPEN_TIMEOUT, close_timeout=5
    )


async def next_frame(ws: ClientConnection, timeout: float = FRAME_TIMEOUT) -> Json:
    return await support.next_frame(ws, timeout)


async def hello(ws: ClientConnection) -> Json:
    return await support.hello(ws, FRAME_TIMEOUT)


async def post(http: httpx.AsyncClient, url: str, token: str, topic: str, data: Any) -> Json:
    """POST one notification; it must be accepted."""
    response = await http.post(
        url + "/v1/notifications",
        json={"topic": topic, "data": data},
        headers={"authorization": f"Bearer {token}"},
    )
    assert response.status_code == 202, response.text
    answer: Json = response.json()
    return answer


async def status_of(http: httpx.AsyncClient, url: str) -> int:
    try:
        return (await http.get(url, timeout=3)).status_code
    except httpx.HTTPError:
        return 0


async def metric(http: httpx.AsyncClient, instance: Instance, name: str) -> float:
    """One sample (``name`` may carry labels) of the instance's own /metrics."""
    text = (await http.get(instance.url + "/metrics", timeout=5)).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise KeyError(name)


async def eventually(
    check: Callable[[], bool | Awaitable[bool]],
    what: str,
    timeout: float,
    watch: Iterable[asyncio.Task[Any]] = (),
) -> float:
    """Poll ``check`` until true; the seconds it took. Fails after ``timeout`` seconds, or at once
    with the error of any task in ``watch`` that ended by raising."""
    watched = list(watch)
    started = time.monotonic()
    while True:
        for task in watched:
            if task.done() and not task.cancelled() and task.exception() is not None:
                raise AssertionError(
                    f"{task.get_name()} failed while waiting for {what}"
                ) from task.exception()
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return time.monotonic() - started
        if time.monotonic() - started > timeout:
            pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}")
        await asyncio.sleep(0.02)


async def cancel(tasks: Iterable[asyncio.Task[Any]]) -> None:
    tasks = list(tasks)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


class Publisher:
    """POSTs ``{"n": 0}``, ``{"n": 1}``, ... to one topic through one URL, one at a time, ``pace``
    seconds apart, until stopped. An attempt answered with a status in ``retry`` (or, when
    ``retry_transport_errors``, one that failed in transit) is repeated with the *same*
    Idempotency-Key until accepted, for at most ``patience`` seconds: a retry of a POST that did
    go through gets the first answer again and delivers nothing twice. Anything else fails."""

    def __init__(
        self,
        http: httpx.AsyncClient,
        url: str,
        topic: str,
        retry: frozenset[int],
        retry_transport_errors: bool = False,
        pace: float = 0.02,
        limit: int = 900,
        patience: float = 30.0,
    ) -> None:
        self.http, self.url, self.topic = http, url, topic
        self.retry, self.retry_transport_errors = retry, retry_transport_errors
        self.pace, self.limit, self.patience = pace, limit, patience
        self.token = mint_token("fault-publisher", ("publish",))
        self.accepted: list[int] = []  # ids in acceptance order; notification n is accepted[n]
        self.refusals: Counter[str] = Counter()  # refused attempts by status (or error), all retried
        self._stop = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def start(self) -> asyncio.Task[None]:
        self.task = asyncio.create_task(self._run(), name="publisher")
        return self.task

    async def finish(self) -> list[int]:
        """Stop after the POST in progress; every id accepted, in order."""
        self._stop.set()
        assert self.task is not None
        async with asyncio.timeout(self.patience + 15):
            await self.task
        return self.accepted

    async def _run(self) -> None:
        for n in range(self.limit):
            if self._stop.is_set():
                return
            self.accepted.append(await self._post_until_accepted(n))
            await asyncio.sleep(self.pace)  # pacing only: a steady stream, not a burst

    async def _post_until_accepted(self, n: int) -> int:
        key = uuid.uuid4().hex
        deadline = time.monotonic() + self.patience
        while True:
            try:
                response = await self.http.post(
                    self.url + "/v1/notifications",
                    json={"topic": self.topic, "data": {"n": n}},
                    headers={"authorization": f"Bearer {self.token}", "idempotency-key": key},
                )
            except httpx.TransportError as exc:
                if not self.retry_transport_errors:
                    raise
                outcome = type(exc).__name__
            else:
                if response.status_code == 202:
                    id_ = int(response.json()["id"])
                    assert not self.accepted or id_ > self.accepted[-1], "ids increase in publish order"
                    return id_
                assert response.status_code in self.retry, f"POST {n}: {response.status_code} {response.text}"
                outcome = str(response.status_code)
            self.refusals[outcome] += 1
            assert time.monotonic() < deadline, f"notification {n} not accepted within {self.patience}s"
            await asyncio.sleep(0.1)  # pacing of the retries


@dataclass
class Recorder:
    """What one client received of ``topic``: one list of ids per stream, the first socket's,
    then one more after each resync (a new socket with ``since``, or a subscribe frame with
    ``since`` on the same socket), each resync starting over right after its ``since``."""

    topic: str
    streams: list[list[int]] = field(default_factory=lambda: [[]])
    sinces: list[int] = field(default_factory=list)
    recovered: list[bool] = field(default_factory=list)
    n_of: dict[int, int] = field(default_factory=dict)  # id -> the publisher's sequence number
    resync_since: int | None = None  # a subscribe frame with this since is on its way

    @property
    def last(self) -> int:
        """The last id received on the current stream (0: none yet)."""
        return self.streams[-1][-1] if self.streams[-1] else 0

    def resync(self, since: int, recovered: bool) -> None:
        self.sinces.append(since)
        self.recovered.append(recovered)
        self.streams.append([])

    def view(self) -> list[int]:
        """What the client ends up with: at each resync it keeps what it had up to ``since``
        and takes the new stream from there."""
        ids = list(self.streams[0])
        for since, stream in zip(self.sinces, self.streams[1:], strict=True):
            ids = [i for i in ids if i <= since] + stream
        return ids

    def take(self, frame: Json) -> None:
        if frame["type"] == "notification" and frame["topic"] == self.topic:
            id_ = int(frame["id"])
            n = frame["data"]["n"]
            assert self.n_of.setdefault(id_, n) == n, f"id {id_} came with two different payloads"
            self.streams[-1].append(id_)
        elif frame["type"] == "error":
            raise AssertionError(f"error frame: {frame}")
        elif frame["type"] == "subscribed" and frame.get("ref") == "resync":
            assert self.resync_since is not None
            self.resync(self.resync_since, frame["recovered"])
            self.resync_since = None

    async def read(self, ws: ClientConnection) -> None:
        async for raw in ws:
            assert isinstance(raw, str)
            self.take(json.loads(raw))


# -- 1. Redis killed and restarted mid-stream -------------------------------------------------


async def test_redis_killed_and_restarted_mid_stream_subscribers_recover_every_notification() -> None:
    """Injected: redis-server (append-only file, fsync always) SIGKILLed while a publisher runs,
    kept down until 50 POSTs were refused (>= 5 s), then restarted on the same port, replaying
    its file.

    Sent: a publisher POSTs {"n": 0}, {"n": 1}, ... to instance A every 20 ms, retrying each
    503 with the same Idempotency-Key until accepted. Subscriber SA is on A, SB on instance B;
    both instances share the Redis.

    Arrived: each subscriber's socket stays open through the outage and, once both /readyz are
    200 again, receives live notifications again; what it missed while the instances were
    resubscribing is recovered from history: SA reconnects with ``since=<last id it saw before
    the kill>`` (``hello`` says recovered true), SB sends a subscribe frame with that ``since``
    on its open socket (``subscribed`` says recovered true). The replay stream after ``since``
    is exactly the accepted ids after it, so each ends with all N accepted ids, once each, in
    id order, each with its own payload.
    """
    redis = RedisServer(durable=True)
    env = {"NOTIFIER_BROKER_URL": redis.url, "NOTIFIER_JWT_SECRET": SECRET}
    a, b = Instance(env), Instance(env)
    topic = fresh()
    token = mint_token("fault-reader", ("subscribe",))
    tasks: list[asyncio.Task[Any]] = []
    async with (
        redis_running(redis),
        running(a, b),
        httpx.AsyncClient(timeout=10, trust_env=False) as http,
        ws_connect(ws_url(a.url, token, [topic])) as ws_a,
        ws_connect(ws_url(b.url, token, [topic])) as ws_b,
    ):
        sa, sb = Recorder(topic), Recorder(topic)
        try:
            await hello(ws_a)
            await hello(ws_b)
            tasks += [
                asyncio.create_task(sa.read(ws_a), name="SA"),
                asyncio.create_task(sb.read(ws_b), name="SB"),
            ]
            publisher = Publisher(http, a.url, topic, retry=frozenset({503}), pace=0.02)
            tasks.append(publisher.start())

            await eventually(
                lambda: len(sa.streams[0]) >= 30 and len(sb.streams[0]) >= 30,
                "30 notifications on each subscriber before the fault",
                30,
                tasks,
            )
            mark = {"SA": sa.last, "SB": sb.last}  # what each client has when Redis dies
            accepted_before = len(publisher.accepted)
            killed = time.monotonic()
            await asyncio.to_thread(kill, redis)
            # Down until the publisher has been refused 50 times (>= 5 s at its 0.1 s retry pace):
            # longer than a probe interval, and the instances' reconnect back-off grows meanwhile,
            # so after the restart A accepts POSTs before the pub/sub links are resubscribed.
            await eventually(
                lambda: publisher.refusals["503"] >= 50,
                "50 POSTs refused with 503 during the outage",
                30,
                tasks,
            )
            await asyncio.to_thread(redis.start)  # the same port, the same append-only file
            restarted = time.monotonic()

            async def both_ready() -> bool:
                return all([await status_of(http, i.url + "/readyz") == 200 for i in (a, b)])

            await eventually(both_ready, "/readyz 200 on both instances after the restart", 30, tasks)
            ready = time.monotonic()
            for instance in (a, b):
                assert await metric(http, instance, BROKER_CONNECTED) == 1

            # The same sockets get live notifications again: one accepted after readiness.
            resumed = len(publisher.accepted)
            await eventually(
                lambda: len(publisher.accepted) > resumed, "a POST accepted after readiness", 15, tasks
            )
            first_live = publisher.accepted[resumed]
            await eventually(
                lambda: sa.last >= first_live and sb.last >= first_live,
                "both open sockets to receive live notifications again",
                15,
                tasks,
            )
            live = {"SA": list(sa.streams[0]), "SB": list(sb.streams[0])}

            # SA: a new socket with since; SB: a subscribe frame with since on its open socket.
            # The publisher keeps going meanwhile.
            tasks[0].cancel()
            await asyncio.gather(tasks[0], return_exceptions=True)
            await ws_a.close()
            async with ws_connect(ws_url(a.url, token, [topic], since=mark["SA"])) as ws_a2:
                frame = await hello(ws_a2)
                sa.resync(mark["SA"], frame["recovered"])
                tasks.append(asyncio.create_task(sa.read(ws_a2), name="SA after reconnect"))
                sb.resync_since = mark["SB"]
                await ws_b.send(
                    json.dumps(
                        {"type": "subscribe", "topics": [topic], "since": str(mark["SB"]), "ref": "resync"}
                    )
                )
                await eventually(lambda: len(sb.streams) == 2, "SB's subscribed reply", 15, tasks)

                more = len(publisher.accepted) + 20
                await eventually(
                    lambda: len(publisher.accepted) >= more, "20 more accepted after the resync", 30, tasks
                )
                accepted = await publisher.finish()
                final = accepted[-1]
                await eventually(
                    lambda: sa.last >= final and sb.last >= final,
                    "the last accepted notification on both subscribers",
                    20,
                    tasks,
                )
        finally:
            await cancel(tasks)

    n = len(accepted)
    print(
        f"\n[redis kill] accepted {n} (the kill after {accepted_before}); refused attempts "
        f"{dict(publisher.refusals)}; Redis down {restarted - killed:.2f}s, both ready "
        f"{ready - restarted:.2f}s after the restart"
    )
    assert publisher.refusals["503"] >= 1
    assert n < 1000, "every accepted notification is within NOTIFIER_HISTORY_SIZE"
    for name, rec in (("SA", sa), ("SB", sb)):
        since = mark[name]
        first = live[name]
        missed = [i for i in accepted if since < i <= first[-1] and i not in set(first)]
        print(
            f"[redis kill] {name}: the open socket had {len(first)} ({len([i for i in first if i > since])} "
            f"after the restart), missing {len(missed)} accepted while the instances resubscribed; "
            f"the resync from since={since} replayed {len(rec.streams[1])}"
        )
        # The open socket: nothing lost before the kill, no duplicate, id order.
        assert first == sorted(set(first)) and set(first) <= set(accepted), name
        assert [i for i in first if i <= since] == [i for i in accepted if i <= since], name
        # The resync: exactly what was accepted after since, once, in order; recovered true.
        assert rec.recovered == [True], name
        assert rec.streams[1] == [i for i in accepted if i > since], name
        # The client's view: all N, each once, in id order, each with its own payload.
        assert rec.view() == accepted, name
        assert [rec.n_of[i] for i in accepted] == list(range(n)), name


# -- 2. An instance SIGTERMed under load behind nginx -------------------------------------------


@dataclass
class Follower:
    """One subscriber behind nginx that reconnects with ``since=<last id seen>`` after a 1001."""

    sub: str
    topic: str
    ids: list[int] = field(default_factory=list)
    ns: list[int] = field(default_factory=list)
    sockets: int = 0  # handshakes completed (hello received)
    closes: list[tuple[int | None, float]] = field(default_factory=list)  # close code, when
    recovered: list[bool] = field(default_factory=list)

    async def run(self, base: str) -> None:
        token = mint_token(self.sub, ("subscribe",))
        since: int | None = None
        while True:
            async with ws_connect(ws_url(base, token, [self.topic], since)) as ws:
                frame = await hello(ws)
                if since is not None:
                    self.recovered.append(frame["recovered"])
                self.sockets += 1
                try:
                    async for raw in ws:
                        assert isinstance(raw, str)
                        frame = json.loads(raw)
                        if frame["type"] == "notification" and frame["topic"] == self.topic:
                            self.ids.append(int(frame["id"]))
                            self.ns.append(frame["data"]["n"])
                except ConnectionClosed:
                    pass
            self.closes.append((ws.close_code, time.monotonic()))
            assert ws.close_code == GOING_AWAY, f"{self.sub}: closed with {ws.close_code}"
            assert self.ids, f"{self.sub}: closed before any notification"
            since = self.ids[-1]


async def test_instance_sigtermed_under_load_behind_nginx_its_clients_reconnect_and_lose_nothing() -> None:
    """Injected: SIGTERM to the busiest of three instances behind nginx (the repository's
    nginx.conf), while a publisher runs. Not ``deploy/local-cluster``: it stops the whole
    cluster when any child exits, this instance's exit included; so the same topology is
    started here (redis-server, 3 ``notifier serve``, nginx rendered from nginx.conf).

    Sent: 30 subscribers (30 users) open sockets through nginx, which spreads them over the
    instances; a publisher POSTs {"n": 0}, {"n": 1}, ... through nginx every 20 ms, retrying a
    502/503/504 or a failed connection with the same Idempotency-Key.

    Arrived: exactly the victim's clients get close code 1001, each once; each reconnects
    through nginx (to the other instances) with ``since=<last id it saw>``, gets ``hello`` with
    recovered true, and every subscriber ends with all N accepted ids, once each, in order,
    with their payloads n = 0..N-1. The SIGTERMed instance exits with status 0.
    """
    redis = RedisServer()
    env = {"NOTIFIER_BROKER_URL": redis.url, "NOTIFIER_JWT_SECRET": SECRET, "NOTIFIER_SHUTDOWN_TIMEOUT": "6"}
    instances = [Instance(env) for _ in range(3)]
    topic = fresh()
    followers = [Follower(f"fan{i}", topic) for i in range(30)]
    tasks: list[asyncio.Task[Any]] = []
    nginx: Nginx | None = None
    async with (
        redis_running(redis),
        running(*instances),
        httpx.AsyncClient(timeout=10, trust_env=False) as http,
    ):
        try:
            nginx = Nginx(instances)
            await asyncio.to_thread(nginx.start)
            tasks += [asyncio.create_task(f.run(nginx.url), name=f.sub) for f in followers]
            await eventually(
                lambda: all(f.sockets == 1 for f in followers), "30 sockets through nginx", 60, tasks
            )
            counts = {i.port: await metric(http, i, CONNECTIONS) for i in instances}
            assert sum(counts.values()) == 30, counts
            assert sum(1 for c in counts.values() if c) >= 2, (
                f"nginx put every socket on one instance: {counts}"
            )
            victim = max(instances, key=lambda i: counts[i.port])
            assert victim.proc is not None
            on_victim = int(counts[victim.port])

            publisher = Publisher(
                http,
                nginx.url,
                topic,
                retry=frozenset({502, 503, 504}),
                retry_transport_errors=True,
                pace=0.02,
            )
            tasks.append(publisher.start())
            await eventually(
                lambda: all(len(f.ids) >= 10 for f in followers),
                "10 notifications on every subscriber before the SIGTERM",
                30,
                tasks,
            )
            accepted_before = len(publisher.accepted)
            sigterm = time.monotonic()
            os.kill(victim.proc.pid, signal.SIGTERM)
            status = await asyncio.to_thread(victim.proc.wait, 6 + 5 + 15)
            exited = time.monotonic()

            await eventually(
                lambda: sum(f.sockets for f in followers) == 30 + on_victim,
                f"the victim's {on_victim} clients to reconnect",
                30,
                tasks,
            )
            reconnected = time.monotonic()
            more = len(publisher.accepted) + 20
            await eventually(
                lambda: len(publisher.accepted) >= more, "20 more accepted after the reconnects", 30, tasks
            )
            accepted = await publisher.finish()
            final = accepted[-1]
            await eventually(
                lambda: all(f.ids and f.ids[-1] >= final for f in followers),
                "the last accepted notification on every subscriber",
                30,
                tasks,
            )
            remaining = {i.port: await metric(http, i, CONNECTIONS) for i in instances if i is not victim}
        finally:
            await cancel(tasks)
            if nginx is not None:
                await asyncio.to_thread(nginx.stop)

    n = len(accepted)
    moved = [f for f in followers if f.closes]
    close_times = sorted(t for f in moved for _, t in f.closes)
    print(
        f"\n[sigterm] sockets per instance {sorted(counts.values())}; victim had {on_victim}; accepted {n} "
        f"(SIGTERM after {accepted_before}); retried attempts {dict(publisher.refusals)}; 1001 closes from "
        f"{close_times[0] - sigterm:.2f}s to {close_times[-1] - sigterm:.2f}s after SIGTERM; exit status "
        f"{status} after {exited - sigterm:.2f}s; all reconnected {reconnected - sigterm:.2f}s after "
        f"SIGTERM; remaining instances hold {sorted(remaining.values())}"
    )
    assert status == 0
    assert len(moved) == on_victim
    for f in followers:
        assert [code for code, _ in f.closes] in ([], [GOING_AWAY]), f.sub
        assert f.recovered == [True] * len(f.closes), f.sub
        assert f.ids == accepted, f"{f.sub}: lost {len(set(accepted) - set(f.ids))}, extra {len(f.ids) - n}"
        assert f.ns == list(range(n)), f.sub
    assert sum(remaining.values()) == 30


# -- 3. A client that never reads -------------------------------------------------------------


def silent_socket(port: int, path: str) -> socket.socket:
    """A raw TCP socket with a 4 KiB receive buffer that performs the WebSocket handshake,
    reading the 101 response byte by byte up to the end of its headers, and never reads again."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: a small window
        sock.settimeout(OPEN_TIMEOUT)
        sock.connect(("127.0.0.1", port))
        key = base64.b64encode(os.urandom(16)).decode()
        sock.sendall(
            f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n\r\n".encode()
        )
        head = b""
        while not head.endswith(b"\r\n\r\n"):
            byte = sock.recv(1)
            assert byte, f"connection closed during the handshake: {head!r}"
            head += byte
        assert head.startswith(b"HTTP/1.1 101 "), head
        return sock
    except BaseException:
        sock.close()
        raise


async def test_client_that_never_reads_is_dropped_and_costs_the_other_subscribers_nothing(
    redis_server: RedisServer,
) -> None:
    """Injected: a client that never reads (raw TCP, 4 KiB SO_RCVBUF, WebSocket handshake done,
    then no recv at all) on an instance with NOTIFIER_SEND_QUEUE_BYTES=262144.

    Sent: 3,000 notifications of 4 KiB (data {"n": i, "pad": 4,096 x "x"}, frames of about
    4.2 KB, 12.5 MB in all per subscriber) POSTed to its topic by 8 concurrent publishers;
    5 normal WebSocket subscribers on the same topic.

    Arrived: each normal subscriber receives all 3,000, in id order, each once, with its
    payload; the silent one is disconnected (the instance's notifier_connections goes from 6
    back to 5) and notifier_notifications_dropped_total{reason="slow_consumer"} grows. The
    instance's VmRSS grows by less than 10 MiB over the run (measured: about +1.3 MiB). The
    whole flood is 12.5 MB of payload, so an unbounded queue for the silent client would grow
    it by roughly 17-25 MiB; the bounded queue also shows in the drop and the counter.
    """
    instance = Instance(
        {
            "NOTIFIER_BROKER_URL": redis_server.url,
            "NOTIFIER_JWT_SECRET": SECRET,
            "NOTIFIER_SEND_QUEUE_BYTES": "262144",
        }
    )
    topic = fresh()
    count, pad = 3000, "x" * 4096
    token = mint_token("fault-flood")
    received: list[list[tuple[int, int, int]]] = [[] for _ in range(5)]  # (id, n, len(pad))
    tasks: list[asyncio.Task[Any]] = []
    silent: socket.socket | None = None

    async def read(ws: ClientConnection, into: list[tuple[int, int, int]]) -> None:
        async for raw in ws:
            assert isinstance(raw, str)
            frame = json.loads(raw)
            if frame["type"] == "notification":
                into.append((int(frame["id"]), frame["data"]["n"], len(frame["data"]["pad"])))

    async with running(instance), httpx.AsyncClient(timeout=30, trust_env=False) as http:
        assert instance.proc is not None
        pid = instance.proc.pid
        sockets: list[ClientConnection] = []
        try:
            for i in range(5):
                sockets.append(await ws_connect(ws_url(instance.url, mint_token(f"reader{i}"), [topic])))
            for i, ws in enumerate(sockets):
                await hello(ws)
                tasks.append(asyncio.create_task(read(ws, received[i]), name=f"reader{i}"))
            silent = await asyncio.to_thread(
                silent_socket, instance.port, "/v1/ws?" + urlencode({"token": token, "topics": topic})
            )
            assert await metric(http, instance, CONNECTIONS) == 6
            dropped_before = await metric(http, instance, DROPPED_SLOW)
            baseline = peak = rss_bytes(pid)

            async def sample() -> None:
                nonlocal peak
                while True:
                    peak = max(peak, rss_bytes(pid))
                    await asyncio.sleep(0.05)

            sampler = asyncio.create_task(sample(), name="rss sampler")
            tasks.append(sampler)
            n_of: dict[int, int] = {}
            numbers = iter(range(count))

            async def publish() -> None:
                for n in numbers:  # shared by the workers: each n once
                    n_of[int((await post(http, instance.url, token, topic, {"n": n, "pad": pad}))["id"])] = n

            started = time.monotonic()
            async with asyncio.timeout(120):
                await asyncio.gather(*(publish() for _ in range(8)))
            posted = time.monotonic()
            await eventually(
                lambda: all(len(r) >= count for r in received), "3,000 on every normal subscriber", 60, tasks
            )
            delivered = time.monotonic()

            async def five_left() -> bool:
                return await metric(http, instance, CONNECTIONS) == 5

            await eventually(five_left, "the silent client to be dropped", 20, tasks)
            dropped = await metric(http, instance, DROPPED_SLOW) - dropped_before
            peak = max(peak, rss_bytes(pid))
        finally:
            await cancel(tasks)
            for ws in sockets:
                await ws.close()
            if silent is not None:
                silent.close()

    expected = [(id_, n_of[id_], 4096) for id_ in sorted(n_of)]
    print(
        f"\n[never reads] posted {len(n_of)} in {posted - started:.2f}s, all delivered to 5 readers "
        f"{delivered - started:.2f}s after the first POST; slow_consumer drops {dropped:.0f}; VmRSS "
        f"{baseline / 2**20:.1f} MiB -> peak {peak / 2**20:.1f} MiB (+{(peak - baseline) / 2**20:.1f} MiB)"
    )
    assert len(n_of) == count
    for i, got in enumerate(received):
        assert got == expected, f"reader{i}: {len(got)} frames"
    assert dropped > 0
    assert peak - baseline < 10 * 2**20


# -- 4. 1,000 garbage frames --------------------------------------------------------------------


def garbage(count: int) -> list[tuple[str, int | str | None]]:
    """``count`` text frames, a third each: invalid JSON, JSON that is not an object, objects of
    unknown type (with a ``ref`` the error must echo); each with the ref its reply must carry."""
    invalid = [
        "{",
        "not json",
        '{"type": "ping"',
        "[1, 2",
        "{'type': 'ping'}",
        "",
        "NaN",
        '{"a":}',
        "\x00\x01",
    ]
    scalars = ["[]", "[1, 2, 3]", "42", '"ping"', "null", "true", "3.5", '[{"type": "ping"}]']
    kinds: list[dict[str, Any]] = [{"type": "nope"}, {"type": "PING"}, {"type": 7}, {}, {"type": ""}]
    frames: list[tuple[str, int | str | None]] = []
    for i in range(count):
        if i % 3 == 0:
            frames.append((invalid[i % len(invalid)], None))
        elif i % 3 == 1:
            frames.append((scalars[i % len(scalars)], None))
        else:
            ref: int | str = i if i % 2 else f"r{i}"
            frames.append((json.dumps({**kinds[i % len(kinds)], "ref": ref}), ref))
    return frames


async def test_a_thousand_garbage_frames_get_an_error_each_and_cost_nobody_anything(
    redis_server: RedisServer,
) -> None:
    """Injected: 1,000 garbage text frames sent back to back by one client on a real instance:
    334 invalid JSON, 333 JSON that is not an object, 333 objects of unknown type with a ref.

    Arrived: exactly 1,000 replies to the sender, in order, each an ``error`` with code
    ``bad_request`` or ``rate_limited`` (the burst passes the 100 frames/s limit), echoing the
    ref of each frame that had one; the sender stays connected (a protocol ping and a ``ping``
    frame are answered); a bystander subscribed on the same instance receives, as its next
    frame, the notification POSTed afterwards; the instance still counts both sockets.
    """
    instance = Instance({"NOTIFIER_BROKER_URL": redis_server.url, "NOTIFIER_JWT_SECRET": SECRET})
    topic = fresh()
    frames = garbage(1000)
    async with (
        running(instance),
        httpx.AsyncClient(timeout=10, trust_env=False) as http,
        ws_connect(ws_url(instance.url, mint_token("garbage-sender"))) as sender,
        ws_connect(ws_url(instance.url, mint_token("bystander", ("subscribe",)), [topic])) as bystander,
    ):
        await hello(sender)
        await hello(bystander)
        started = time.monotonic()
        for text, _ in frames:
            await sender.send(text)
        replies = [await next_frame(sender) for _ in frames]
        elapsed = time.monotonic() - started

        async with asyncio.timeout(FRAME_TIMEOUT):
            await (await sender.ping())  # the socket is alive at the protocol level
        pong: Json = {}
        for attempt in range(20):  # the token bucket refills at 100 a second
            await sender.send(json.dumps({"type": "ping", "ref": f"alive{attempt}"}))
            reply = await next_frame(sender)
            if reply["type"] == "pong":
                pong = reply
                break
            assert reply["code"] == "rate_limited" and reply["ref"] == f"alive{attempt}", reply
            await asyncio.sleep(0.05)  # pacing of the retries
        assert pong["ref"].startswith("alive"), pong

        data = {"after": "garbage"}
        answer = await post(http, instance.url, mint_token("backend", ("publish",)), topic, data)
        assert await next_frame(bystander) == notification(answer, data)
        assert sender.state is State.OPEN and bystander.state is State.OPEN
        assert await metric(http, instance, CONNECTIONS) == 2

    codes = Counter(r.get("code") for r in replies)
    print(f"\n[garbage] 1,000 frames sent and 1,000 replies read in {elapsed:.2f}s: {dict(codes)}")
    assert all(r["type"] == "error" and isinstance(r["message"], str) for r in replies)
    assert set(codes) <= {"bad_request", "rate_limited"}
    assert codes["bad_request"] >= 200  # at least the burst allowance is answered as such
    for (text, ref), reply in zip(frames, replies, strict=True):
        assert reply.get("ref") == ref, (text, reply)


# -- 5. Redis frozen ----------------------------------------------------------------------------


async def test_redis_frozen_post_is_refused_in_time_never_delivered_and_readiness_follows() -> None:
    """Injected: SIGSTOP to redis-server (a hung Redis, not a dead one), later SIGCONT.

    Sent: a subscriber on one instance; POST "before" (Redis fine), POST "frozen" (while
    frozen), POST "after" (once /readyz is 200 again).

    Arrived: "before" is delivered; "frozen" is answered 503 within 3.5 s; /readyz turns 503
    within 12 s of the freeze (the pub/sub link is probed every 5 s with a 2-3 s timeout) and
    notifier_broker_connected is 0, while the open socket still answers a ping; after SIGCONT
    /readyz is 200 again, the subscriber's next notification is "after" (never "frozen"), and
    the topic's history holds exactly "before" and "after".
    """
    redis = RedisServer()
    instance = Instance({"NOTIFIER_BROKER_URL": redis.url, "NOTIFIER_JWT_SECRET": SECRET})
    topic = fresh()
    token = mint_token("fault-freeze")
    async with (
        redis_running(redis),
        running(instance),
        httpx.AsyncClient(timeout=10, trust_env=False) as http,
    ):
        assert redis.proc is not None
        pid = redis.proc.pid
        async with ws_connect(ws_url(instance.url, token, [topic])) as ws:
            await hello(ws)
            before = await post(http, instance.url, token, topic, "before")
            assert await next_frame(ws) == notification(before, "before")

            os.kill(pid, signal.SIGSTOP)
            frozen = time.monotonic()
            try:
                response = await http.post(
                    instance.url + "/v1/notifications",
                    json={"topic": topic, "data": "frozen"},
                    headers={"authorization": f"Bearer {token}"},
                )
                refused_in = time.monotonic() - frozen
                assert response.status_code == 503, response.text
                assert refused_in < 3.5, f"the 503 took {refused_in:.2f}s"

                async def not_ready() -> bool:
                    return await status_of(http, instance.url + "/readyz") == 503

                await eventually(
                    not_ready, "/readyz 503 while Redis is frozen", 12 - (time.monotonic() - frozen)
                )
                unready_in = time.monotonic() - frozen
                assert await metric(http, instance, BROKER_CONNECTED) == 0
                await ws.send(json.dumps({"type": "ping", "ref": "frozen"}))
                assert await next_frame(ws) == {"type": "pong", "ref": "frozen"}
            finally:
                os.kill(pid, signal.SIGCONT)
            resumed = time.monotonic()

            async def ready() -> bool:
                return await status_of(http, instance.url + "/readyz") == 200

            await eventually(ready, "/readyz 200 after SIGCONT", 30)
            ready_in = time.monotonic() - resumed
            after = await post(http, instance.url, token, topic, "after")
            assert await next_frame(ws) == notification(after, "after")
            history = await http.get(
                instance.url + f"/v1/topics/{topic}/notifications",
                headers={"authorization": f"Bearer {token}"},
            )
            assert history.status_code == 200, history.text
            assert history.json() == {
                "notifications": [notification(before, "before"), notification(after, "after")],
                "more": False,
            }
    print(
        f"\n[redis frozen] 503 after {refused_in:.2f}s; /readyz 503 after {unready_in:.2f}s frozen; "
        f"200 again {ready_in:.2f}s after SIGCONT"
    )


# -- a regression of test 1's recovery: pooled Redis connections from before a restart --------


async def test_redis_restarted_at_once_every_request_is_served_as_soon_as_ready_again() -> None:
    """Injected: redis-server SIGKILLed and restarted on the same port at once, while the
    instance holds idle pooled Redis connections (16 concurrent history reads just before).

    Sent, once /readyz is 200 again: a WebSocket handshake with ``since``, then 16 history
    reads and 16 POSTs, one after the other.

    Arrived: the handshake accepted (``hello``), every read 200, every POST 202: readiness means
    the broker serves, and recovery with ``since`` works from that moment (test 1's subscribe
    with ``since`` right after readiness depends on it).
    """
    redis = RedisServer()
    instance = Instance({"NOTIFIER_BROKER_URL": redis.url, "NOTIFIER_JWT_SECRET": SECRET})
    topic = fresh()
    token = mint_token("fault-restart")
    headers = {"authorization": f"Bearer {token}"}
    history = f"/v1/topics/{topic}/notifications"
    async with (
        redis_running(redis),
        running(instance),
        httpx.AsyncClient(timeout=10, trust_env=False) as http,
    ):
        first = await post(http, instance.url, token, topic, "before")
        reads = await asyncio.gather(*(http.get(instance.url + history, headers=headers) for _ in range(16)))
        assert {r.status_code for r in reads} == {200}

        await asyncio.to_thread(kill, redis)
        await asyncio.to_thread(redis.start)

        async def ready() -> bool:
            return await status_of(http, instance.url + "/readyz") == 200

        await eventually(ready, "/readyz 200 after the restart", 30)
        handshake = await handshake_status(ws_url(instance.url, token, [topic], since=int(first["id"])))
        statuses = [(await http.get(instance.url + history, headers=headers)).status_code for _ in range(16)]
        posts = []
        for i in range(16):
            response = await http.post(
                instance.url + "/v1/notifications", json={"topic": topic, "data": i}, headers=headers
            )
            posts.append(response.status_code)
    print(
        f"\n[quick restart] since handshake {handshake}, history reads {dict(Counter(statuses))}, "
        f"POSTs {dict(Counter(posts))}"
    )
    assert (handshake, statuses, posts) == (101, [200] * 16, [202] * 16)


async def handshake_status(url: str) -> int:
    """101 when the handshake is accepted and ``hello`` arrives, else the refusal's HTTP status."""
    try:
        async with ws_connect(url) as ws:
            await hello(ws)
            return 101
    except InvalidStatus as refusal:
        status: int = refusal.response.status_code
        return status
