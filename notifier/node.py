"""The node: the only piece that knows both the hub (local connections) and the broker (the cluster).

It takes a broker subscription when a topic gets its first local subscriber and releases it
after the last one leaves, under a lock per topic, so two concurrent first subscribers both
receive and a failed broker subscribe leaves nothing half-done.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from notifier.auth import Principal
from notifier.broker import CONTROL_TOPIC, Broker, History, PartlyPublished, Rejections
from notifier.errors import BrokerUnavailable, CloseCode
from notifier.hub import Connection, Hub
from notifier.metrics import Metrics
from notifier.presence import PresenceTracker
from notifier.protocol import (
    Accepted,
    Notification,
    Positions,
    Since,
    dumps,
    loads,
    sse_event,
    ws_text_frame,
)
from notifier.replay import Replay

log = logging.getLogger("notifier.node")

DRAIN_STEP = 0.1  # seconds between two batches of closes during a drain
HISTORY_READS = 4  # history answers (up to 4 MiB each) an instance builds at once
REJECTION_SECONDS = 24 * 3600  # how long an administrator's reject_tokens_issued_before holds
PRESENCE_GOODBYE = 2.0  # seconds a stopping instance gives its last presence changes and goodbye


class Node:
    """One running instance's core: subscribe with reference counting, publish, deliver."""

    def __init__(self, broker: Broker, metrics: Metrics, history_size: int = 1000) -> None:
        self.broker = broker
        self.history_size = history_size
        self.hub = Hub()
        self.metrics = metrics
        self.draining = False
        self.handshakes_in_progress = 0  # WebSocket and event-stream handshakes before hello (notifier.ws)
        self._locks: dict[str, tuple[asyncio.Lock, int]] = {}
        self.history_gate = asyncio.Semaphore(HISTORY_READS)  # history answers built at once
        # sub -> (tokens issued before this are refused, until): loaded from the broker at each
        # connect, kept current by the control messages of every node's disconnects.
        self.rejections: Rejections = {}
        self._loading: asyncio.Task[None] | None = None
        self.presence = PresenceTracker(broker)

    async def start(self) -> None:
        self.metrics.broker_connected.set(0)
        broker = self.broker
        self.metrics.probe_lag.set_function(lambda: _nan_if_none(broker.probe_lag))
        await self.broker.start(self._deliver, self._broker_state, self._resynced)
        self.presence.start()

    async def close(self) -> None:
        if self._loading is not None:
            self._loading.cancel()
            await asyncio.gather(self._loading, return_exceptions=True)
        await self.presence.close(PRESENCE_GOODBYE)
        await self.broker.close()

    @property
    def ready(self) -> bool:
        return self.broker.connected and not self.draining

    def _deliver(self, notification: Notification) -> None:
        if notification.topic == CONTROL_TOPIC:
            self._control(notification)
            return
        written = self.hub.broadcast(notification)
        if written:
            # Counted once per fan-out, not per socket; the latency is sampled by the last write.
            self.metrics.delivered.inc(written)
            self.metrics.latency.observe(max(0.0, time.time() - notification.ts / 1000))

    def _resynced(self, lost: list[str]) -> None:
        """The broker rebuilt its subscriptions after a lost link; ``lost`` topics' sockets may
        have missed something that could not be delivered: they must recover by themselves."""
        self.metrics.resubscribes.inc()
        closed = 0
        for topic in lost:
            for conn in self.hub.subscribers(topic):
                if conn.close_code is None:
                    conn.close(CloseCode.SERVICE_RESTART, "notifications may have been missed; reconnect")
                    closed += 1
        if lost:
            log.warning("broker link rebuilt: %d topics could not be filled in, %d sockets closed (1012)",
                        len(lost), closed)

    def _broker_state(self, connected: bool) -> None:
        self.metrics.broker_connected.set(1 if connected else 0)
        log.info("broker %s", "connected" if connected else "disconnected")
        if connected and (self._loading is None or self._loading.done()):
            self._loading = asyncio.get_running_loop().create_task(self._load_rejections())
        if connected:
            self.presence.resend_all()  # the broker may have lost them meanwhile

    # -- administrators ---------------------------------------------------------------------

    async def disconnect_user(self, sub: str, reject_before: int | None) -> None:
        """Close every connection of ``sub`` on every node (4403); with ``reject_before``, refuse
        that user's tokens issued before it (or without ``iat``) for 24 h, on every node.
        Raises :class:`BrokerUnavailable` (then nothing may have happened)."""
        now = int(time.time())
        until = now + REJECTION_SECONDS
        if reject_before is not None:
            await self.broker.reject(sub, reject_before, until)
        message = {"type": "disconnect", "sub": sub, "before": reject_before, "until": until}
        await self.broker.publish(CONTROL_TOPIC, dumps(message).encode(), now * 1000)

    def rejected(self, principal: Principal) -> bool:
        """True when an administrator refused this token (issued before the cut, or no ``iat``)."""
        entry = self.rejections.get(principal.sub)
        if entry is None:
            return False
        before, until = entry
        if time.time() >= until:
            del self.rejections[principal.sub]
            return False
        return principal.iat is None or principal.iat < before

    def _reject(self, sub: str, before: int, until: int) -> None:
        known = self.rejections.get(sub)
        if known is not None:
            before, until = max(before, known[0]), max(until, known[1])
        self.rejections[sub] = (before, until)

    async def _load_rejections(self) -> None:
        try:
            found = await self.broker.rejections()
        except BrokerUnavailable as exc:
            log.warning("could not load the administrators' token rejections: %s", exc)
            return
        for sub, (before, until) in found.items():
            self._reject(sub, before, until)

    def _control(self, notification: Notification) -> None:
        """A message from a node (see :data:`CONTROL_TOPIC`): an administrator's disconnect, or
        presence events."""
        try:
            message = loads(notification.frame)["data"]
            kind, sub = message["type"], message.get("sub")
        except (ValueError, KeyError, TypeError, AttributeError):
            log.error("dropping a malformed control message")
            return
        if kind == "presence":
            self._presence_events(message.get("events"))
            return
        if kind != "disconnect" or not isinstance(sub, str):
            return
        before, until = message.get("before"), message.get("until")
        if isinstance(before, int) and isinstance(until, int):
            self._reject(sub, before, until)
        closed = 0
        for conn in list(self.hub.connections):
            if conn.principal.sub == sub and conn.close_code is None:
                conn.close(CloseCode.DISCONNECTED_BY_ADMIN, "disconnected by an administrator")
                closed += 1
        log.info("administrator disconnect of %r: %d connections closed here", sub, closed)

    def _presence_events(self, events: object) -> None:
        """Join and leave events from the broker: to this node's connections listening on their
        topic, except those of the user the event is about. Each frame is encoded once."""
        if not isinstance(events, list):
            return
        listeners = self.hub.listeners
        for event in events:
            if not (isinstance(event, list) and len(event) == 3):
                continue
            topic, kind, user = event
            conns = listeners.get(topic) if isinstance(topic, str) else None
            if not conns or kind not in ("join", "leave"):
                continue
            text = dumps({"type": kind, "topic": topic, "user": user})
            size = len(text.encode())
            ws_wire = sse_wire = b""
            for conn in conns:
                if conn.principal.sub == user or conn.close_code is not None:
                    continue
                if conn.sse:
                    sse_wire = sse_wire or sse_event(kind, text)
                    conn.push(text, size, 0, sse_wire)
                else:
                    ws_wire = ws_wire or ws_text_frame(text.encode())
                    conn.push(text, size, 0, ws_wire)

    # -- connections ------------------------------------------------------------------------

    def attach(self, conn: Connection) -> None:
        if conn not in self.hub.connections:
            self.hub.connections.add(conn)
            self.hub.user_attached(conn.principal.sub)
        self.metrics.connections.set(len(self.hub.connections))

    async def detach(self, conn: Connection) -> None:
        """Forget a closed connection: leave its topics, free its slot (and its user's)."""
        try:
            await self.unsubscribe(conn, list(conn.topics))
        finally:
            if conn in self.hub.connections:
                self.hub.connections.discard(conn)
                self.hub.user_detached(conn.principal.sub)  # a refresh never changes the sub
            self.metrics.connections.set(len(self.hub.connections))

    async def subscribe(self, conn: Connection, topics: list[str]) -> None:
        """Subscribe ``conn`` to ``topics``; returns once each is active cluster-wide.

        Raises :class:`BrokerUnavailable`; topics subscribed before the failure stay subscribed.
        """
        for topic in topics:
            if topic not in conn.topics:
                await self.join(conn, topic, hold=False)

    async def open(self, conn: Connection, topics: list[str], since: Since | None) -> Replay | None:
        """Subscribe ``conn`` to ``topics``: live (``since`` None; no replay) or recovering."""
        if since is None:
            await self.subscribe(conn, topics)
            return None
        return await self.recover(conn, topics, since)

    async def recover(self, conn: Connection, topics: list[str], since: Since) -> Replay:
        """Subscribe ``conn`` to ``topics`` for a recovery: after ``since`` (one id: every topic)
        or each after its own position (per-topic positions: a topic without one is subscribed
        live, without recovery; positions of other topics are ignored). The recovered topics are
        held and the first page of each read: the returned :class:`Replay` knows ``recovered``
        (true when nothing after its position was lost for any recovered topic); the caller
        sends its reply, then runs it. Raises :class:`BrokerUnavailable`, leaving none of
        ``topics`` new."""
        topics = list(dict.fromkeys(topics))
        if isinstance(since, int):
            positions: Positions = dict.fromkeys(topics, since)
            live: list[str] = []
        else:
            positions = {t: since[t] for t in topics if t in since}
            live = [t for t in topics if t not in since]
        new = [t for t in live if t not in conn.topics]
        replay = Replay(self, conn, positions)
        try:
            await self.subscribe(conn, live)
            await replay.start()
        except BaseException:
            await self.unsubscribe(conn, new)
            raise
        return replay

    async def join(self, conn: Connection, topic: str, hold: bool) -> None:
        """Add ``conn`` to ``topic`` (live, or held for a catch-up), taking the broker
        subscription first if it is the topic's first local subscriber."""
        async with self._topic_lock(topic):
            if self.hub.count(topic) == 0:
                await self.broker.subscribe(topic)
            new = topic not in conn.topics
            (self.hub.hold if hold else self.hub.add)(conn, topic)
            if new:
                self.presence.add(topic, conn.principal.sub)

    async def history(self, topic: str, since: int | None, limit: int, max_bytes: int) -> History:
        return await self.broker.history(topic, since, limit, max_bytes)

    async def unsubscribe(self, conn: Connection, topics: list[str]) -> None:
        for topic in topics:
            if topic not in conn.topics:
                continue
            async with self._topic_lock(topic):
                self.presence.remove(topic, conn.principal.sub)
                self.hub.unlisten(conn, topic)
                if self.hub.remove(conn, topic):
                    try:
                        await self.broker.unsubscribe(topic)
                    except BrokerUnavailable as exc:
                        log.warning("broker unsubscribe of %r failed: %s", topic, exc)

    @asynccontextmanager
    async def _topic_lock(self, topic: str) -> AsyncIterator[None]:
        lock, users = self._locks.get(topic) or (asyncio.Lock(), 0)
        self._locks[topic] = (lock, users + 1)
        try:
            async with lock:
                yield
        finally:
            lock, users = self._locks[topic]
            if users == 1:
                del self._locks[topic]
            else:
                self._locks[topic] = (lock, users - 1)

    async def drain(self, window: float) -> None:
        """Stop admitting, then close every socket with 1001 in paced batches within ``window``
        seconds (so its clients do not all reconnect elsewhere in the same instant), and wait,
        up to another ``window``, for them to be gone."""
        self.draining = True
        conns = list(self.hub.connections)
        log.info("draining %d connections over up to %.1f s", len(conns), window)
        if not conns:
            return
        steps = max(1, min(len(conns), int(window / DRAIN_STEP)))
        batch = -(-len(conns) // steps)
        for start in range(0, len(conns), batch):
            if start:
                await asyncio.sleep(DRAIN_STEP)
            for conn in conns[start : start + batch]:
                conn.close(CloseCode.GOING_AWAY, "instance shutting down")
        deadline = time.monotonic() + window
        while self.hub.connections and time.monotonic() < deadline:
            await asyncio.sleep(0.05)

    # -- publishing -------------------------------------------------------------------------

    async def publish(
        self, principal: Principal, topic: str, data_json: bytes, idempotency_key: str | None = None
    ) -> Accepted:
        """Publish across the cluster (the caller checked permissions); BrokerUnavailable on failure."""
        key = None
        if idempotency_key is not None:
            key = hashlib.sha256(f"{principal.sub}\0{idempotency_key}".encode()).hexdigest()
        accepted = await self.broker.publish(topic, data_json, int(time.time() * 1000), key)
        if not accepted.repeated:
            self.metrics.published.inc()
        return accepted

    async def publish_many(
        self, principal: Principal, topics: list[str], data_json: bytes, idempotency_key: str | None = None
    ) -> list[Accepted]:
        """Publish the same data to each of ``topics`` (distinct; the caller checked permissions):
        the answers in their order. BrokerUnavailable when it could not finish: some may have
        been accepted, and a retry with the same key publishes only the rest."""
        key = None
        if idempotency_key is not None:
            key = hashlib.sha256(f"{principal.sub}\0{idempotency_key}".encode()).hexdigest()
        accepted: list[Accepted] = []
        try:
            accepted = await self.broker.publish_many(topics, data_json, int(time.time() * 1000), key)
        except PartlyPublished as exc:
            accepted = exc.accepted  # counted too: a retry answers them as repeated
            raise
        finally:
            fresh = sum(not a.repeated for a in accepted)
            if fresh:
                self.metrics.published.inc(fresh)
        return accepted


def _nan_if_none(value: float | None) -> float:
    return float("nan") if value is None else value
