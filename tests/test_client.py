"""The Python client (``notifier.client``) and the ``publish`` / ``subscribe`` / ``presence`` commands
against real instances: reconnection across a restart with ``since`` loses nothing, presence
events reach the iterator, errors are clear.

Every wait has a deadline; frames are read through a queue fed by a reader task.
"""

from __future__ import annotations

import asyncio
import json
import os
import queue
import select
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from pathlib import Path
from typing import IO, Any

import httpx
import pytest
from conftest import SECRET, mint_token
from support import ROOT, Instance, RedisServer, free_port, notification, wait_until

from notifier.client import (
    Client,
    ClientError,
    Presence,
    PresentUser,
    Subscription,
    presence,
    publish,
    subscribe,
)

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

DEADLINE = 15.0
Frame = dict[str, Any]


# -- helpers ----------------------------------------------------------------------------------


def instance_env(broker_url: str = "memory://") -> dict[str, str]:
    return {
        "NOTIFIER_BROKER_URL": broker_url,
        "NOTIFIER_JWT_SECRET": SECRET,
        "NOTIFIER_SHUTDOWN_TIMEOUT": "2",
    }


@contextmanager
def running(*instances: Instance) -> Iterator[None]:
    try:
        for instance in instances:
            instance.start()
        yield
    finally:
        for instance in instances:
            instance.stop()
            instance.log.close()
            os.unlink(instance.log.name)


class Reader:
    """Iterates a subscription in a task; the test takes frames with a deadline."""

    def __init__(self, subscription: Subscription) -> None:
        self.subscription = subscription
        self.frames: asyncio.Queue[Frame | BaseException] = asyncio.Queue()
        self.task = asyncio.create_task(self._pump())

    async def _pump(self) -> None:
        try:
            async for frame in self.subscription:
                self.frames.put_nowait(frame)
        except Exception as exc:  # noqa: BLE001 - handed to the test
            self.frames.put_nowait(exc)

    async def next(self, timeout: float = DEADLINE) -> Frame:
        item = await asyncio.wait_for(self.frames.get(), timeout)
        if isinstance(item, BaseException):
            raise item
        return item

    async def connected(self, timeout: float = DEADLINE) -> None:
        await asyncio.wait_for(self.subscription.connected.wait(), timeout)


@asynccontextmanager
async def reading(subscription: Subscription) -> AsyncIterator[Reader]:
    reader = Reader(subscription)
    try:
        yield reader
    finally:
        reader.task.cancel()
        await asyncio.gather(reader.task, return_exceptions=True)
        await subscription.aclose()


@pytest.fixture(scope="module")
def server() -> Iterator[Instance]:
    instance = Instance(instance_env())
    with running(instance):
        yield instance


@pytest.fixture(scope="module")
def redis_pair(redis_server: RedisServer) -> Iterator[tuple[Instance, Instance]]:
    """Two instances on one real Redis: a test may restart the first (it leaves it running)."""
    first, other = Instance(instance_env(redis_server.url)), Instance(instance_env(redis_server.url))
    with running(first, other):
        yield first, other


@pytest.fixture
def token() -> str:
    return mint_token("alice")


# -- Python client ----------------------------------------------------------------------------


async def test_subscribe_yields_each_published_notification(server: Instance, token: str) -> None:
    async with Client(server.url, token) as client, reading(client.subscribe(["py:news"])) as reader:
        await reader.connected()
        assert {"broadcast", "user:alice", "py:news"} <= set(reader.subscription.topics)
        sent = [await client.publish("py:news", data) for data in ({"n": 1}, None, "text")]
        for answer, data in zip(sent, ({"n": 1}, None, "text"), strict=True):
            assert await reader.next() == notification(answer, data)
        assert reader.subscription.last_id == sent[-1]["id"]


async def test_module_level_publish_and_subscribe_keep_their_signatures(server: Instance, token: str) -> None:
    async with reading(subscribe(server.url, token, ["py:short"])) as reader:
        await reader.connected()
        answer = await publish(server.url, token, "py:short", [1, 2])
        assert set(answer) == {"id", "topic", "ts"} and answer["topic"] == "py:short"
        assert await reader.next() == notification(answer, [1, 2])


