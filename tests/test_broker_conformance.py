"""One conformance suite every broker passes: the in-process broker, Redis on a real redis-server,
and Redis behind Sentinel (a real master, replica and three sentinels).

Each test runs against every broker (ids ``memory``, ``redis`` and ``sentinel``); the tests that
need two nodes or an outage exist for Redis only (a Sentinel failover: tests/test_sentinel.py).
Every wait has a deadline; absence is proven with a marker published after the notification
that must not arrive, never with a sleep.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import pytest
from redis.asyncio import Redis
from support import RedisServer, SentinelSet, SlowLink
from support_cluster import ClusterSet

from notifier import redis_presence
from notifier.auth import Principal
from notifier.broker import CONTROL_TOPIC, Broker, create_broker
from notifier.broker_memory import MemoryBroker
from notifier.broker_redis import RedisBroker
from notifier.errors import BrokerUnavailable
from notifier.hub import Connection
from notifier.metrics import Metrics
from notifier.node import Node
from notifier.protocol import Accepted, Notification

pytestmark = pytest.mark.anyio

DEADLINE = 10.0
CHANNEL_PREFIX = "notifier:topic:"  # the Redis channel of a topic (checked with PUBSUB NUMSUB)

MakeBroker = Callable[[], Broker]


# -- helpers ----------------------------------------------------------------------------------


def fresh(prefix: str = "t") -> str:
    """A topic name no other test (or earlier run on the shared redis-server) uses."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"


def now_ms() -> int:
    return int(time.time() * 1000)


def encoded(data: Any) -> bytes:
    return json.dumps(data, ensure_ascii=False).encode()


