"""Presence on real processes: ``GET /v1/topics/{topic}/presence`` and the join/leave events of
``presence=1`` / ``"presence": true``, on one instance (memory broker) and on two instances
sharing a real redis-server, one of them SIGKILLed; and bounded (the listing, a churning
client, Redis left clean)."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import AsyncExitStack
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
import redis.asyncio as aioredis
from conftest import SECRET, mint_token
from support import Instance, RedisServer, memory_instance
from test_faults import eventually, fresh, hello, next_frame, running, ws_connect
from websockets.asyncio.client import ClientConnection

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

Json = dict[str, Any]


@pytest.fixture(scope="module")
def instance() -> Iterator[Instance]:
    yield from memory_instance(SECRET)


@pytest.fixture(scope="module")
def redis() -> Iterator[RedisServer]:
    """A Redis of this module's own: its presence keys are only this module's instances'."""
    server = RedisServer()
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
        yield client


def token(sub: str, topics: list[str] | None = None) -> str:
    return mint_token(sub=sub, topics=topics)


def url(instance: Instance, sub: str, topics: list[str], presence: bool = False, **extra: str) -> str:
    query = {"token": token(sub), "topics": ",".join(topics), **extra}
    if presence:
        query["presence"] = "1"
    return f"{instance.ws_url}?{urlencode(query)}"


async def presence(http: httpx.AsyncClient, instance: Instance, topic: str, sub: str = "watcher") -> Json:
    answer = await http.get(
        f"{instance.url}/v1/topics/{topic}/presence", headers={"authorization": f"Bearer {token(sub)}"}
    )
    assert answer.status_code == 200, answer.text
    body: Json = answer.json()
    return body


async def listed(http: httpx.AsyncClient, instance: Instance, topic: str) -> dict[str, int]:
    body = await presence(http, instance, topic)
    return {entry["user"]: entry["connections"] for entry in body["users"]}


async def opened(stack: AsyncExitStack, address: str) -> ClientConnection:
    """A socket open until ``stack`` closes, its ``hello`` read."""
    ws = await stack.enter_async_context(ws_connect(address))
    await hello(ws)
    return ws


async def send(ws: ClientConnection, **frame: Any) -> None:
    await ws.send(json.dumps(frame))


async def event(ws: ClientConnection, timeout: float = 10) -> Json:
    """The next join or leave frame (other frames may not come in between: none are expected)."""
    frame = await next_frame(ws, timeout)
    assert frame["type"] in ("join", "leave"), frame
    return frame


async def test_the_listing_counts_connections_per_user_and_refuses_what_it_must(
    instance: Instance, http: httpx.AsyncClient
) -> None:
    room = fresh("room")
    async with AsyncExitStack() as stack:
        for sub in ("bob", "alice", "alice"):
            await opened(stack, url(instance, sub, [room]))
        await eventually(
            lambda: _listed_is(http, instance, room, {"alice": 2, "bob": 1}), "alice x2 and bob listed", 2
        )
        body = await presence(http, instance, room)
        assert body == {
            "topic": room,
            "count": 2,
            "users": [{"user": "alice", "connections": 2}, {"user": "bob", "connections": 1}],
        }
    # Every socket closed: within 2 s nobody is left.
    await eventually(lambda: _listed_is(http, instance, room, {}), "the room empty", 2)
    assert (await presence(http, instance, room))["count"] == 0

    async def status(topic: str, bearer: str | None) -> tuple[int, str]:
        headers = {"authorization": f"Bearer {bearer}"} if bearer else {}
        answer = await http.get(f"{instance.url}/v1/topics/{topic}/presence", headers=headers)
        return answer.status_code, answer.json()["detail"]

    assert (await status(room, None))[0] == 401
    no_presence = "broadcast has no presence: every connection holds it"
    assert await status("broadcast", token("x")) == (422, no_presence)
    assert (await status("bad%20name", token("x")))[0] == 422
    assert await status("user:bob", token("alice")) == (403, "not allowed to subscribe to 'user:bob'")
    assert (await status("secret", token("alice", topics=["room-*"])))[0] == 403
    publish_only = mint_token(sub="p", scopes=("publish",))
    assert await status(room, publish_only) == (403, "token lacks the 'subscribe' scope")


async def _listed_is(
    http: httpx.AsyncClient, instance: Instance, topic: str, expected: dict[str, int]
) -> bool:
    return await listed(http, instance, topic) == expected