async def test_subscribe_with_since_first_replays_what_came_after_it(server: Instance, token: str) -> None:
    async with Client(server.url, token) as client:
        first, second, third = [await client.publish("py:since", n) for n in (1, 2, 3)]
        async with reading(client.subscribe(["py:since"], since=first["id"])) as reader:
            assert await reader.next() == notification(second, 2)
            assert await reader.next() == notification(third, 3)
            assert reader.subscription.recovered is True


async def test_publish_with_a_repeated_idempotency_key_gets_the_first_answer(
    server: Instance, token: str
) -> None:
    async with Client(server.url, token) as client:
        key = f"key-{time.monotonic_ns()}"
        first = await client.publish("py:idem", {"n": 1}, idempotency_key=key)
        again = await client.publish("py:idem", {"n": 2}, idempotency_key=key)
        assert again == first
        assert [n["data"] for n in await client.history("py:idem")] == [{"n": 1}]


async def test_history_returns_retained_notifications_oldest_first(server: Instance, token: str) -> None:
    async with Client(server.url, token) as client:
        sent = [await client.publish("py:history", n) for n in range(4)]
        assert [n["id"] for n in await client.history("py:history")] == [a["id"] for a in sent]
        after = await client.history("py:history", since=sent[0]["id"], limit=2)
        assert [n["data"] for n in after] == [1, 2]


async def test_publish_refused_raises_client_error_with_the_status(server: Instance) -> None:
    bad = mint_token("alice", secret="not-the-secret-0123456789abcdef0123")
    with pytest.raises(ClientError, match="401") as refused:
        await publish(server.url, bad, "news", 1)
    assert refused.value.status == 401
    assert refused.value.detail is not None and refused.value.detail.startswith("invalid token: ")
    reader_only = mint_token("alice", ("subscribe",))
    with pytest.raises(ClientError, match="403") as forbidden:
        await publish(server.url, reader_only, "news", 1)
    assert forbidden.value.status == 403
    assert forbidden.value.detail == "token lacks the 'publish' scope"
    assert str(forbidden.value) == "403 Forbidden: token lacks the 'publish' scope"


async def test_history_refused_carries_the_servers_reason(server: Instance) -> None:
    writer_only = mint_token("alice", ("publish",))
    async with Client(server.url, writer_only) as client:
        with pytest.raises(ClientError) as refused:
            await client.history("news")
    assert refused.value.status == 403 and refused.value.detail == "token lacks the 'subscribe' scope"
    assert str(refused.value) == "403 Forbidden: token lacks the 'subscribe' scope"


async def test_publish_to_an_unreachable_server_raises_client_error() -> None:
    with pytest.raises(ClientError, match="cannot reach") as unreachable:
        await publish(f"http://127.0.0.1:{free_port()}", mint_token(), "news", 1)
    assert unreachable.value.status is None


async def test_subscribe_with_a_refused_token_raises_client_error_403(server: Instance) -> None:
    bad = mint_token("alice", secret="not-the-secret-0123456789abcdef0123")
    with pytest.raises(ClientError, match="403") as refused:
        async with asyncio.timeout(DEADLINE):
            await anext(subscribe(server.url, bad, ["news"]))
    assert refused.value.status == 403
    assert refused.value.detail is not None and refused.value.detail.startswith("invalid token: ")
    assert str(refused.value) == f"handshake refused: HTTP 403: {refused.value.detail}"


async def test_subscribe_to_a_topic_not_allowed_raises_client_error_403(server: Instance) -> None:
    limited = mint_token("alice", ("subscribe",), topics=["room:*"])
    with pytest.raises(ClientError, match="403"):
        async with asyncio.timeout(DEADLINE):
            await anext(subscribe(server.url, limited, ["news"]))


async def test_subscribe_to_an_unreachable_server_raises_client_error() -> None:
    with pytest.raises(ClientError, match="cannot reach"):
        async with asyncio.timeout(DEADLINE):
            await anext(subscribe(f"http://127.0.0.1:{free_port()}", mint_token(), ["news"]))