async def eventually(check: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
    """Poll ``check`` until it holds; fail with ``what`` after ``timeout`` seconds."""
    try:
        with anyio.fail_after(timeout):
            while not check():
                await asyncio.sleep(0.01)
    except TimeoutError:
        pytest.fail(f"timed out after {timeout}s waiting for {what}")


async def eventually_async(
    check: Callable[[], Awaitable[bool]], what: str, timeout: float = DEADLINE
) -> None:
    try:
        with anyio.fail_after(timeout):
            while not await check():
                await asyncio.sleep(0.02)
    except TimeoutError:
        pytest.fail(f"timed out after {timeout}s waiting for {what}")


class Inbox:
    """What a broker hands back through its callbacks: notifications and state changes."""

    def __init__(self) -> None:
        self.notifications: list[Notification] = []
        self.states: list[bool] = []
        self.resyncs: list[list[str]] = []  # topics named lost, per rebuild of the subscriptions
        self._changed = asyncio.Event()

    def on_notification(self, notification: Notification) -> None:
        self.notifications.append(notification)
        self._changed.set()

    def on_state(self, connected: bool) -> None:
        self.states.append(connected)
        self._changed.set()

    def on_resync(self, lost: list[str]) -> None:
        self.resyncs.append(lost)
        self._changed.set()

    def of(self, topic: str) -> list[Notification]:
        return [n for n in self.notifications if n.topic == topic]

    def frames(self, topic: str) -> list[dict[str, Any]]:
        return [json.loads(n.frame) for n in self.of(topic)]

    async def wait_for(self, check: Callable[[], bool], what: str, timeout: float = DEADLINE) -> None:
        """Wait (woken by each callback) until ``check`` holds; fail after ``timeout`` seconds."""
        try:
            with anyio.fail_after(timeout):
                while not check():
                    self._changed.clear()
                    await self._changed.wait()
        except TimeoutError:
            pytest.fail(f"timed out after {timeout}s waiting for {what}")

    async def wait_count(self, topic: str, count: int, timeout: float = DEADLINE) -> list[Notification]:
        await self.wait_for(
            lambda: len(self.of(topic)) >= count, f"{count} notifications on {topic}", timeout
        )
        return self.of(topic)


@asynccontextmanager
async def running(broker: Broker) -> AsyncIterator[Inbox]:
    """Start ``broker``, wait until it reports connected, close it on the way out."""
    inbox = Inbox()
    await broker.start(inbox.on_notification, inbox.on_state, inbox.on_resync)
    try:
        await inbox.wait_for(lambda: broker.connected, "the broker to connect")
        yield inbox
    finally:
        await broker.close()


def assert_frame(notification: Notification, accepted: Accepted, data: Any) -> None:
    """The delivered notification is exactly the accepted one, frame included."""
    assert (notification.id, notification.topic, notification.ts) == (
        accepted.id,
        accepted.topic,
        accepted.ts,
    )
    assert json.loads(notification.frame) == {
        "type": "notification",
        "id": str(accepted.id),
        "topic": accepted.topic,
        "data": data,
        "ts": accepted.ts,
    }
    assert notification.size == len(notification.frame.encode())


def strictly_increasing(ids: list[int]) -> bool:
    return all(a < b for a, b in zip(ids, ids[1:], strict=False))


async def numsub(url: str, topic: str) -> int:
    """How many subscriptions the Redis server holds on ``topic``'s channel."""
    client = Redis.from_url(url)
    try:
        ((_channel, count),) = await client.pubsub_numsub(CHANNEL_PREFIX + topic)
        return int(count)
    finally:
        await client.aclose()


@pytest.fixture(scope="module")
def sentinel_set() -> Iterator[SentinelSet]:
    """One Sentinel deployment (master, replica, three sentinels) for this module's tests."""
    sentinels = SentinelSet()
    try:
        yield sentinels.start()
    finally:
        sentinels.stop()


@pytest.fixture(scope="module")
def cluster_set() -> Iterator[ClusterSet]:
    """One Redis Cluster (three masters, a replica each) for this module's tests."""
    cluster = ClusterSet()
    try:
        yield cluster.start()
    finally:
        cluster.stop()


@pytest.fixture(
    params=[
        "memory",
        pytest.param("redis", marks=pytest.mark.redis),
        pytest.param("sentinel", marks=[pytest.mark.redis, pytest.mark.slow]),
        pytest.param("cluster", marks=[pytest.mark.redis, pytest.mark.slow]),
    ]
)
def broker_kind(request: pytest.FixtureRequest) -> str:
    kind: str = request.param
    return kind


@pytest.fixture
def broker_url(broker_kind: str, request: pytest.FixtureRequest) -> str:
    """The broker's URL; for ``sentinel`` a ``redis+sentinel://`` URL (the checks that read Redis
    directly, such as PUBSUB NUMSUB, run for ``redis`` only)."""
    if broker_kind == "memory":
        return "memory://"
    if broker_kind == "sentinel":
        sentinels: SentinelSet = request.getfixturevalue("sentinel_set")
        return sentinels.url
    if broker_kind == "cluster":
        cluster: ClusterSet = request.getfixturevalue("cluster_set")
        return cluster.url
    server: RedisServer = request.getfixturevalue("redis_server")
    return server.url


@pytest.fixture
def make_broker(broker_kind: str, broker_url: str) -> MakeBroker:
    if broker_kind == "memory":
        return MemoryBroker
    return lambda: create_broker(broker_url)


# -- the conformance suite (every broker) -----------------------------------------------------


async def test_start_reports_connected_through_on_state(make_broker: MakeBroker) -> None:
    broker = make_broker()
    inbox = Inbox()
    await broker.start(inbox.on_notification, inbox.on_state, inbox.on_resync)
    try:
        await inbox.wait_for(lambda: bool(inbox.states), "on_state to be called")
        assert inbox.states == [True]
        assert broker.connected is True
    finally:
        await broker.close()
    assert broker.connected is False


async def test_publish_returns_accepted_with_strictly_increasing_ids(make_broker: MakeBroker) -> None:
    broker = make_broker()
    async with running(broker):
        topics = [fresh(), fresh()]
        answers: list[Accepted] = []
        for i in range(20):
            ts = now_ms()
            accepted = await broker.publish(topics[i % 2], encoded({"i": i}), ts)
            assert (accepted.topic, accepted.ts, accepted.repeated) == (topics[i % 2], ts, False)
            answers.append(accepted)
        ids = [a.id for a in answers]
        assert all(isinstance(i, int) and i > 0 for i in ids)
        assert strictly_increasing(ids), ids


async def test_subscriber_receives_each_frame_in_id_order(make_broker: MakeBroker) -> None:
    broker = make_broker()
    async with running(broker) as inbox:
        topic = fresh()
        await broker.subscribe(topic)
        sent: list[tuple[Accepted, Any]] = []
        for i in range(100):
            data = {"i": i, "text": f"message {i}"}
            sent.append((await broker.publish(topic, encoded(data), now_ms()), data))

        received = await inbox.wait_count(topic, len(sent))
        assert len(received) == len(sent)
        for notification, (accepted, data) in zip(received, sent, strict=True):
            assert_frame(notification, accepted, data)


async def test_concurrent_publishes_are_delivered_in_id_order(make_broker: MakeBroker) -> None:
    broker = make_broker()
    async with running(broker) as inbox:
        topic = fresh()
        await broker.subscribe(topic)
        answers = await asyncio.gather(*(broker.publish(topic, encoded(i), now_ms()) for i in range(100)))
        ids = [a.id for a in answers]
        assert len(set(ids)) == len(ids)

        received = await inbox.wait_count(topic, len(ids))
        assert [n.id for n in received] == sorted(ids)
        by_id = {a.id: (a, i) for i, a in enumerate(answers)}
        for notification in received:
            accepted, data = by_id[notification.id]
            assert_frame(notification, accepted, data)


async def test_null_and_unicode_data_survive_the_round_trip(make_broker: MakeBroker) -> None:
    broker = make_broker()
    async with running(broker) as inbox:
        topic = fresh()
        await broker.subscribe(topic)
        payloads: list[Any] = [None, "héllo ✓ 漢字 🎉", {"nested": [1, 2.5, True, None, {"k": "v"}]}, [], 0]
        sent = [(await broker.publish(topic, encoded(p), now_ms()), p) for p in payloads]

        received = await inbox.wait_count(topic, len(sent))
        for notification, (accepted, data) in zip(received, sent, strict=True):
            assert_frame(notification, accepted, data)


async def test_unsubscribed_topic_receives_nothing_more(make_broker: MakeBroker) -> None:
    broker = make_broker()
    async with running(broker) as inbox:
        topic, marker = fresh(), fresh("marker")
        await broker.subscribe(topic)
        await broker.subscribe(marker)
        first = await broker.publish(topic, b'"before"', now_ms())
        await inbox.wait_count(topic, 1)

        await broker.unsubscribe(topic)
        await broker.publish(topic, b'"after"', now_ms())
        mark = await broker.publish(marker, b'"marker"', now_ms())
        # The marker is published after the notification that must not arrive: once it is
        # here, that one would have been too.
        await inbox.wait_count(marker, 1)

        assert [n.id for n in inbox.of(topic)] == [first.id]
        assert [n.id for n in inbox.of(marker)] == [mark.id]


async def test_repeated_idempotency_key_returns_first_answer_and_delivers_once(
    make_broker: MakeBroker,
) -> None:
    broker = make_broker()
    async with running(broker) as inbox:
        topic, key = fresh(), uuid.uuid4().hex
        await broker.subscribe(topic)
        first = await broker.publish(topic, b'{"v": 1}', now_ms(), key)
        again = await broker.publish(topic, b'{"v": 2}', now_ms() + 5, key)
        assert first.repeated is False
        assert again.repeated is True
        assert (again.id, again.topic, again.ts) == (first.id, first.topic, first.ts)

        other = await broker.publish(topic, b'{"v": 3}', now_ms(), uuid.uuid4().hex)
        assert other.repeated is False and other.id > first.id
        await inbox.wait_count(topic, 2)
        received = inbox.of(topic)
        assert [n.id for n in received] == [first.id, other.id]
        assert_frame(received[0], first, {"v": 1})


async def test_publish_right_after_subscribe_returns_is_received(make_broker: MakeBroker) -> None:
    broker = make_broker()
    async with running(broker) as inbox:
        for i in range(20):
            topic = fresh()  # a new topic each time: every subscribe is a first subscription
            await broker.subscribe(topic)
            accepted = await broker.publish(topic, encoded(i), now_ms())
            (notification,) = await inbox.wait_count(topic, 1)
            assert_frame(notification, accepted, i)


# -- the node over each broker ----------------------------------------------------------------


class RecordingBroker:
    """A real broker, with a log of the subscribe / unsubscribe calls the node makes on it."""

    def __init__(self, inner: Broker) -> None:
        self.inner = inner
        self.calls: list[tuple[str, str]] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)  # everything else goes straight to the real broker

    async def subscribe(self, topic: str) -> None:
        self.calls.append(("subscribe", topic))
        await self.inner.subscribe(topic)

    async def unsubscribe(self, topic: str) -> None:
        self.calls.append(("unsubscribe", topic))
        await self.inner.unsubscribe(topic)


