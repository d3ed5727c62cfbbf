"""Real ``notifier serve`` instances sharing a real redis-server, driven by real clients.

Two instances (A and B) serve the whole module; a third, small one (one connection, 1 KiB
frames) checks the limits a real uvicorn server enforces; the outage tests get their own
redis-server and instance. Every wait has a deadline.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import AsyncExitStack, asynccontextmanager
from typing import Any
from urllib.parse import urlencode

import anyio
import httpx
import pytest
import support
from conftest import SECRET, mint_token
from support import Instance, RedisServer, SlowLink, next_frame, notification, start_all, stop_all
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.slow]

DEADLINE = 10.0
PUBLISHED = "notifier_notifications_published_total"
DELIVERED = "notifier_notifications_delivered_total"
CONNECTIONS = "notifier_connections"
BROKER_CONNECTED = "notifier_broker_connected"

Json = dict[str, Any]


# -- helpers ----------------------------------------------------------------------------------


def fresh(prefix: str = "t") -> str:
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


@asynccontextmanager
async def ws_connect(
    instance: Instance, token: str | None, topics: list[str] | None = None
) -> AsyncIterator[ClientConnection]:
    query: dict[str, str] = {}
    if token is not None:
        query["token"] = token
    if topics:
        query["topics"] = ",".join(topics)
    async with connect(f"{instance.ws_url}?{urlencode(query)}", open_timeout=5, close_timeout=2) as ws:
        yield ws


async def recv(ws: ClientConnection, timeout: float = DEADLINE) -> Json:
    """The next frame, decoded; fail after ``timeout`` seconds."""
    return await next_frame(ws, timeout)


async def hello(ws: ClientConnection) -> Json:
    return await support.hello(ws, DEADLINE)


async def refused_status(instance: Instance, token: str | None, topics: list[str] | None = None) -> int:
    """The HTTP status of a handshake the server refuses (fails if it accepts)."""
    with pytest.raises(InvalidStatus) as refusal:
        async with ws_connect(instance, token, topics):
            pass
    status: int = refusal.value.response.status_code
    return status


async def post(
    http: httpx.AsyncClient,
    instance: Instance,
    token: str,
    topic: str,
    data: Any,
    key: str | None = None,
) -> Json:
    """POST one notification; it must be accepted (202)."""
    headers = {"authorization": f"Bearer {token}"}
    if key is not None:
        headers["idempotency-key"] = key
    response = await http.post(
        instance.url + "/v1/notifications", json={"topic": topic, "data": data}, headers=headers
    )
    assert response.status_code == 202, response.text
    answer: Json = response.json()
    assert set(answer) == {"id", "topic", "ts"}
    assert answer["id"].isdigit() and answer["topic"] == topic and isinstance(answer["ts"], int)
    return answer


async def metric(instance: Instance, name: str) -> float:
    return await anyio.to_thread.run_sync(instance.metric, name)


async def eventually(check: Callable[[], Awaitable[bool]], what: str, timeout: float = DEADLINE) -> None:
    try:
        with anyio.fail_after(timeout):
            while not await check():
                await asyncio.sleep(0.05)
    except TimeoutError:
        pytest.fail(f"timed out after {timeout}s waiting for {what}")


async def settled(get: Callable[[], Awaitable[Any]], expected: Any, timeout: float = 5) -> Any:
    """``get()`` once it equals ``expected``, or its last value after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        value = await get()
        if value == expected or time.monotonic() > deadline:
            return value
        await asyncio.sleep(0.05)


async def status_of(http: httpx.AsyncClient, url: str) -> int:
    try:
        return (await http.get(url, timeout=2)).status_code
    except httpx.HTTPError:
        return 0


async def no_connections(instance: Instance) -> None:
    """Wait until the instance has let go of every socket of earlier tests."""

    async def idle() -> bool:
        return await metric(instance, CONNECTIONS) == 0

    await eventually(idle, f"{instance.url} to have no open connection")


@pytest.fixture(scope="module")
def cluster(redis_server: RedisServer) -> Iterator[tuple[Instance, Instance]]:
    env = {"NOTIFIER_BROKER_URL": redis_server.url, "NOTIFIER_JWT_SECRET": SECRET}
    instances = [Instance(env), Instance(env)]
    try:
        start_all(instances)
        yield instances[0], instances[1]
    finally:
        stop_all(instances)