async def test_subscribe_stops_with_client_error_when_its_token_expires(server: Instance) -> None:
    short = mint_token("alice", ttl=2)
    async with reading(subscribe(server.url, short, ["py:expiry"])) as reader:
        with pytest.raises(ClientError, match="token expired"):
            await reader.next(timeout=DEADLINE)


async def test_subscribe_with_get_token_refreshes_before_exp_and_keeps_its_connection(
    server: Instance,
) -> None:
    ttl = 3
    first = mint_token("alice", ttl=ttl)
    expires = time.time() + ttl
    calls: list[float] = []

    async def get_token() -> str:
        calls.append(time.time())
        return mint_token("alice", ttl=3600)

    async with Client(server.url, first, get_token=get_token) as client:
        async with reading(client.subscribe(["py:refresh"])) as reader:
            await reader.connected()
            # The old token's exp has to pass to show that the server did not close (1008).
            async with asyncio.timeout(DEADLINE):
                while time.time() < expires + 1.0:
                    await asyncio.sleep(0.1)
            assert calls and calls[0] < expires, "get_token is called before exp"
            answer = await client.publish("py:refresh", "still here")
            assert await reader.next() == notification(answer, "still here")
            assert reader.subscription.connections == 1, "the same connection, refreshed"


@pytest.mark.redis
async def test_subscribe_resumes_after_its_instance_restarts_on_the_same_port_losing_nothing(
    redis_pair: tuple[Instance, Instance],
) -> None:
    first, other = redis_pair
    token = mint_token("carol")
    sub = Subscription(first.url, token, ["py:restart"], min_delay=0.1, max_delay=0.5)
    async with Client(other.url, token) as via_other, reading(sub) as reader:
        await reader.connected()
        before = await via_other.publish("py:restart", "before")
        assert await reader.next() == notification(before, "before")

        await asyncio.to_thread(first.stop)  # SIGTERM: drains with 1001
        async with asyncio.timeout(DEADLINE):
            while sub.connected.is_set():
                await asyncio.sleep(0.02)
        away = [await via_other.publish("py:restart", f"away {n}") for n in range(3)]
        await asyncio.to_thread(first.start)  # the same port

        for n, answer in enumerate(away):
            assert await reader.next() == notification(answer, f"away {n}")
        after = await via_other.publish("py:restart", "after")
        assert await reader.next() == notification(after, "after")
        assert sub.connections == 2 and sub.recovered is True
        assert reader.frames.empty(), "no duplicate"


# -- presence ---------------------------------------------------------------------------------


def unique(prefix: str) -> str:
    """A topic or user name no other test (nor an earlier run on the same server) uses."""
    return f"{prefix}{uuid.uuid4().hex[:8]}"


async def presence_becomes(client: Client, topic: str, expected: Presence) -> None:
    """Wait (with a deadline) until the presence of ``topic`` is ``expected``: the server sends
    its counts to the broker a moment after a connection opens or closes."""
    last: Presence | None = None
    try:
        async with asyncio.timeout(DEADLINE):
            while (last := await client.presence(topic)) != expected:
                await asyncio.sleep(0.02)
    except TimeoutError:
        raise AssertionError(f"presence of {topic!r} is {last}, not {expected} after {DEADLINE}s") from None


@asynccontextmanager
async def connected(url: str, user: str, topic: str) -> AsyncIterator[Reader]:
    """One connection of ``user`` subscribed to ``topic`` (no presence events), open inside."""
    async with reading(subscribe(url, mint_token(user), [topic])) as reader:
        await reader.connected()
        yield reader


async def test_presence_lists_the_users_of_a_topic_with_their_connection_counts(server: Instance) -> None:
    topic, bob, carol = unique("py:presence:"), unique("bob"), unique("carol")
    async with Client(server.url, mint_token("alice", ("subscribe",))) as client:
        assert await client.presence(topic) == Presence(topic, 0, ())
        async with connected(server.url, bob, topic), connected(server.url, bob, topic):
            async with connected(server.url, carol, topic):
                both = Presence(topic, 2, (PresentUser(bob, 2), PresentUser(carol, 1)))
                await presence_becomes(client, topic, both)
                assert await presence(server.url, client.token, topic) == both  # the shortcut
            await presence_becomes(client, topic, Presence(topic, 1, (PresentUser(bob, 2),)))
        await presence_becomes(client, topic, Presence(topic, 0, ()))