PRINCIPAL = Principal(sub="alice", scopes=frozenset({"subscribe", "publish"}), topics=None, exp=None)


def connection(metrics: Metrics) -> Connection:
    return Connection(PRINCIPAL, 1 << 20, metrics.dropped_slow.inc)


def queued_notifications(conn: Connection) -> list[dict[str, Any]]:
    """The notification frames waiting in ``conn``'s outbound queue (no writer runs here)."""
    return [json.loads(text) for text, _size, ts, *_ in conn.queue if ts]


async def wait_queued(conn: Connection, count: int) -> list[dict[str, Any]]:
    await eventually(lambda: len(queued_notifications(conn)) >= count, f"{count} notifications queued")
    return queued_notifications(conn)


@asynccontextmanager
async def running_node(make_broker: MakeBroker) -> AsyncIterator[tuple[Node, RecordingBroker]]:
    broker = RecordingBroker(make_broker())
    node = Node(broker, Metrics())
    await node.start()
    try:
        await eventually(lambda: broker.connected, "the broker to connect")
        yield node, broker
    finally:
        await node.close()


async def test_node_concurrent_first_subscribers_both_receive_and_last_unsubscribe_releases_topic(
    make_broker: MakeBroker, broker_kind: str, broker_url: str
) -> None:
    async with running_node(make_broker) as (node, broker):
        topic = fresh()
        one, two = connection(node.metrics), connection(node.metrics)
        await asyncio.gather(node.subscribe(one, [topic]), node.subscribe(two, [topic]))

        accepted = await node.publish(PRINCIPAL, topic, b'{"n": 1}')
        expected = {"type": "notification", "id": str(accepted.id), "topic": topic, "data": {"n": 1}}
        for conn in (one, two):
            assert await wait_queued(conn, 1) == [{**expected, "ts": accepted.ts}]
        if broker_kind == "redis":
            assert await numsub(broker_url, topic) == 1

        await asyncio.gather(node.unsubscribe(one, [topic]), node.unsubscribe(two, [topic]))
        # One broker subscription for the two local subscribers, released after the last left.
        assert broker.calls == [("subscribe", topic), ("unsubscribe", topic)]
        assert node.hub.count(topic) == 0
        if broker_kind == "redis":
            await eventually_async(lambda: _numsub_is(broker_url, topic, 0), "PUBSUB NUMSUB to reach 0")

        one.take()
        await node.subscribe(one, [topic])
        again = await node.publish(PRINCIPAL, topic, b'"again"')
        assert [f["id"] for f in await wait_queued(one, 1)] == [str(again.id)]
        assert queued_notifications(two) == [{**expected, "ts": accepted.ts}]
        if broker_kind == "redis":
            assert await numsub(broker_url, topic) == 1