@pytest.fixture(scope="module")
def small(redis_server: RedisServer) -> Iterator[Instance]:
    """An instance with room for one connection and frames of at most 1024 bytes."""
    instance = Instance(
        {
            "NOTIFIER_BROKER_URL": redis_server.url,
            "NOTIFIER_JWT_SECRET": SECRET,
            "NOTIFIER_MAX_CONNECTIONS": "1",
            "NOTIFIER_MAX_MESSAGE_BYTES": "1024",
        }
    )
    try:
        instance.start()
        yield instance
    finally:
        stop_all([instance])


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10) as client:
        yield client


# -- tests ------------------------------------------------------------------------------------


async def test_both_instances_are_ready(cluster: tuple[Instance, Instance], http: httpx.AsyncClient) -> None:
    for instance in cluster:
        response = await http.get(instance.url + "/readyz")
        assert response.status_code == 200, response.text
        assert await metric(instance, BROKER_CONNECTED) == 1


async def test_notification_posted_to_a_reaches_sockets_on_both_instances_exactly_once(
    cluster: tuple[Instance, Instance], http: httpx.AsyncClient
) -> None:
    a, b = cluster
    token, topic = mint_token("alice"), fresh()
    async with ws_connect(a, token, [topic]) as on_a, ws_connect(b, token, [topic]) as on_b:
        for ws in (on_a, on_b):
            frame = await hello(ws)
            assert frame["user"] == "alice"
            assert frame["topics"] == sorted(["broadcast", "user:alice", topic])

        first = await post(http, a, token, topic, {"text": "hello from A"})
        second = await post(http, a, token, topic, "marker")
        for ws in (on_a, on_b):
            assert await recv(ws) == notification(first, {"text": "hello from A"})
            assert await recv(ws) == notification(second, "marker")  # the first came once only


async def test_hello_comes_only_once_the_subscription_is_active_cluster_wide(
    cluster: tuple[Instance, Instance], http: httpx.AsyncClient
) -> None:
    a, b = cluster
    token = mint_token("alice")
    for i in range(10):
        topic = fresh()  # a new topic each time: B must take the Redis subscription first
        async with ws_connect(b, token, [topic]) as ws:
            assert topic in (await hello(ws))["topics"]
            answer = await post(http, a, token, topic, i)
            assert await recv(ws, 5) == notification(answer, i)


async def test_hello_waits_for_the_subscription_even_over_a_slow_redis_link(
    cluster: tuple[Instance, Instance], redis_server: RedisServer, http: httpx.AsyncClient
) -> None:
    a = cluster[0]
    token = mint_token("alice")
    async with SlowLink(redis_server.port, 0.1) as link:
        slow = Instance({"NOTIFIER_BROKER_URL": link.url, "NOTIFIER_JWT_SECRET": SECRET})
        try:
            await anyio.to_thread.run_sync(slow.start)
            for i in range(3):
                topic = fresh()
                async with ws_connect(slow, token, [topic]) as ws:
                    assert topic in (await hello(ws))["topics"]
                    # Straight to Redis through A: had the slow instance's SUBSCRIBE still been on
                    # its way when hello was sent, this notification would be lost.
                    answer = await post(http, a, token, topic, i)
                    assert await recv(ws, 3) == notification(answer, i)
        finally:
            await anyio.to_thread.run_sync(stop_all, [slow])


async def test_user_topic_reaches_that_users_sockets_on_every_instance_only(
    cluster: tuple[Instance, Instance], http: httpx.AsyncClient
) -> None:
    a, b = cluster
    backend = mint_token("backend", ("publish",))
    marker = fresh("marker")
    async with AsyncExitStack() as stack:
        alice = [
            await stack.enter_async_context(ws_connect(i, mint_token("alice", ("subscribe",)), [marker]))
            for i in (a, b)
        ]
        bob = [
            await stack.enter_async_context(ws_connect(i, mint_token("bob", ("subscribe",)), [marker]))
            for i in (a, b)
        ]
        for ws, user in [(ws, "alice") for ws in alice] + [(ws, "bob") for ws in bob]:
            frame = await hello(ws)
            assert frame["user"] == user
            assert f"user:{user}" in frame["topics"]

        personal = await post(http, a, backend, "user:alice", {"for": "alice"})
        last = await post(http, b, backend, marker, "marker")
        for ws in alice:
            assert await recv(ws) == notification(personal, {"for": "alice"})
            assert await recv(ws) == notification(last, "marker")
        for ws in bob:
            # Redis delivers to a node in publish order: had bob got alice's notification, it
            # would come before the marker.
            assert await recv(ws) == notification(last, "marker")