async def test_presence_refused_raises_client_error_with_the_servers_reason(server: Instance) -> None:
    limited = mint_token("alice", ("subscribe",), topics=["room:*"])
    async with Client(server.url, limited) as client:
        with pytest.raises(ClientError) as forbidden:
            await client.presence("news")
        assert forbidden.value.status == 403 and forbidden.value.detail
        assert str(forbidden.value) == f"403 Forbidden: {forbidden.value.detail}"
        with pytest.raises(ClientError) as broadcast:
            await client.presence("broadcast")
        assert broadcast.value.status == 422 and broadcast.value.detail
        assert str(broadcast.value).startswith("422 Unprocessable")
    async with Client(server.url, mint_token("alice", ("publish",))) as writer_only:
        with pytest.raises(ClientError) as no_scope:
            await writer_only.presence("news")
        assert no_scope.value.status == 403 and "subscribe" in (no_scope.value.detail or "")


async def test_subscribe_with_presence_yields_join_and_leave_of_other_users_never_its_own(
    server: Instance,
) -> None:
    topic, alice, bob, dave = unique("py:joins:"), unique("alice"), unique("bob"), unique("dave")
    backend = Client(server.url, mint_token("backend"))
    async with backend as client, connected(server.url, dave, topic) as plain:
        # dave was there before: the watcher gets no join of his (only changes after it subscribed).
        await presence_becomes(client, topic, Presence(topic, 1, (PresentUser(dave, 1),)))
        watcher = Subscription(server.url, mint_token(alice), [topic], presence=True)
        async with reading(watcher) as events:
            await events.connected()
            # Its own connection made alice present: that join (and the one of a second
            # connection of hers, which changes nothing) must not come. Events come in the order
            # they happened, so bob's join being the first frame shows it.
            async with connected(server.url, alice, topic):
                async with connected(server.url, bob, topic):
                    assert await events.next() == {"type": "join", "topic": topic, "user": bob}
                    async with connected(server.url, bob, topic):  # a second tab: no event
                        pass
                assert await events.next() == {"type": "leave", "topic": topic, "user": bob}
            # A subscriber without presence got none of it: the marker is its first frame.
            marker = await client.publish(topic, "marker")
            assert await plain.next() == notification(marker, "marker")
            assert await events.next() == notification(marker, "marker")
            assert events.frames.empty() and plain.frames.empty()


async def test_subscribe_with_presence_asks_for_it_again_when_it_reconnects() -> None:
    instance = Instance(instance_env())
    topic, bob = unique("py:rejoin:"), unique("bob")
    with running(instance):
        watcher = Subscription(instance.url, mint_token("alice"), [topic], presence=True, min_delay=0.1)
        async with reading(watcher) as events:
            await events.connected()
            await asyncio.to_thread(instance.stop)  # drains: 1001, then reconnect attempts
            await asyncio.to_thread(instance.start)  # the same port
            async with asyncio.timeout(DEADLINE):
                while watcher.connections < 2 or not watcher.connected.is_set():
                    await asyncio.sleep(0.02)
            async with connected(instance.url, bob, topic):
                assert await events.next() == {"type": "join", "topic": topic, "user": bob}
            assert await events.next() == {"type": "leave", "topic": topic, "user": bob}


# -- command line -----------------------------------------------------------------------------