async def _numsub_is(url: str, topic: str, expected: int) -> bool:
    return await numsub(url, topic) == expected


async def test_node_last_unsubscribe_racing_a_new_first_subscriber_keeps_the_topic(
    make_broker: MakeBroker,
) -> None:
    async with running_node(make_broker) as (node, _broker):
        topic = fresh()
        leaving, arriving = connection(node.metrics), connection(node.metrics)
        await node.subscribe(leaving, [topic])
        await asyncio.gather(node.unsubscribe(leaving, [topic]), node.subscribe(arriving, [topic]))

        accepted = await node.publish(PRINCIPAL, topic, b'"still here"')
        assert [f["id"] for f in await wait_queued(arriving, 1)] == [str(accepted.id)]
        assert queued_notifications(leaving) == []


# -- Redis only: two nodes on one server, and an outage ---------------------------------------


@pytest.mark.redis
async def test_redis_broker_keeps_no_state_per_confirmed_subscription(redis_server: RedisServer) -> None:
    # Every socket subscribes its user's own topic: anything kept per (un)subscribe once it is
    # confirmed grows with the users ever connected (it was 0.8 KiB per connection).
    broker = RedisBroker(redis_server.url)
    async with running(broker):
        topics = [fresh("user") for _ in range(50)]
        await asyncio.gather(*(broker.subscribe(t) for t in topics))
        assert broker._waiters == {}  # noqa: SLF001 - the confirmation waiters are the state
        await asyncio.gather(*(broker.unsubscribe(t) for t in topics))
        assert broker._waiters == {}  # noqa: SLF001
        assert [await numsub(redis_server.url, t) for t in topics[:3]] == [0, 0, 0]


@pytest.mark.redis
async def test_two_redis_brokers_share_one_strictly_increasing_id_sequence(redis_server: RedisServer) -> None:
    a, b = RedisBroker(redis_server.url), RedisBroker(redis_server.url)
    async with running(a), running(b):
        topic = fresh()
        ids = [(await (a, b)[i % 2].publish(topic, encoded(i), now_ms())).id for i in range(30)]
        assert strictly_increasing(ids), ids


@pytest.mark.redis
async def test_notification_published_by_one_redis_broker_reaches_the_others_subscriber(
    redis_server: RedisServer,
) -> None:
    a, b = RedisBroker(redis_server.url), RedisBroker(redis_server.url)
    async with running(a) as inbox_a, running(b) as inbox_b:
        topic, only_b = fresh(), fresh("only-b")
        await a.subscribe(topic)
        await b.subscribe(topic)
        await b.subscribe(only_b)

        sent: list[tuple[Accepted, Any]] = [
            (await (a, b)[i % 2].publish(topic, encoded({"i": i}), now_ms()), {"i": i}) for i in range(10)
        ]
        solo = await a.publish(only_b, b'"for b"', now_ms())
        marker = await b.publish(topic, b'"marker"', now_ms())
        sent.append((marker, "marker"))

        for inbox in (inbox_a, inbox_b):
            received = await inbox.wait_count(topic, len(sent))
            assert len(received) == len(sent)  # each exactly once
            for notification, (accepted, data) in zip(received, sent, strict=True):
                assert_frame(notification, accepted, data)
        (delivered,) = await inbox_b.wait_count(only_b, 1)
        assert_frame(delivered, solo, "for b")
        assert inbox_a.of(only_b) == []


@pytest.mark.redis
async def test_redis_subscribe_and_idempotency_hold_across_brokers(redis_server: RedisServer) -> None:
    a, b = RedisBroker(redis_server.url), RedisBroker(redis_server.url)
    async with running(a), running(b) as inbox_b:
        for _ in range(10):
            topic = fresh()
            await b.subscribe(topic)
            key = uuid.uuid4().hex
            first = await a.publish(topic, b'"once"', now_ms(), key)
            again = await b.publish(topic, b'"twice"', now_ms(), key)
            assert again.repeated and (again.id, again.ts) == (first.id, first.ts)
            (notification,) = await inbox_b.wait_count(topic, 1)
            assert_frame(notification, first, "once")


@pytest.mark.redis
async def test_redis_subscribe_returns_only_once_active_even_over_a_slow_link(
    redis_server: RedisServer,
) -> None:
    async with SlowLink(redis_server.port, 0.2) as link:
        slow, direct = RedisBroker(link.url), RedisBroker(redis_server.url)
        async with running(slow) as inbox, running(direct):
            for i in range(3):
                topic = fresh()
                await slow.subscribe(topic)
                # Published straight to Redis the moment subscribe returns: had the SUBSCRIBE
                # still been on its way, this notification would be lost.
                accepted = await direct.publish(topic, encoded(i), now_ms())
                (notification,) = await inbox.wait_count(topic, 1, timeout=3)
                assert_frame(notification, accepted, i)