async def test_join_and_leave_come_once_per_user_never_about_oneself(instance: Instance) -> None:
    room = fresh("room")
    async with AsyncExitStack() as stack:
        carol = await opened(stack, url(instance, "carol", [room], presence=True))
        # carol's own second socket: no event for carol (never about her own user).
        carol2 = await opened(stack, url(instance, "carol", [room]))
        alice1 = await opened(stack, url(instance, "alice", [room]))
        assert await event(carol) == {"type": "join", "topic": room, "user": "alice"}
        # alice's second tab: no event; her first tab closing: none either (one still open).
        alice2 = await opened(stack, url(instance, "alice", [room]))
        await alice1.close()
        # dave joins: the next event carol gets is his, so nothing came for alice's tabs.
        dave = await opened(stack, url(instance, "dave", [room]))
        assert await event(carol) == {"type": "join", "topic": room, "user": "dave"}
        await alice2.close()
        assert await event(carol) == {"type": "leave", "topic": room, "user": "alice"}
        # Unsubscribing is leaving too; and carol2 (her own user) closing sends her nothing.
        await send(dave, type="unsubscribe", topics=[room])
        assert (await next_frame(dave))["type"] == "unsubscribed"
        assert await event(carol) == {"type": "leave", "topic": room, "user": "dave"}
        await carol2.close()
        # A watcher that did not ask for presence hears nothing: its next frame is a notification.
        quiet = await opened(stack, url(instance, "erin", [room]))
        frank = await opened(stack, url(instance, "frank", [room]))
        assert await event(carol) == {"type": "join", "topic": room, "user": "erin"}
        assert await event(carol) == {"type": "join", "topic": room, "user": "frank"}
        await send(frank, type="publish", topic=room, data=1)
        assert (await next_frame(quiet))["type"] == "notification"


async def test_a_subscribe_frame_asks_for_presence_and_a_bad_value_is_refused(instance: Instance) -> None:
    room = fresh("room")
    async with AsyncExitStack() as stack:
        watcher = await opened(stack, url(instance, "watcher", []))
        await send(watcher, type="subscribe", topics=[room], presence="yes", ref=1)
        assert await next_frame(watcher) == {
            "type": "error", "code": "bad_request", "message": "'presence' must be true or false", "ref": 1
        }
        await send(watcher, type="subscribe", topics=[room], presence=True, ref=2)
        assert await next_frame(watcher) == {"type": "subscribed", "topics": [room], "ref": 2}
        await opened(stack, url(instance, "bob", [room]))
        assert await event(watcher) == {"type": "join", "topic": room, "user": "bob"}
    # A malformed presence value refuses the handshake, as a malformed since does.
    async with httpx.AsyncClient(trust_env=False) as http:
        query = urlencode({"token": token("bob"), "topics": room, "presence": "maybe"})
        answer = await http.get(f"{instance.url}/v1/sse?{query}")
        assert answer.status_code == 403
        assert answer.json()["detail"] == "presence must be 1 (join and leave events) or 0"


# -- two instances, one Redis -----------------------------------------------------------------


def redis_env(server: RedisServer) -> dict[str, str]:
    return {
        "NOTIFIER_BROKER_URL": f"redis://127.0.0.1:{server.port}/0",
        "NOTIFIER_JWT_SECRET": SECRET,
        "NOTIFIER_SHUTDOWN_TIMEOUT": "2",
    }


async def presence_keys(server: RedisServer) -> list[str]:
    client = aioredis.Redis(port=server.port)
    try:
        return sorted([k.decode() async for k in client.scan_iter("notifier:presence:*")])
    finally:
        await client.aclose()


async def test_two_instances_see_each_other_and_a_killed_one_leaves_within_60_s(
    redis: RedisServer, http: httpx.AsyncClient
) -> None:
    a, b = Instance(redis_env(redis)), Instance(redis_env(redis))
    room = fresh("room")
    async with running(a, b), AsyncExitStack() as stack:
        watcher = await opened(stack, url(b, "watcher", [room], presence=True))
        await opened(stack, url(a, "alice", [room]))
        assert await event(watcher) == {"type": "join", "topic": room, "user": "alice"}
        # The same user on both instances is one user with two connections, joined once.
        alice_b = await opened(stack, url(b, "alice", [room]))
        took = await eventually(
            lambda: _listed_is(http, b, room, {"alice": 2, "watcher": 1}), "alice x2 listed on b", 2
        )
        assert took < 2
        assert await listed(http, a, room) == {"alice": 2, "watcher": 1}
        await alice_b.close()
        await opened(stack, url(a, "bob", [room]))
        assert await event(watcher) == {"type": "join", "topic": room, "user": "bob"}  # none for alice

        # a dies without a goodbye: its users leave within 60 s, events included, and nothing of
        # its presence is left in Redis.
        assert a.proc is not None
        os.kill(a.proc.pid, signal.SIGKILL)
        a.proc.wait(10)
        started = time.monotonic()
        left = {(await event(watcher, 60))["user"] for _ in range(2)}
        assert time.monotonic() - started < 60
        assert left == {"alice", "bob"}
        assert await listed(http, b, room) == {"watcher": 1}
        keys = await presence_keys(redis)
        assert not [k for k in keys if "swept:" in k], keys
        node_keys = [k for k in keys if ":node:" in k]
        assert len(node_keys) == 1, keys  # b's own
        await watcher.close()
        await eventually(lambda: _listed_is(http, b, room, {}), "the room empty", 2)