def cli_env(**variables: str) -> dict[str, str]:
    """No ``NOTIFIER_*`` but ``variables``; this tree's package first, whatever is installed."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOTIFIER_")}
    path = os.pathsep.join(p for p in (str(ROOT), env.get("PYTHONPATH", "")) if p)
    return {**env, "PYTHONPATH": path, **variables}


def cli(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "notifier", *args],
        cwd=cwd, env=env or cli_env(), capture_output=True, text=True, timeout=30,
    )  # fmt: skip


def one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert result.stdout == ""
    return lines[0]


class Command:
    """A running ``notifier`` command; its stdout lines are taken with a deadline."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "notifier", *args], cwd=cwd, env=env, text=True,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True,
        )  # fmt: skip
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.lines: queue.Queue[str | None] = queue.Queue()
        self.errors: list[str | None] = []
        self.pumps = [
            threading.Thread(target=self._pump, args=(self.proc.stdout, self.lines.put), daemon=True),
            threading.Thread(target=self._pump, args=(self.proc.stderr, self.errors.append), daemon=True),
        ]
        for pump in self.pumps:
            pump.start()

    @staticmethod
    def _pump(pipe: IO[str], put: Any) -> None:
        try:
            for line in pipe:
                put(line)
        except ValueError:  # the test closed the pipe (a reader that leaves)
            pass
        put(None)

    def line(self, timeout: float = DEADLINE) -> str:
        try:
            line = self.lines.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no output line within {timeout}s; stderr: {self.stderr()!r}")
        assert line is not None, f"the output ended; stderr: {self.stderr()!r}"
        return line

    def stderr(self) -> str:
        return "".join(e for e in self.errors if e)

    def signal(self, signum: int) -> int:
        os.killpg(self.proc.pid, signum)
        return self.proc.wait(DEADLINE)

    def close(self) -> None:
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
        for pump in self.pumps:
            pump.join(5)
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@contextmanager
def command(args: list[str], cwd: Path, env: dict[str, str]) -> Iterator[Command]:
    started = Command(args, cwd, env)
    try:
        yield started
    finally:
        started.close()


def cli_publish(url: str, topic: str, data: Any, cwd: Path) -> Frame:
    result = cli("publish", topic, json.dumps(data), "--url", url, "--token", mint_token("backend"), cwd=cwd)
    assert result.returncode == 0, result.stderr
    answer: Frame = json.loads(result.stdout)
    return answer


def post(url: str, topic: str, data: Any) -> Frame:
    """Publish straight over HTTP (quicker than a command) where the command is not under test."""
    response = httpx.post(
        url + "/v1/notifications",
        json={"topic": topic, "data": data},
        headers={"authorization": f"Bearer {mint_token('backend')}"},
        timeout=10,
    )
    assert response.status_code == 202, response.text
    answer: Frame = response.json()
    return answer


def test_cli_publish_prints_the_answer_and_subscribe_prints_it_as_one_json_line(
    server: Instance, tmp_path: Path
) -> None:
    env = cli_env(NOTIFIER_URL=server.url, NOTIFIER_TOKEN=mint_token("dave"))
    wait_until(lambda: server.metric("notifier_connections") == 0, DEADLINE, "no open connection")
    with command(["subscribe", "cli:news", "cli:other"], tmp_path, env) as sub:
        wait_until(lambda: server.metric("notifier_connections") == 1, DEADLINE, "the subscriber to connect")
        answer = cli_publish(server.url, "cli:news", {"a": 1}, tmp_path)
        assert set(answer) == {"id", "topic", "ts"}
        assert json.loads(sub.line()) == notification(answer, {"a": 1})
        # Ctrl-C: a quiet exit.
        assert sub.signal(signal.SIGINT) == 130
        assert sub.stderr() == ""


def test_cli_subscribe_since_prints_what_came_after_it_then_live_ones(
    server: Instance, tmp_path: Path
) -> None:
    first, second = (post(server.url, "cli:since", n) for n in (1, 2))
    env = cli_env(NOTIFIER_URL=server.url, NOTIFIER_TOKEN=mint_token("erin"))
    with command(["subscribe", "cli:since", "--since", first["id"]], tmp_path, env) as sub:
        assert json.loads(sub.line()) == notification(second, 2)
        third = post(server.url, "cli:since", 3)
        assert json.loads(sub.line()) == notification(third, 3)