@pytest.mark.redis
@pytest.mark.slow
async def test_redis_broker_reconnects_and_resubscribes_after_an_outage() -> None:
    server = RedisServer()  # a dedicated server: stopping the session one would break other tests
    await anyio.to_thread.run_sync(server.start)
    try:
        broker = RedisBroker(server.url)
        async with running(broker) as inbox:
            topic = fresh()
            await broker.subscribe(topic)
            before = await broker.publish(topic, b'"before"', now_ms())
            (notification,) = await inbox.wait_count(topic, 1)
            assert_frame(notification, before, "before")

            await anyio.to_thread.run_sync(server.stop)
            await inbox.wait_for(lambda: not broker.connected, "the broker to notice the outage", 5)
            assert inbox.states == [True, False]

            started = time.monotonic()
            with anyio.fail_after(3), pytest.raises(BrokerUnavailable):
                await broker.publish(topic, b'"lost"', now_ms())
            assert time.monotonic() - started < 3
            with anyio.fail_after(3), pytest.raises(BrokerUnavailable):
                await broker.subscribe(fresh())

            await anyio.to_thread.run_sync(server.start)  # the same port again
            await inbox.wait_for(lambda: broker.connected, "the broker to reconnect by itself", 20)
            assert inbox.states == [True, False, True]

            # No new subscribe: the broker resubscribed its topic itself.
            after = await broker.publish(topic, b'"after"', now_ms())
            await inbox.wait_count(topic, 2)
            received = inbox.of(topic)
            assert len(received) == 2
            assert_frame(received[1], after, "after")
            assert after.id > before.id  # ids keep increasing across the outage
    finally:
        await anyio.to_thread.run_sync(server.stop)


# -- retained history: bounds, expiry, honest completeness (v2) ---------------------------------


@pytest.fixture
def make_kept(broker_kind: str, broker_url: str) -> Callable[[int, int], Broker]:
    """A broker keeping ``size`` notifications per topic for ``ttl`` seconds after its last publish."""
    if broker_kind == "memory":
        return MemoryBroker
    return lambda size, ttl: create_broker(broker_url, size, ttl)


async def test_history_is_cut_at_max_bytes_newest_without_since_oldest_with_it(
    make_kept: Callable[[int, int], Broker],
) -> None:
    broker, topic = make_kept(100, 0), fresh()
    async with running(broker):
        ids = [(await broker.publish(topic, encoded("x" * 1000), now_ms())).id for _ in range(10)]
        newest = await broker.history(topic, None, 100, 3500)
        oldest = await broker.history(topic, ids[0], 100, 3500)
        everything = await broker.history(topic, None, 100)
        tiny = await broker.history(topic, None, 100, 1)
    assert [n.id for n in newest.notifications] == ids[-3:] and newest.more
    assert [n.id for n in oldest.notifications] == ids[1:4] and oldest.more
    assert [n.id for n in everything.notifications] == ids and not everything.more
    assert [n.id for n in tiny.notifications] == ids[-1:] and tiny.more  # at least one, always


async def test_history_expires_after_the_ttl_ids_keep_increasing_and_recovery_says_incomplete(
    make_kept: Callable[[int, int], Broker],
) -> None:
    broker, topic = make_kept(100, 1), fresh()
    async with running(broker):
        first = await broker.publish(topic, encoded(1), now_ms())

        async def expired() -> bool:
            return not (await broker.history(topic, None, 10)).notifications

        await eventually_async(expired, "the history to expire", 15)
        nothing_since = await broker.history(topic, first.id, 10)
        second = await broker.publish(topic, encoded(2), now_ms())
        published_since = await broker.history(topic, first.id, 10)
        from_second = await broker.history(topic, second.id - 1, 10)
    assert second.id > first.id
    assert not nothing_since.complete and nothing_since.notifications == []
    assert not published_since.complete and [n.id for n in published_since.notifications] == [second.id]
    assert from_second.complete


async def test_a_topic_never_published_counts_as_nothing_lost_within_the_ttl(
    make_kept: Callable[[int, int], Broker], broker_kind: str
) -> None:
    broker, topic, other = make_kept(100, 3600), fresh(), fresh()
    async with running(broker):
        position = (await broker.publish(other, encoded(1), now_ms())).id
        untouched = await broker.history(topic, position, 10)
        later = await broker.publish(topic, encoded(2), now_ms())
        first_ever = await broker.history(topic, position, 10)
        from_zero = await broker.history(topic, 0, 10)  # since=0: everything retained
    assert from_zero.complete and [n.id for n in from_zero.notifications] == [later.id]
    if broker_kind == "cluster":
        # Each topic has its own epoch: a topic without one may have lost its keys with a shard's
        # data, so a position from before it (here, another topic's) is conservatively incomplete.
        assert not untouched.complete and not first_ever.complete
        return
    assert untouched.complete and untouched.notifications == []
    assert first_ever.complete and [n.id for n in first_ever.notifications] == [later.id]


async def test_history_trimmed_past_since_is_incomplete_and_within_it_complete(
    make_kept: Callable[[int, int], Broker],
) -> None:
    broker, topic = make_kept(3, 0), fresh()
    async with running(broker):
        ids = [(await broker.publish(topic, encoded(i), now_ms())).id for i in range(5)]
        cut = await broker.history(topic, ids[0], 10)
        boundary = await broker.history(topic, ids[1], 10)
        kept = await broker.history(topic, ids[2], 10)
        newest = await broker.history(topic, None, 10)
    assert not cut.complete and [n.id for n in cut.notifications] == ids[2:]
    assert kept.complete and [n.id for n in kept.notifications] == ids[3:]
    # From exactly the last id trimmed away (a client that missed exactly N): whole, and the
    # N kept, nothing older (Redis keeps that one entry beyond the N for its id, never shown).
    assert boundary.complete and [n.id for n in boundary.notifications] == ids[2:]
    assert [n.id for n in newest.notifications] == ids[2:]


