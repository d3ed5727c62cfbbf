"""The sharded pub/sub side of :class:`notifier.broker_cluster.ClusterBroker`: one link (a plain
pub/sub connection) per shard master, each topic ``SSUBSCRIBE``d on the link of its slot's
owner, and after a lost link its topics filled in from history or named to ``on_resync``.

redis-py 8.1's asyncio ``ClusterPubSub`` has ``ssubscribe``, but it hides which shard link was
lost and when; the no-silent-gap contract needs exactly that, so the links are kept here. The
reconnect-with-backoff and probe follow :class:`notifier.broker_redis.RedisBroker`'s listener,
per link (with its timings and gap bounds, imported from there).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import defaultdict, deque
from dataclasses import dataclass, field
from typing import Any

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.asyncio.cluster import RedisCluster

from notifier.broker import CONTROL_TOPIC, OnNotification, OnResync, OnState
from notifier.broker_redis import (
    _REDIS_ERRORS,
    BACKOFF_MAX,
    BACKOFF_MIN,
    GAP_BUFFER_BYTES,
    GAP_BYTES,
    GAP_ENTRIES,
    GAP_TOPICS_PER_READ,
    PROBE_INTERVAL,
    PROBE_TIMEOUT,
    PUBLISH_TIMEOUT,
    SUBSCRIBE_TIMEOUT,
    _check_cancelled,
    _why,
)
from notifier.errors import BrokerUnavailable
from notifier.protocol import Notification
from notifier.redis_cluster import ClusterKeys, ClusterURL
from notifier.redis_history import PREFIX, HistoryReader
from notifier.redis_topology import no_retry

log = logging.getLogger("notifier.broker")

REFRESH_INTERVAL = 1.0  # seconds between two looks at the cluster's slot map while a link is down


@dataclass(eq=False)
class _Link:
    """The sharded pub/sub connection to one shard master (``node``: ``host:port``)."""

    node: str
    task: asyncio.Task[None] | None = None
    pubsub: PubSub | None = None
    live: bool = False
    probe: bytes = b""
    channels: set[bytes] = field(default_factory=set)  # confirmed on this link


class ShardLinks:
    """The subscriptions of a :class:`~notifier.broker_cluster.ClusterBroker` (a mixin: the
    broker owns the clients and callbacks declared first; :meth:`_init_links` the rest)."""

    connected: bool
    probe_lag: float | None
    _pub: RedisCluster
    _names: ClusterKeys
    _reader: HistoryReader
    _gate: asyncio.Semaphore
    _session_script: Any
    _target: ClusterURL
    _name: str
    _last_error: str
    _clock_offset: float | None
    _stop: asyncio.Event
    _on_notification: OnNotification
    _on_state: OnState
    _on_resync: OnResync

    def _init_links(self, probe_id: str) -> None:
        self._topics: set[str] = {CONTROL_TOPIC}  # held from the start (notifier.broker)
        # Per topic: the highest id delivered (or, before any, the position when subscribed):
        # live duplicates of what a gap fill delivered are skipped against it.
        self._last: dict[str, int] = {}
        self._gapped: set[str] = set()  # held topics whose link was lost since they were filled
        self._held: dict[str, list[bytes] | None] = {}  # live messages while a topic is filled
        self._held_bytes = 0
        self._pending: dict[str, asyncio.Future[None]] = {}  # topics being attached to a link
        self._links: dict[str, _Link] = {}
        # (link's node, "ssubscribe"/"sunsubscribe", channel) -> futures waiting for its confirmation
        self._waiters: dict[tuple[str, str, bytes], deque[asyncio.Future[None]]] = defaultdict(deque)
        self._changed = asyncio.Event()  # a link went down or up: look at the slot map again
        self._tasks: set[asyncio.Task[None]] = set()  # resubscriptions under way
        self._probe_id = probe_id
        self._probe_sent: dict[bytes, float] = {}

    # -- subscriptions --------------------------------------------------------------------------

    def _owner(self, key: str) -> str | None:
        try:
            node = self._pub.get_node_from_key(key)
        except Exception:  # noqa: BLE001 - no slot map yet, or the slot is not covered
            return None
        return None if node is None else str(node.name)

    async def subscribe(self, topic: str) -> None:
        self._topics.add(topic)
        pending = self._pending.get(topic)
        if pending is not None:
            await asyncio.shield(pending)
            return
        # A shard failing over is back within a second or two: wait for its link a while
        # rather than refuse the subscriber at once.
        channel = self._names.channel(topic)
        deadline = time.monotonic() + SUBSCRIBE_TIMEOUT
        link = self._links.get(self._owner(channel) or "")
        while (link is None or not link.live) and time.monotonic() < deadline and not self._stop.is_set():
            await asyncio.sleep(0.05)
            link = self._links.get(self._owner(channel) or "")
        if link is not None and channel.encode() in link.channels:
            return
        if link is None or not link.live:
            self._topics.discard(topic)
            why = f"the shard of {topic!r} is not connected: {self._last_error}"
            raise BrokerUnavailable(f"{self._name}: {why}")
        try:
            await self._attach(link, [topic])
        except BaseException:
            self._topics.discard(topic)
            raise

    async def unsubscribe(self, topic: str) -> None:
        self._topics.discard(topic)
        self._last.pop(topic, None)
        self._gapped.discard(topic)
        self._held.pop(topic, None)
        channel = self._names.channel(topic).encode()
        for link in self._links.values():
            if channel in link.channels:
                link.channels.discard(channel)
                if link.live and link.pubsub is not None:
                    try:
                        async with asyncio.timeout(SUBSCRIBE_TIMEOUT):
                            await link.pubsub.execute_command("SUNSUBSCRIBE", channel)
                    except (*_REDIS_ERRORS, BrokerUnavailable):
                        _check_cancelled()  # the link is down: its next session skips it anyway

    async def _attach(self, link: _Link, topics: list[str]) -> None:
        """SSUBSCRIBE ``topics`` on ``link`` and fill those that missed something; returns once
        every one is active. Before subscribing, SESSION_LUA gives each new topic its position
        (and moves a topic's epoch if its master changed)."""
        loop = asyncio.get_running_loop()
        mine: asyncio.Future[None] = loop.create_future()
        topics = [t for t in topics if t not in self._pending]
        for topic in topics:
            self._pending[topic] = mine
            if topic in self._gapped:
                self._held.setdefault(topic, [])
        try:
            await self._attach_now(link, topics)
            mine.set_result(None)
        except BaseException as exc:
            mine.set_exception(BrokerUnavailable(f"redis: subscribe failed: {_why(exc)}"))
            mine.exception()  # retrieved: nobody may be waiting
            raise BrokerUnavailable(f"redis: subscribe failed: {_why(exc)}") from None
        finally:
            for topic in topics:
                if self._pending.get(topic) is mine:
                    del self._pending[topic]

    async def _attach_now(self, link: _Link, topics: list[str]) -> None:
        pubsub = link.pubsub
        if pubsub is None or not link.live:
            raise BrokerUnavailable("link lost")
        waiting: list[tuple[tuple[str, str, bytes], asyncio.Future[None]]] = []
        try:
            async with asyncio.timeout(SUBSCRIBE_TIMEOUT + len(topics) / 500):
                floors = await asyncio.gather(*(self._position(t) for t in topics))
                for topic, floor in zip(topics, floors, strict=True):
                    self._last.setdefault(topic, int(floor))
                    key = (link.node, "ssubscribe", self._names.channel(topic).encode())
                    waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
                    self._waiters[key].append(waiter)
                    waiting.append((key, waiter))
                    await pubsub.execute_command("SSUBSCRIBE", key[2])  # one slot per command
                await asyncio.gather(*(w for _k, w in waiting))
        finally:
            # A confirmation that never came must not be taken by the next attempt's waiter.
            for key, waiter in waiting:
                waiters = self._waiters.get(key)
                if waiters is not None and waiter in waiters:
                    waiters.remove(waiter)
                    if not waiters:
                        del self._waiters[key]
        for topic in topics:
            link.channels.add(self._names.channel(topic).encode())
        for topic in [t for t in topics if t not in self._topics]:  # unsubscribed meanwhile
            self._last.pop(topic, None)
            self._gapped.discard(topic)
            self._held.pop(topic, None)
            link.channels.discard(self._names.channel(topic).encode())
            try:
                await pubsub.execute_command("SUNSUBSCRIBE", self._names.channel(topic))
            except _REDIS_ERRORS:
                _check_cancelled()  # the link is down: its next session skips it anyway
        gapped = [t for t in topics if t in self._gapped]
        if gapped:
            lost = await self._fill(gapped)
            self._on_resync(lost)
        self._update_connected()

    async def _position(self, topic: str) -> int:
        async with self._gate:
            return int(await self._session_script(keys=self._names.session(topic), args=["1"]))

    async def _fill(self, topics: list[str]) -> list[str]:
        """Deliver what each of ``topics`` missed, then what arrived live meanwhile; the topics
        for which that cannot be done whole are returned (their sockets get 1012)."""
        lost: list[str] = []
        for start in range(0, len(topics), GAP_TOPICS_PER_READ):
            chunk = topics[start : start + GAP_TOPICS_PER_READ]
            positions = {t: self._last.get(t, 0) for t in chunk}
            async with asyncio.timeout(PUBLISH_TIMEOUT), self._gate:
                gaps = await self._reader.gaps(positions, GAP_ENTRIES, GAP_BYTES)
            for topic, missed in gaps.items():
                if missed is None or self._held.get(topic, []) is None:
                    lost.append(topic)
                    continue
                for n in missed:
                    if topic in self._topics and n.id > self._last.get(topic, 0):
                        self._last[topic] = n.id
                        self._on_notification(n)
        for topic in topics:
            self._gapped.discard(topic)
            held = self._held.pop(topic, None) or []
            if topic in lost:
                # Its sockets get 1012 and recover from their own last id: nothing newer may
                # reach them first (they would resume past the gap). Start from what was held.
                for data in held[-1:]:
                    self._last[topic] = max(self._last.get(topic, 0), int(data.split(b" ", 1)[0]))
                continue
            for data in held:
                self._deliver(topic, data)
        if not self._held:
            self._held_bytes = 0
        log.info("redis cluster: %d topics refilled, %d could not be", len(topics), len(lost))
        return lost

    def _deliver(self, topic: str, data: bytes) -> None:
        if topic not in self._topics:
            return
        if topic in self._held:
            held = self._held[topic]
            if held is not None:
                self._held_bytes += len(data)
                if self._held_bytes > GAP_BUFFER_BYTES:
                    self._held[topic] = None
                else:
                    held.append(data)
            return
        try:
            notification = Notification.from_envelope(topic, data)
        except ValueError:
            log.error("dropping malformed broker message on %r", topic)
            return
        if notification.id <= self._last.get(topic, 0):
            return  # delivered from history by a gap fill
        self._last[topic] = notification.id
        self._on_notification(notification)

    # -- the links ----------------------------------------------------------------------------

    async def _supervise(self) -> None:
        """Keep one link per shard master; give each held topic to the link of its slot's owner."""
        backoff = BACKOFF_MIN
        while not self._stop.is_set():
            self._changed.clear()
            try:
                async with asyncio.timeout(PUBLISH_TIMEOUT):
                    await self._pub.nodes_manager.initialize()  # redis-py: re-read the slot map
                    await self._measure_clock()
                masters = {str(node.name) for node in self._pub.get_primaries()}
                if masters != self._links.keys():
                    log.info("%s: shard masters %s", self._name, ", ".join(sorted(masters)))
                for name in masters - self._links.keys():
                    link = _Link(name)
                    self._links[name] = link
                    link.task = asyncio.create_task(self._link_loop(link), name=f"notifier-cluster-{name}")
                for name in list(self._links.keys() - masters):
                    gone = self._links.pop(name)
                    if gone.task is not None:
                        gone.task.cancel()
                        await asyncio.gather(gone.task, return_exceptions=True)
                self._adopt()
                backoff = BACKOFF_MIN
            except Exception as exc:  # noqa: BLE001 - any failure: look again after a backoff
                _check_cancelled()
                self._last_error = _why(exc)
                log.warning("%s: cannot read the slot map: %s", self._name, self._last_error)
                backoff = min(backoff * 2, BACKOFF_MAX)
            self._update_connected()
            wait = backoff if not self.connected else REFRESH_INTERVAL * 5
            try:
                async with asyncio.timeout(wait if self.connected else min(wait, REFRESH_INTERVAL)):
                    await self._changed.wait()
            except TimeoutError:
                _check_cancelled()

    def _adopt(self) -> None:
        """Attach every held topic that no live link carries to the live link of its owner."""
        carried = set().union(*(link.channels for link in self._links.values()))
        orphans: dict[str, list[str]] = defaultdict(list)
        for topic in self._topics:
            channel = self._names.channel(topic)
            if channel.encode() in carried or topic in self._pending:
                continue
            owner = self._owner(channel)
            link = self._links.get(owner or "")
            if link is not None and link.live:
                orphans[link.node].append(topic)
        for node, topics in orphans.items():
            task = asyncio.create_task(self._adopt_on(self._links[node], topics))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def _adopt_on(self, link: _Link, topics: list[str]) -> None:
        try:
            await self._attach(link, topics)
        except BrokerUnavailable as exc:
            log.warning("redis cluster: could not resubscribe %d topics on %s: %s",
                        len(topics), link.node, exc)  # fmt: skip
            self._changed.set()

    async def _link_loop(self, link: _Link) -> None:
        backoff = BACKOFF_MIN
        while not self._stop.is_set():
            was_live = False
            try:
                was_live = await self._link_session(link)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure ends the session; we go on
                _check_cancelled()
                self._last_error = _why(exc)
                log.warning("%s: shard link %s lost: %s", self._name, link.node, self._last_error)
            if was_live:
                backoff = BACKOFF_MIN
            try:
                async with asyncio.timeout(backoff):
                    await self._stop.wait()
                return
            except TimeoutError:
                _check_cancelled()
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _link_session(self, link: _Link) -> bool:
        host, _, port = link.node.rpartition(":")
        client = Redis(
            host=host, port=int(port), username=self._target.username, password=self._target.password,
            socket_connect_timeout=SUBSCRIBE_TIMEOUT, retry=no_retry(), health_check_interval=0,
        )  # fmt: skip
        pubsub = client.pubsub()
        link.pubsub = pubsub
        try:
            link.probe = self._probe_channel(link.node)
            async with asyncio.timeout(SUBSCRIBE_TIMEOUT):
                await pubsub.execute_command("SSUBSCRIBE", link.probe)
                while True:
                    message = await pubsub.get_message(timeout=SUBSCRIBE_TIMEOUT)
                    if message is not None and message["type"] == "ssubscribe":
                        break
            link.live = True
            self._changed.set()  # the supervisor gives this link its topics (and fills them)
            while True:
                message = await pubsub.get_message(timeout=None)
                if message is None:
                    continue
                kind, channel = message["type"], message["channel"]
                if kind == "smessage":
                    if channel == link.probe:
                        sent = self._probe_sent.pop(message["data"], None)
                        if sent is not None:
                            self.probe_lag = time.monotonic() - sent
                    else:
                        self._deliver(channel[len(PREFIX) + 1 : -1].decode(), message["data"])
                elif kind in ("ssubscribe", "sunsubscribe"):
                    waiters = self._waiters.get((link.node, kind, channel))
                    if waiters:
                        waiter = waiters.popleft()
                        if not waiter.done():
                            waiter.set_result(None)
                        if not waiters:
                            del self._waiters[(link.node, kind, channel)]
                    elif kind == "sunsubscribe" and channel in link.channels:
                        # Unasked: the slot moved away (a migration). Its topic goes to the
                        # new owner's link, and is filled from history there.
                        link.channels.discard(channel)
                        self._gapped.add(channel[len(PREFIX) + 1 : -1].decode())
                        self._changed.set()
        finally:
            was_live = link.live
            log.info("redis cluster: link %s ended, %d topics to refill", link.node, len(link.channels))
            link.live, link.pubsub = False, None
            for channel in link.channels:
                topic = channel[len(PREFIX) + 1 : -1].decode()
                if topic in self._topics:
                    self._gapped.add(topic)
            link.channels.clear()
            for key, waiters in list(self._waiters.items()):
                if key[0] == link.node:
                    for waiter in waiters:
                        if not waiter.done():
                            waiter.set_exception(BrokerUnavailable("redis: link lost"))
                    del self._waiters[key]
            self._changed.set()
            self._update_connected()
            try:
                async with asyncio.timeout(1):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
                    await client.aclose()
            except Exception:  # noqa: BLE001 - the link is already gone
                pass
        return was_live

    def _probe_channel(self, node: str) -> bytes:
        """A channel of this broker's own in a slot ``node`` owns."""
        for n in range(1 << 16):
            channel = f"{PREFIX}probe:{{{self._probe_id}-{n}}}"
            if self._owner(channel) == node:
                return channel.encode()
        raise BrokerUnavailable(f"{node} owns no slot")

    def _update_connected(self) -> None:
        """Connected: a live link to every master, the control topic subscribed, and no topic
        waiting for its gap to be filled (as RedisBroker reports it once its session is whole)."""
        control = self._names.channel(CONTROL_TOPIC).encode()
        links = self._links.values()
        self._set_connected(
            bool(self._links) and all(link.live for link in links) and not self._gapped
            and any(control in link.channels for link in links)
        )  # fmt: skip

    def _set_connected(self, connected: bool) -> None:
        if connected != self.connected:
            self.connected = connected
            log.info("%s %s", self._name, "connected" if connected else "not connected (a shard is down)")
            self._on_state(connected)

    # -- the probe ----------------------------------------------------------------------------

    async def _measure_clock(self) -> None:
        before = time.time()
        seconds, micros = await self._pub.time()
        after = time.time()
        self._clock_offset = seconds + micros / 1e6 - (before + after) / 2

    async def _probe(self) -> None:
        """Every few seconds, through each live link: SPUBLISH a token to the link's own probe
        channel and restart the link if it does not come back (a silently dead connection)."""
        seq = 0
        while not self._stop.is_set():
            try:
                async with asyncio.timeout(PROBE_INTERVAL):
                    await self._stop.wait()
                return
            except TimeoutError:
                _check_cancelled()
            for link in list(self._links.values()):
                if not link.live:
                    continue
                seq += 1
                token = f"{seq}".encode()
                self._probe_sent[token] = time.monotonic()
                try:
                    async with asyncio.timeout(PUBLISH_TIMEOUT):
                        await self._measure_clock()
                        await self._pub.execute_command("SPUBLISH", link.probe, token)
                except _REDIS_ERRORS:
                    _check_cancelled()
                    self._probe_sent.pop(token, None)
                    continue  # refused or unreachable: the link sees to that by itself
                deadline = time.monotonic() + PROBE_TIMEOUT
                while token in self._probe_sent and time.monotonic() < deadline:
                    await asyncio.sleep(0.05)
                if self._probe_sent.pop(token, None) is not None and link.live and link.task is not None:
                    log.warning("redis cluster link %s silent: no probe back; reconnecting", link.node)
                    self.probe_lag = None
                    link.task.cancel()
                    await asyncio.gather(link.task, return_exceptions=True)
                    link.task = asyncio.create_task(self._link_loop(link), name=f"cluster-{link.node}")
