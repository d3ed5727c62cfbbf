"""Presence: which users hold connections on which topic, across the deployment.

Each node counts its own connections per (topic, user) here (:class:`PresenceTracker`) and
sends the counts that changed to the broker a moment later, as absolute numbers, so that many
handshakes cost one broker call and a connection opened and closed in between costs none. The
broker keeps every node's counts and each topic's totals, turns a total leaving 0 into a
``join`` event and one reaching 0 into a ``leave``, and publishes them on the control topic in
the order they happened (``Broker.presence_update``).

Nodes heartbeat every :data:`HEARTBEAT` seconds; a node silent for
:data:`~notifier.broker.PRESENCE_DEAD_AFTER` seconds is swept by the others (its users' leaves
published), and its records expire in the broker besides. A node the broker forgot (swept
while paused, or a broker that lost its data) sends all its counts again.

The ``broadcast`` topic is not tracked: every connection holds it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterator

from notifier.broker import Broker, PresenceChange, PresenceState
from notifier.errors import BrokerUnavailable
from notifier.protocol import BROADCAST

log = logging.getLogger("notifier.presence")

FLUSH_DELAY = 0.05  # seconds changes wait to be sent together (the contract allows 2 s in all)
RETRY_DELAY = 1.0  # seconds before a failed send is tried again
HEARTBEAT = 5.0  # seconds between two heartbeats
CHUNK_CHANGES = 256  # changes in one broker call (keeps each call short for the broker)
CHUNK_BYTES = 8192  # and their names' bytes: the events message of one call stays small
REFRESH_PER_BEAT = 256  # topics whose records one heartbeat keeps from expiring
MAX_LISTED = 1000  # users one presence answer lists


class PresenceTracker:
    """This node's connections per (topic, user), mirrored to the broker.

    Bounded by what it mirrors: one entry per (topic, user) pair held by this node's
    connections, and at most that many pending changes.
    """

    def __init__(self, broker: Broker) -> None:
        self.broker = broker
        self.counts: dict[str, dict[str, int]] = {}  # topic -> user -> local connections (no zeros)
        self._dirty: dict[tuple[str, str], None] = {}  # pairs whose count the broker has not got yet
        self._flusher: asyncio.Task[None] | None = None
        self._beater: asyncio.Task[None] | None = None
        self._refresh: Iterator[str] = iter(())
        self._failing = False

    def add(self, topic: str, user: str) -> None:
        if topic == BROADCAST:
            return
        users = self.counts.setdefault(topic, {})
        users[user] = users.get(user, 0) + 1
        self._changed(topic, user)

    def remove(self, topic: str, user: str) -> None:
        users = self.counts.get(topic)
        if users is None or user not in users:
            return
        left = users[user] - 1
        if left > 0:
            users[user] = left
        else:
            del users[user]
            if not users:
                del self.counts[topic]
        self._changed(topic, user)

    def resend_all(self) -> None:
        """Send every count again (the broker may have lost them)."""
        for topic, users in self.counts.items():
            for user in users:
                self._dirty[(topic, user)] = None
        if self._dirty:
            self._kick()

    async def query(self, topic: str) -> PresenceState:
        """Who is on ``topic`` across the deployment (the first MAX_LISTED users). BrokerUnavailable
        on failure."""
        return await self.broker.presence(topic, MAX_LISTED)

    def start(self) -> None:
        self._beater = asyncio.get_running_loop().create_task(self._beat(), name="notifier-presence-beat")

    async def close(self, timeout: float) -> None:
        """Send what is pending and say goodbye (best effort within ``timeout``), then stop."""
        if self._beater is not None:
            self._beater.cancel()
            await asyncio.gather(self._beater, return_exceptions=True)
        try:
            async with asyncio.timeout(timeout):
                if self._flusher is not None:
                    await asyncio.gather(self._flusher, return_exceptions=True)
                await self._send()
                await self.broker.presence_goodbye()
        except (BrokerUnavailable, TimeoutError) as exc:
            log.warning("presence goodbye failed (the others sweep this node's presence away): %s", exc)
        if self._flusher is not None:
            self._flusher.cancel()
            await asyncio.gather(self._flusher, return_exceptions=True)

    def _changed(self, topic: str, user: str) -> None:
        self._dirty[(topic, user)] = None
        self._kick()

    def _kick(self) -> None:
        if self._flusher is None or self._flusher.done():
            self._flusher = asyncio.get_running_loop().create_task(self._flush())

    async def _flush(self) -> None:
        """Send pending changes shortly, again while more come, retrying while the broker fails."""
        delay = FLUSH_DELAY
        while self._dirty:
            await asyncio.sleep(delay)
            try:
                await self._send()
            except BrokerUnavailable as exc:
                if not self._failing:
                    log.warning("presence not sent, retrying every %.0f s: %s", RETRY_DELAY, exc)
                self._failing = True
                delay = RETRY_DELAY
            else:
                if self._failing:
                    log.info("presence sent again")
                self._failing = False
                delay = FLUSH_DELAY

    async def _send(self) -> None:
        """Send the changes pending now in chunks (those made meanwhile wait for the next turn, so
        a steady stream of handshakes still makes one call per FLUSH_DELAY); what fails stays
        pending."""
        pending = list(self._dirty)
        while pending:
            chunk: list[PresenceChange] = []
            size = taken = 0
            for topic, user in pending:
                if len(chunk) >= CHUNK_CHANGES or (chunk and size + len(topic) + len(user) > CHUNK_BYTES):
                    break
                taken += 1
                if self._dirty.pop((topic, user), False) is None:  # still pending (not sent meanwhile)
                    chunk.append((topic, user, self.counts.get(topic, {}).get(user, 0)))
                    size += len(topic) + len(user)
            del pending[:taken]
            if not chunk:
                continue
            try:
                forgotten = await self.broker.presence_update(chunk)
            except BaseException:
                for topic, user, _count in chunk:
                    self._dirty.setdefault((topic, user), None)
                raise
            if forgotten:
                self.resend_all()

    async def _beat(self) -> None:
        while True:
            delay = HEARTBEAT
            try:
                if await self.broker.presence_beat(self._topics_to_refresh()):
                    self.resend_all()
            except BrokerUnavailable as exc:
                log.debug("presence heartbeat failed: %s", exc)
                delay = RETRY_DELAY
            except Exception:  # noqa: BLE001 - the heartbeat must outlive any one failure
                log.exception("presence heartbeat failed")
            await asyncio.sleep(delay)

    def _topics_to_refresh(self) -> list[str]:
        """The next few topics whose records this heartbeat keeps alive (all of them in turn)."""
        topics: list[str] = []
        for topic in self._refresh:
            topics.append(topic)
            if len(topics) >= REFRESH_PER_BEAT:
                return topics
        self._refresh = iter(list(self.counts))
        return topics