@pytest.mark.redis
async def test_redis_wiped_recovery_is_incomplete_even_before_anything_new_is_published(
    redis_server: RedisServer,
) -> None:
    broker, topic = RedisBroker(redis_server.url), fresh()
    async with running(broker):
        position = (await broker.publish(topic, encoded(1), now_ms())).id
        await broker.publish(topic, encoded(2), now_ms())
        client = Redis.from_url(redis_server.url)
        try:
            await client.flushall()
        finally:
            await client.aclose()
        after_wipe = await broker.history(topic, position, 10)
        newer = await broker.publish(topic, encoded(3), now_ms())
        after_publish = await broker.history(topic, position, 10)
    assert not after_wipe.complete
    assert newer.id > position
    assert not after_publish.complete


@pytest.mark.redis
async def test_redis_rebuilt_link_delivers_what_was_missed_in_order_and_reports_the_rebuild(
    redis_server: RedisServer,
) -> None:
    """Notifications published while the pub/sub link is down (killed by Redis) reach the
    subscriber after the rebuild, in order, once each; ``on_resync`` names no lost topic."""
    subscriber, publisher, topic = RedisBroker(redis_server.url), RedisBroker(redis_server.url), fresh()
    client = Redis.from_url(redis_server.url)
    async with running(subscriber) as inbox, running(publisher):
        await subscriber.subscribe(topic)
        sent = [(await publisher.publish(topic, encoded(0), now_ms())).id]
        await inbox.wait_count(topic, 1)
        try:
            await client.client_kill_filter(_type="pubsub")
        finally:
            await client.aclose()
        await inbox.wait_for(lambda: not subscriber.connected, "the link to drop")
        for i in range(1, 6):  # while the subscriber reconnects (some may race its resubscribe)
            sent.append((await publisher.publish(topic, encoded(i), now_ms())).id)
        await inbox.wait_for(lambda: bool(inbox.resyncs), "the rebuild")
        sent.append((await publisher.publish(topic, encoded(6), now_ms())).id)
        received = await inbox.wait_count(topic, len(sent))
    assert [n.id for n in received] == sent
    assert inbox.resyncs == [[]]


# -- administrators' rejections and control messages -------------------------------------------


async def test_rejections_are_kept_for_every_node_until_their_end(make_broker: MakeBroker) -> None:
    broker, alice, bob = make_broker(), fresh("alice"), fresh("bob")
    now = int(time.time())
    async with running(broker):
        await broker.reject(alice, now - 10, now + 60)
        await broker.reject(bob, now - 10, now - 1)  # already over
        found = await broker.rejections()
    assert found.get(alice) == (now - 10, now + 60)
    assert bob not in found


@pytest.mark.redis
async def test_an_admin_disconnect_on_one_node_closes_the_users_connections_on_another(
    redis_server: RedisServer,
) -> None:
    """Node A asks; node B (same Redis) closes alice's connection with 4403, leaves bob's open,
    and from then on refuses alice's tokens issued before the cut, but not later ones."""
    a = Node(RedisBroker(redis_server.url), Metrics())
    b = Node(RedisBroker(redis_server.url), Metrics())
    alice, bob = fresh("alice"), fresh("bob")
    now = int(time.time())
    def principal(sub: str, iat: int) -> Principal:
        return Principal(sub=sub, scopes=frozenset({"subscribe"}), topics=None, exp=now + 60, iat=iat)

    on_b = {sub: Connection(principal(sub, now - 5), 1 << 20, lambda _n: None) for sub in (alice, bob)}
    await a.start()
    await b.start()
    try:
        await eventually(lambda: a.ready and b.ready, "both nodes ready")
        for conn in on_b.values():
            b.attach(conn)
        await a.disconnect_user(alice, now)
        await eventually(lambda: on_b[alice].close_code is not None, "alice's connection on B closed")
        old, new = principal(alice, now - 5), principal(alice, now + 1)
        rejected_on_b = (b.rejected(old), b.rejected(new))
        late = Node(RedisBroker(redis_server.url), Metrics())  # a node started after the fact
        await late.start()
        try:
            await eventually(lambda: late.ready and alice in late.rejections, "the late node's rejections")
            rejected_on_late = late.rejected(old)
        finally:
            await late.close()
    finally:
        await a.close()
        await b.close()
    assert on_b[alice].close_code == 4403
    assert on_b[bob].close_code is None
    assert rejected_on_b == (True, False)
    assert rejected_on_late is True


# -- one data to many topics (v2) ----------------------------------------------------------------