async def test_a_graceful_stop_leaves_at_once_and_redis_keeps_nothing(
    redis: RedisServer, http: httpx.AsyncClient
) -> None:
    a, b = Instance(redis_env(redis)), Instance(redis_env(redis))
    room = fresh("room")
    async with running(a, b), AsyncExitStack() as stack:
        watcher = await opened(stack, url(b, "watcher", [room], presence=True))
        for sub in ("u1", "u2", "u3"):
            await opened(stack, url(a, sub, [room]))
        assert {(await event(watcher))["user"] for _ in range(3)} == {"u1", "u2", "u3"}
        await asyncio.to_thread(a.stop)  # SIGTERM: drain, then goodbye
        assert {(await event(watcher))["user"] for _ in range(3)} == {"u1", "u2", "u3"}
        assert await listed(http, b, room) == {"watcher": 1}
    # Both stopped: nothing of anybody's presence is left.
    assert await presence_keys(redis) == []


async def test_presence_comes_back_after_redis_lost_its_data(
    redis: RedisServer, http: httpx.AsyncClient
) -> None:
    """FLUSHALL (a Redis restarted without persistence, an eviction): within a heartbeat the
    instance is told the broker forgot it and sends its counts again; a listener hears the joins."""
    a = Instance(redis_env(redis))
    room = fresh("room")
    async with running(a), AsyncExitStack() as stack:
        watcher = await opened(stack, url(a, "watcher", [room], presence=True))
        await opened(stack, url(a, "alice", [room]))
        assert await event(watcher) == {"type": "join", "topic": room, "user": "alice"}
        admin = aioredis.Redis(port=redis.port)
        try:
            await admin.flushall()
        finally:
            await admin.aclose()
        assert await listed(http, a, room) == {}
        took = await eventually(
            lambda: _listed_is(http, a, room, {"alice": 1, "watcher": 1}), "presence rebuilt", 10
        )
        assert took < 10
        assert await event(watcher) == {"type": "join", "topic": room, "user": "alice"}


async def test_a_client_churning_topics_with_presence_leaves_nothing_behind(
    redis: RedisServer, http: httpx.AsyncClient
) -> None:
    """Many: one socket subscribing and unsubscribing 300 topics with presence, as fast as the
    frame rate limit lets it; the instance and Redis hold nothing of it afterwards."""
    a = Instance(redis_env(redis))
    rooms = [fresh("churn") for _ in range(300)]
    async with running(a):
        async with ws_connect(url(a, "churner", [])) as ws:
            await hello(ws)
            for start in range(0, len(rooms), 60):
                batch = rooms[start : start + 60]
                await send(ws, type="subscribe", presence=True, topics=batch)
                assert (await next_frame(ws))["type"] == "subscribed"
                gone = batch[:30] if start + 60 >= len(rooms) else batch
                await send(ws, type="unsubscribe", topics=gone)
                assert (await next_frame(ws))["type"] == "unsubscribed"
            await eventually(lambda: _listed_is(http, a, rooms[-1], {"churner": 1}), "the last room", 2)
            assert await listed(http, a, rooms[0]) == {}
        # Its socket closed: within 2 s no key of any of its topics is left in Redis.
        async def churn_keys_gone() -> bool:
            return not [k for k in await presence_keys(redis) if "churn-" in k]

        await eventually(churn_keys_gone, "no key of the churner's topics in Redis", 2)
        assert await listed(http, a, rooms[-1]) == {}


async def test_a_listing_holds_at_most_1000_users_and_counts_them_all(redis: RedisServer) -> None:
    """Huge: 1,500 users on a topic, written through the broker as instances write them."""
    from notifier.broker import create_broker

    room = fresh("crowd")
    for broker_url in ("memory://", f"redis://127.0.0.1:{redis.port}/0"):
        broker = create_broker(broker_url)
        await broker.start(lambda n: None, lambda c: None, lambda lost: None)
        try:
            await eventually(_ready(broker), "the broker connected", 10)
            users = [f"user{i:05d}" for i in range(1500)]
            for start in range(0, 1500, 250):
                await broker.presence_update([(room, u, 1) for u in users[start : start + 250]])
            state = await broker.presence(room, 1000)
            assert state.count == 1500
            assert state.users == [(u, 1) for u in users[:1000]]
            await broker.presence_update([(room, u, 0) for u in users[:250]])
            await broker.presence_update([(room, u, 0) for u in users[250:500]])
            await broker.presence_update([(room, u, 0) for u in users[500:]])
            assert (await broker.presence(room, 1000)).count == 0
            await broker.presence_goodbye()
        finally:
            await broker.close()
    assert await presence_keys(redis) == []


def _ready(broker: Any) -> Any:
    async def check() -> bool:
        try:
            await broker.presence("probe", 1)
            await broker.presence_update([])
        except Exception:  # noqa: BLE001 - not connected yet
            return False
        return True

    return check