@pytest.mark.redis
def test_cli_subscribe_reconnects_after_a_restart_and_prints_what_it_missed(
    redis_pair: tuple[Instance, Instance], tmp_path: Path
) -> None:
    first, other = redis_pair
    wait_until(lambda: first.metric("notifier_connections") == 0, DEADLINE, "no open connection")
    env = cli_env(NOTIFIER_URL=first.url, NOTIFIER_TOKEN=mint_token("frank"))
    with command(["subscribe", "cli:restart"], tmp_path, env) as sub:
        wait_until(lambda: first.metric("notifier_connections") == 1, DEADLINE, "the subscriber")
        before = post(other.url, "cli:restart", "before")
        assert json.loads(sub.line()) == notification(before, "before")
        first.stop()
        away = post(other.url, "cli:restart", "away")
        first.start()
        # Its backoff doubles from 0.5 s while the instance is down: allow for a late attempt.
        assert json.loads(sub.line(timeout=2 * DEADLINE)) == notification(away, "away")
        after = post(first.url, "cli:restart", "after")
        assert json.loads(sub.line()) == notification(after, "after")
        assert sub.proc.poll() is None
        assert "reconnecting" in sub.stderr() and "Traceback" not in sub.stderr()


def test_cli_subscribe_piped_into_a_reader_that_leaves_exits_quietly(
    server: Instance, tmp_path: Path
) -> None:
    """``notifier subscribe topic | head -1``: once the reader is gone, exit 0 without a traceback."""
    env = cli_env(NOTIFIER_URL=server.url, NOTIFIER_TOKEN=mint_token("gina"))
    wait_until(lambda: server.metric("notifier_connections") == 0, DEADLINE, "no open connection")
    read_end, write_end = os.pipe()
    proc = subprocess.Popen(
        [sys.executable, "-m", "notifier", "subscribe", "cli:pipe"], cwd=tmp_path, env=env,
        stdout=write_end, stderr=subprocess.PIPE, text=True, start_new_session=True,
    )  # fmt: skip
    os.close(write_end)
    try:
        wait_until(lambda: server.metric("notifier_connections") == 1, DEADLINE, "the subscriber to connect")
        post(server.url, "cli:pipe", 1)
        ready, _, _ = select.select([read_end], [], [], DEADLINE)
        assert ready and os.read(read_end, 65536).endswith(b"\n")
        os.close(read_end)  # the reader leaves
        read_end = -1
        post(server.url, "cli:pipe", 2)
        assert proc.wait(DEADLINE) == 0
        assert proc.stderr is not None
        assert proc.stderr.read() == ""
    finally:
        if read_end >= 0:
            os.close(read_end)
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(5)
        if proc.stderr is not None:
            proc.stderr.close()


@pytest.mark.parametrize(
    "args",
    [
        ["publish", "news"],
        ["publish", "bad topic", "1"],
        ["publish", "news", "{not json"],
        ["subscribe"],
        ["subscribe", "news", "--since", "abc"],
        ["subscribe", "bad/topic"],
        ["subscribe", "news", "--url", "ftp://example"],
        ["publish", "news", "1", "--unknown"],
        ["presence"],
        ["presence", "bad topic"],
        ["presence", "news", "other"],
        ["presence", "news", "--url", "ftp://example"],
    ],
)
def test_cli_bad_arguments_fail_with_one_line(args: list[str], tmp_path: Path) -> None:
    result = cli(*args, "--token", mint_token(), cwd=tmp_path)
    assert result.returncode == 2
    one_error_line(result)


def test_cli_subscribe_without_the_subscribe_scope_fails_with_one_line_saying_403(
    server: Instance, tmp_path: Path
) -> None:
    token = mint_token("backend", ("publish",))
    assert "403" in one_error_line(
        cli("subscribe", "news", "--url", server.url, "--token", token, cwd=tmp_path)
    )


def test_cli_publish_without_the_publish_scope_fails_with_one_line_saying_403(
    server: Instance, tmp_path: Path
) -> None:
    token = mint_token("reader", ("subscribe",))
    result = cli("publish", "news", "1", "--url", server.url, "--token", token, cwd=tmp_path)
    assert "403" in one_error_line(result)


def test_cli_subscribe_whose_token_expires_fails_with_one_line(server: Instance, tmp_path: Path) -> None:
    token = mint_token("hank", ttl=2)
    result = cli("subscribe", "news", "--url", server.url, "--token", token, cwd=tmp_path)
    assert "token expired" in one_error_line(result)