async def test_publish_many_answers_in_order_with_increasing_ids_and_delivers_each_once(
    make_broker: MakeBroker, broker_kind: str
) -> None:
    broker = make_broker()
    async with running(broker) as inbox:
        topics = [fresh(f"many{i}") for i in range(5)]
        other, marker = fresh("not-listed"), fresh("marker")
        for topic in [*topics[:3], other, marker]:
            await broker.subscribe(topic)
        ts = now_ms()
        answers = await broker.publish_many(topics, encoded({"to": "all", "é": None}), ts)
        mark = await broker.publish(marker, b'"marker"', now_ms())

        assert [(a.topic, a.ts, a.repeated) for a in answers] == [(t, ts, False) for t in topics]
        if broker_kind != "cluster":  # with redis+cluster:// ids are ordered per topic only
            assert strictly_increasing([a.id for a in answers] + [mark.id])
        await inbox.wait_count(marker, 1)
        for topic, accepted in zip(topics[:3], answers, strict=False):
            (notification,) = inbox.of(topic)
            assert_frame(notification, accepted, {"to": "all", "é": None})
        assert inbox.of(other) == []
        for topic, accepted in zip(topics, answers, strict=True):
            (kept,) = (await broker.history(topic, None, 10)).notifications
            assert_frame(kept, accepted, {"to": "all", "é": None})


async def test_publish_many_of_1000_topics_keeps_the_order_of_ids(
    make_broker: MakeBroker, broker_kind: str
) -> None:
    broker = make_broker()
    async with running(broker) as inbox:
        topics = [fresh(f"u{i}") for i in range(1000)]
        sample = topics[::97]
        for topic in sample:
            await broker.subscribe(topic)
        answers = await broker.publish_many(topics, encoded("x" * 100), now_ms())
        assert [a.topic for a in answers] == topics
        if broker_kind != "cluster":  # with redis+cluster:// ids are ordered per topic only
            assert strictly_increasing([a.id for a in answers])
        by_topic = {a.topic: a for a in answers}
        await inbox.wait_for(lambda: all(inbox.of(t) for t in sample), "every sampled topic")
        for topic in sample:
            (notification,) = inbox.of(topic)
            assert_frame(notification, by_topic[topic], "x" * 100)


async def test_publish_many_with_a_repeated_key_publishes_each_topic_at_most_once(
    make_broker: MakeBroker,
) -> None:
    broker = make_broker()
    async with running(broker) as inbox:
        a, b, c, marker = fresh("a"), fresh("b"), fresh("c"), fresh("marker")
        for topic in (a, b, c, marker):
            await broker.subscribe(topic)
        key = uuid.uuid4().hex
        first = await broker.publish_many([a, b], b'"one"', now_ms(), key)
        again = await broker.publish_many([a, b], b'"two"', now_ms(), key)
        wider = await broker.publish_many([c, b, a], b'"three"', now_ms(), key)
        single = await broker.publish(c, b'"four"', now_ms(), key)  # the key's first answer
        await broker.publish(marker, b'"marker"', now_ms())
        await inbox.wait_count(marker, 1)

    assert [x.repeated for x in first] == [False, False]
    assert [(x.id, x.topic, x.ts, x.repeated) for x in again] == [(x.id, x.topic, x.ts, True) for x in first]
    assert wider[0].repeated is False and wider[0].id > first[1].id
    assert [(x.id, x.repeated) for x in wider[1:]] == [(first[1].id, True), (first[0].id, True)]
    assert single.repeated and (single.id, single.topic) == (first[0].id, a)
    assert [n.id for n in inbox.of(a)] == [first[0].id]
    assert [n.id for n in inbox.of(b)] == [first[1].id]
    assert [n.id for n in inbox.of(c)] == [wider[0].id]
    assert json.loads(inbox.of(c)[0].frame)["data"] == "three"


async def test_publish_many_after_a_single_publish_with_the_key_skips_its_topic(
    make_broker: MakeBroker,
) -> None:
    broker = make_broker()
    async with running(broker) as inbox:
        a, b, marker = fresh("a"), fresh("b"), fresh("marker")
        for topic in (a, b, marker):
            await broker.subscribe(topic)
        key = uuid.uuid4().hex
        single = await broker.publish(a, b'"single"', now_ms(), key)
        many = await broker.publish_many([b, a], b'"many"', now_ms(), key)
        await broker.publish(marker, b'"marker"', now_ms())
        await inbox.wait_count(marker, 1)
    assert many[0].repeated is False and many[0].id > single.id
    assert (many[1].id, many[1].repeated) == (single.id, True)
    assert [n.id for n in inbox.of(a)] == [single.id]
    assert [n.id for n in inbox.of(b)] == [many[0].id]


async def test_publish_many_keeps_history_trimmed_honestly(make_kept: Callable[[int, int], Broker]) -> None:
    broker, topics = make_kept(3, 0), [fresh("a"), fresh("b")]
    async with running(broker):
        rounds = [await broker.publish_many(topics, encoded(i), now_ms()) for i in range(5)]
        for column, topic in enumerate(topics):
            ids = [answers[column].id for answers in rounds]
            cut = await broker.history(topic, ids[0], 10)
            boundary = await broker.history(topic, ids[1], 10)  # see the test above
            kept = await broker.history(topic, ids[2], 10)
            assert not cut.complete and [n.id for n in cut.notifications] == ids[2:]
            assert boundary.complete and [n.id for n in boundary.notifications] == ids[2:]
            assert kept.complete and [n.id for n in kept.notifications] == ids[3:]