async def test_ids_from_posts_alternating_between_instances_strictly_increase(
    cluster: tuple[Instance, Instance], http: httpx.AsyncClient
) -> None:
    token = mint_token("backend", ("publish",))
    topics = [fresh(), fresh()]
    ids = [int((await post(http, cluster[i % 2], token, topics[i // 2 % 2], i))["id"]) for i in range(20)]
    assert all(x < y for x, y in zip(ids, ids[1:], strict=False)), ids


async def test_idempotency_key_repeated_through_the_other_instance_gets_first_answer_and_delivers_once(
    cluster: tuple[Instance, Instance], http: httpx.AsyncClient
) -> None:
    a, b = cluster
    token, other_user = mint_token("svc"), mint_token("other-svc")
    topic, key = fresh(), uuid.uuid4().hex
    async with ws_connect(a, token, [topic]) as ws:
        await hello(ws)
        first = await post(http, a, token, topic, {"v": 1}, key)
        again = await post(http, b, token, topic, {"v": 2}, key)
        assert again == first
        # The key belongs to its sub: another user's same key is another notification.
        theirs = await post(http, b, other_user, topic, {"v": 3}, key)
        assert int(theirs["id"]) > int(first["id"])
        last = await post(http, a, token, topic, "marker")

        assert await recv(ws) == notification(first, {"v": 1})
        assert await recv(ws) == notification(theirs, {"v": 3})
        assert await recv(ws) == notification(last, "marker")


@pytest.mark.parametrize(
    ("case", "token", "topics"),
    [
        ("bad signature", mint_token("alice", secret="not-the-secret-0123456789abcdef0123"), None),
        ("expired", mint_token("alice", ttl=-60), None),
        ("missing", None, None),
        ("no subscribe scope", mint_token("alice", ("publish",)), None),
        ("another user's topic", mint_token("alice"), ["user:bob"]),
        ("topic outside the claim", mint_token("alice", topics=["room:*"]), ["news"]),
        ("malformed topic", mint_token("alice"), ["no spaces allowed"]),
    ],
)
async def test_refused_handshake_is_http_403(
    cluster: tuple[Instance, Instance], case: str, token: str | None, topics: list[str] | None
) -> None:
    assert await refused_status(cluster[1], token, topics) == 403, case


async def test_handshake_beyond_max_connections_is_http_503(small: Instance) -> None:
    await no_connections(small)
    token = mint_token("alice")
    async with ws_connect(small, token) as first:
        await hello(first)
        assert await refused_status(small, token) == 503
        await first.send(json.dumps({"type": "ping", "ref": 1}))
        assert await recv(first) == {"type": "pong", "ref": 1}  # the open one is untouched

    await no_connections(small)  # its slot is free again
    async with ws_connect(small, token) as again:
        await hello(again)


async def test_binary_frame_closes_with_1003(small: Instance) -> None:
    await no_connections(small)
    async with ws_connect(small, mint_token("alice")) as ws:
        await hello(ws)
        await ws.send(b"\x00\x01binary")
        with anyio.fail_after(DEADLINE):
            await ws.wait_closed()
        assert ws.close_code == 1003


async def test_frame_over_max_message_bytes_closes_with_1009(small: Instance) -> None:
    await no_connections(small)
    async with ws_connect(small, mint_token("alice")) as ws:
        await hello(ws)
        head = '{"type":"ping","ref":"'
        at_limit = head + "x" * (1024 - len(head) - 2) + '"}'
        assert len(at_limit.encode()) == 1024
        await ws.send(at_limit)  # exactly the limit is still fine
        assert (await recv(ws))["type"] == "pong"

        await ws.send(head + "x" * 2000 + '"}')
        with anyio.fail_after(DEADLINE):
            await ws.wait_closed()
        assert ws.close_code == 1009


async def test_metrics_count_what_each_instance_published_and_delivered(
    cluster: tuple[Instance, Instance], http: httpx.AsyncClient
) -> None:
    a, b = cluster
    for instance in cluster:
        await no_connections(instance)
    before = {i.port: (await metric(i, PUBLISHED), await metric(i, DELIVERED)) for i in cluster}
    token, topic = mint_token("alice"), fresh()
    async with AsyncExitStack() as stack:
        sockets = {
            a: [await stack.enter_async_context(ws_connect(a, token, [topic]))],
            b: [await stack.enter_async_context(ws_connect(b, token, [topic])) for _ in range(2)],
        }
        every = sockets[a] + sockets[b]
        for ws in every:
            await hello(ws)
        answers = [await post(http, (a, b, a, b, a)[i], token, topic, i) for i in range(5)]
        for ws in every:
            assert [await recv(ws) for _ in answers] == [notification(x, i) for i, x in enumerate(answers)]

        expected = {a.port: (3.0, 5.0), b.port: (2.0, 10.0)}  # 3 + 2 posts; 1 and 2 sockets x 5

        async def deltas() -> dict[int, tuple[float, float]]:
            return {
                i.port: (
                    await metric(i, PUBLISHED) - before[i.port][0],
                    await metric(i, DELIVERED) - before[i.port][1],
                )
                for i in cluster
            }

        # A frame is counted just after it is written: give the counters a moment to catch up.
        assert await settled(deltas, expected) == expected


async def test_redis_outage_keeps_sockets_open_and_delivery_resumes() -> None:
    # A dedicated server and instance: the others must not see the outage. Durable, as the
    # deployment's is: a Redis that comes back without its data cannot vouch that nothing was
    # missed, and then the sockets get 1012 instead (test_hardening covers that case).
    server = RedisServer(durable=True)
    await anyio.to_thread.run_sync(server.start)
    instance = Instance({"NOTIFIER_BROKER_URL": server.url, "NOTIFIER_JWT_SECRET": SECRET})
    try:
        await anyio.to_thread.run_sync(instance.start)
        token, topic = mint_token("alice"), fresh()
        async with httpx.AsyncClient(timeout=10) as http, ws_connect(instance, token, [topic]) as ws:
            await hello(ws)
            before = await post(http, instance, token, topic, "before")
            assert await recv(ws) == notification(before, "before")

            await anyio.to_thread.run_sync(server.stop)
            started = time.monotonic()
            response = await http.post(
                instance.url + "/v1/notifications",
                json={"topic": topic, "data": "lost"},
                headers={"authorization": f"Bearer {token}"},
            )
            elapsed = time.monotonic() - started
            assert response.status_code == 503, response.text
            assert elapsed < 3.5, f"the 503 took {elapsed:.2f}s"

            async def not_ready() -> bool:
                return await status_of(http, instance.url + "/readyz") == 503

            await eventually(not_ready, "/readyz to answer 503", 5)
            assert await metric(instance, BROKER_CONNECTED) == 0
            await ws.send(json.dumps({"type": "ping", "ref": "outage"}))
            assert await recv(ws) == {"type": "pong", "ref": "outage"}

            await anyio.to_thread.run_sync(server.start)  # the same port again

            async def ready() -> bool:
                return await status_of(http, instance.url + "/readyz") == 200

            await eventually(ready, "/readyz to answer 200 again", 20)
            assert await metric(instance, BROKER_CONNECTED) == 1
            after = await post(http, instance, token, topic, "after")
            # The next frame is the one after the outage: the refused POST was never delivered.
            assert await recv(ws) == notification(after, "after")
            assert int(after["id"]) > int(before["id"])  # ids keep increasing across the outage
    finally:
        await anyio.to_thread.run_sync(stop_all, [instance])
        await anyio.to_thread.run_sync(server.stop)


async def test_post_answered_503_while_redis_stalls_is_never_delivered() -> None:
    """A Redis that hangs (here: SIGSTOP) rather than dies: the 503 still means nothing accepted."""
    server = RedisServer()
    await anyio.to_thread.run_sync(server.start)
    assert server.proc is not None
    pid = server.proc.pid
    instance = Instance({"NOTIFIER_BROKER_URL": server.url, "NOTIFIER_JWT_SECRET": SECRET})
    frozen = False
    try:
        await anyio.to_thread.run_sync(instance.start)
        token, topic = mint_token("alice"), fresh()
        async with httpx.AsyncClient(timeout=10) as http, ws_connect(instance, token, [topic]) as ws:
            await hello(ws)
            before = await post(http, instance, token, topic, "before")
            assert await recv(ws) == notification(before, "before")

            os.kill(pid, signal.SIGSTOP)
            frozen = True
            started = time.monotonic()
            response = await http.post(
                instance.url + "/v1/notifications",
                json={"topic": topic, "data": "refused"},
                headers={"authorization": f"Bearer {token}"},
            )
            elapsed = time.monotonic() - started
            assert response.status_code == 503, response.text
            assert elapsed < 3.5, f"the 503 took {elapsed:.2f}s"

            os.kill(pid, signal.SIGCONT)
            frozen = False

            async def accepted_again() -> bool:
                return (
                    await http.post(
                        instance.url + "/v1/notifications",
                        json={"topic": fresh("probe"), "data": None},
                        headers={"authorization": f"Bearer {token}"},
                    )
                ).status_code == 202

            await eventually(accepted_again, "POST to be accepted again", 15)
            after = await post(http, instance, token, topic, "after")
            # The refused notification must not surface once Redis resumes.
            assert await recv(ws) == notification(after, "after")
    finally:
        if frozen:
            os.kill(pid, signal.SIGCONT)
        await anyio.to_thread.run_sync(stop_all, [instance])
        await anyio.to_thread.run_sync(server.stop)