@pytest.mark.redis
async def test_redis_publish_many_failing_part_way_publishes_a_prefix_and_a_retry_the_rest(
    redis_server: RedisServer,
) -> None:
    """Injected: the history key of topic 150 of 300 holds a string (WRONGTYPE), so the second
    script call fails in the middle. The first 149 topics are accepted and remembered under the
    key; once the key is fixed, a retry with the same key publishes the other 151, and each
    subscriber has received its notification exactly once."""
    broker = RedisBroker(redis_server.url)
    topics = [fresh(f"p{i}") for i in range(300)]
    sample = topics[::10] + [topics[148], topics[149], topics[150]]
    async with running(broker) as inbox, Redis.from_url(redis_server.url) as admin:
        for topic in sample:
            await broker.subscribe(topic)
        await admin.set("notifier:history:" + topics[149], "not a stream")
        key = uuid.uuid4().hex
        with pytest.raises(BrokerUnavailable):
            await broker.publish_many(topics, b'"once"', now_ms(), key)
        published = [t for t in topics if await admin.exists("notifier:history:" + t)]
        assert published == topics[:150]  # 149 streams and the string that broke the call

        await admin.delete("notifier:history:" + topics[149])
        answers = await broker.publish_many(topics, b'"twice"', now_ms(), key)
        assert [a.topic for a in answers] == topics
        assert [a.repeated for a in answers] == [True] * 149 + [False] * 151
        assert strictly_increasing([a.id for a in answers])
        await inbox.wait_for(lambda: all(inbox.of(t) for t in sample), "every sampled topic")
        marker = fresh("marker")
        await broker.subscribe(marker)
        await broker.publish(marker, b'"marker"', now_ms())
        await inbox.wait_count(marker, 1)
    by_topic = {a.topic: a for a in answers}
    for topic in sample:
        (notification,) = inbox.of(topic)
        assert_frame(notification, by_topic[topic], "once" if by_topic[topic].repeated else "twice")


# -- presence (notifier.presence): every broker -------------------------------------------------


def presence_events(inbox: Inbox) -> list[list[str]]:
    """The presence events delivered so far, in order (from the control topic's messages)."""
    found: list[list[str]] = []
    for frame in inbox.frames(CONTROL_TOPIC):
        if frame["data"].get("type") == "presence":
            found += frame["data"]["events"]
    return found


async def test_presence_counts_users_lists_them_sorted_and_publishes_each_change_once(
    make_broker: MakeBroker,
) -> None:
    broker = make_broker()
    async with running(broker) as inbox:
        room = fresh("room")
        await broker.presence_update([(room, "bob", 1), (room, "zoë", 2), (room, "alice", 1)])
        await broker.presence_update([(room, "bob", 3), (room, "alice", 1)])  # no new user: no event
        await broker.presence_update([(room, "alice", 0)])
        state = await broker.presence(room, 1000)
        assert (state.count, state.users) == (2, [("bob", 3), ("zoë", 2)])
        assert (await broker.presence(room, 1)).users == [("bob", 3)]
        expected = [
            [room, "join", "bob"], [room, "join", "zoë"], [room, "join", "alice"], [room, "leave", "alice"]
        ]
        await inbox.wait_for(lambda: len(presence_events(inbox)) >= 4, "4 presence events")
        assert [e for e in presence_events(inbox) if e[0] == room] == expected
        await broker.presence_update([(room, "bob", 0), (room, "zoë", 0)])
        assert (await broker.presence(room, 1000)).count == 0
        await broker.presence_goodbye()


@pytest.mark.parametrize("broker_kind", ["redis", "cluster"], indirect=True)
async def test_presence_of_two_nodes_adds_up_and_a_silent_node_is_swept_with_its_leaves(
    make_broker: MakeBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(redis_presence, "PRESENCE_DEAD_AFTER", 1)
    a, b = make_broker(), make_broker()
    async with running(a) as inbox, running(b):
        room = fresh("room")
        assert await a.presence_beat([]) is True  # unknown until now: send everything
        assert await a.presence_beat([]) is False
        await a.presence_update([(room, "alice", 1), (room, "bob", 1)])
        await b.presence_update([(room, "alice", 2)])  # alice on both: one user, joined once
        assert (await b.presence(room, 10)).users == [("alice", 3), ("bob", 1)]
        # a falls silent: b's heartbeat after the dead line sweeps it, publishing bob's leave
        # (alice stays: b holds her).
        await inbox.wait_for(lambda: len(presence_events(inbox)) >= 2, "2 joins")
        started = time.monotonic()
        while time.monotonic() - started < 1.2:
            await b.presence_beat([room])
            await asyncio.sleep(0.1)
        assert (await b.presence(room, 10)).users == [("alice", 2)]
        await inbox.wait_for(lambda: len(presence_events(inbox)) >= 3, "bob's leave")
        assert [e for e in presence_events(inbox) if e[0] == room] == [
            [room, "join", "alice"], [room, "join", "bob"], [room, "leave", "bob"]
        ]
        # a comes back: the broker forgot it, so it is told to send all its counts again.
        assert await a.presence_update([(room, "alice", 1)]) is True
        await a.presence_update([(room, "bob", 1)])
        assert (await b.presence(room, 10)).users == [("alice", 3), ("bob", 1)]
        await a.presence_goodbye()
        await b.presence_goodbye()
        assert (await b.presence(room, 10)).count == 0
