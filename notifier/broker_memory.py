"""The in-process broker (``memory://``): one node, no setup. Also the test double for brokers."""

from __future__ import annotations

import heapq
import time
from collections import OrderedDict, deque
from dataclasses import replace
from itertools import islice

from notifier.broker import (
    CONTROL_TOPIC,
    IDEMPOTENCY_TTL,
    UNBOUNDED,
    Bookkeeping,
    History,
    OnNotification,
    OnResync,
    OnState,
    PresenceChange,
    PresenceEvent,
    PresenceState,
    Rejections,
    complete,
    next_id,
    presence_message,
    topic_idempotency_key,
)
from notifier.protocol import Accepted, Notification


def _now_us() -> int:
    return time.time_ns() // 1000


class _Topic:
    """One topic's retained history: a ring of the last N, its first id, the highest trimmed."""

    __slots__ = ("ring", "origin", "trimmed", "expires")

    def __init__(self, size: int, origin: int) -> None:
        self.ring: deque[Notification] = deque(maxlen=size)
        self.origin = origin
        self.trimmed: int | None = None
        self.expires = 0.0


class MemoryBroker:
    """Delivers synchronously to this process's node; ids from the clock, history in a ring per topic.

    Histories expire ``history_ttl`` seconds after their topic's last publish: they are kept in
    order of last publish and the expired ones are dropped from the front as publishing goes on.
    """

    def __init__(self, history_size: int = 1000, history_ttl: int = 86400) -> None:
        self.connected = False
        self.probe_lag: float | None = 0.0  # nothing between publisher and subscriber
        self._seq = self._epoch = next_id(0, _now_us())
        self._history_size = history_size
        self._ttl = history_ttl
        self._history: OrderedDict[str, _Topic] = OrderedDict()
        self._topics: set[str] = {CONTROL_TOPIC}
        self._rejections: Rejections = {}
        self._answers: dict[str, tuple[float, Accepted]] = {}
        self._deliver: OnNotification = lambda _n: None
        self._presence: dict[str, dict[str, int]] = {}  # topic -> user -> connections (no zeros)

    async def start(self, on_notification: OnNotification, on_state: OnState, on_resync: OnResync) -> None:
        self._deliver = on_notification
        self.connected = True
        on_state(True)

    async def close(self) -> None:
        self.connected = False

    async def publish(
        self, topic: str, data_json: bytes, ts: int, idempotency_key: str | None = None
    ) -> Accepted:
        if idempotency_key is not None:
            previous = self._remembered(idempotency_key)
            if previous is not None:
                return replace(previous, repeated=True)
        self._seq = next_id(self._seq, _now_us())
        notification = Notification.build(self._seq, topic, data_json, ts)
        accepted = Accepted(notification.id, topic, ts)
        if idempotency_key is not None:
            self._answers[idempotency_key] = (time.monotonic() + IDEMPOTENCY_TTL, accepted)
        self._retain(notification)
        if topic in self._topics:
            self._deliver(notification)
        return accepted

    async def publish_many(
        self, topics: list[str], data_json: bytes, ts: int, idempotency_key: str | None = None
    ) -> list[Accepted]:
        # One step, as Redis's script: nothing else runs until every topic is published.
        first = self._remembered(idempotency_key) if idempotency_key is not None else None
        now = time.monotonic()
        answers: list[Accepted] = []
        for topic in topics:
            key = None
            if idempotency_key is not None:
                key = topic_idempotency_key(idempotency_key, topic)
                entry = self._answers.get(key)
                previous = entry[1] if entry is not None and entry[0] > now else None
                if previous is None and first is not None and first.topic == topic:
                    previous = first
                if previous is not None:
                    answers.append(replace(previous, repeated=True))
                    continue
            self._seq = next_id(self._seq, _now_us())
            notification = Notification.build(self._seq, topic, data_json, ts)
            accepted = Accepted(notification.id, topic, ts)
            if key is not None:
                self._answers[key] = (now + IDEMPOTENCY_TTL, accepted)
            self._retain(notification)
            if topic in self._topics:
                self._deliver(notification)
            answers.append(accepted)
        if idempotency_key is not None and first is None and answers:
            self._answers[idempotency_key] = (now + IDEMPOTENCY_TTL, replace(answers[0], repeated=False))
        return answers

    def _retain(self, notification: Notification) -> None:
        if self._history_size == 0:
            return
        now = time.monotonic()
        self._expire(now)
        kept = self._history.get(notification.topic)
        if kept is None:
            kept = self._history[notification.topic] = _Topic(self._history_size, notification.id)
        else:
            self._history.move_to_end(notification.topic)
        if len(kept.ring) == kept.ring.maxlen:
            kept.trimmed = kept.ring[0].id
        kept.ring.append(notification)
        kept.expires = now + self._ttl

    def _expire(self, now: float) -> None:
        """Drop the histories whose last publish is older than the TTL (oldest first)."""
        if self._ttl <= 0:
            return
        while self._history:
            topic, kept = next(iter(self._history.items()))
            if kept.expires > now:
                return
            del self._history[topic]

    async def history(
        self, topic: str, since: int | None, limit: int, max_bytes: int = UNBOUNDED
    ) -> History:
        self._expire(time.monotonic())
        kept = self._history.get(topic)
        ring = kept.ring if kept is not None else deque()
        if since is None:
            found = list(islice(reversed(ring), limit))
        else:
            found = list(islice((n for n in ring if n.id > since), limit))
        found, more = _fit(found, max_bytes)
        if since is None:
            found.reverse()
        book = Bookkeeping(
            epoch=self._epoch,
            origin=kept.origin if kept is not None else None,
            trimmed=kept.trimmed if kept is not None else None,
            now=_now_us(),
            ttl=self._ttl,
            size=self._history_size,
        )
        return History(found, book.size > 0 if since is None else complete(since, book), more)

    async def subscribe(self, topic: str) -> None:
        self._topics.add(topic)

    async def unsubscribe(self, topic: str) -> None:
        self._topics.discard(topic)

    async def reject(self, sub: str, before: int, until: int) -> None:
        self._rejections[sub] = (before, until)

    async def rejections(self) -> Rejections:
        now = time.time()
        self._rejections = {s: r for s, r in self._rejections.items() if r[1] > now}
        return dict(self._rejections)

    async def presence_update(self, changes: list[PresenceChange]) -> bool:
        events: list[PresenceEvent] = []
        for topic, user, count in changes:
            users = self._presence.setdefault(topic, {})
            old = users.get(user, 0)
            if count > 0:
                users[user] = count
                if old == 0:
                    events.append((topic, "join", user))
            else:
                users.pop(user, None)
                if old > 0:
                    events.append((topic, "leave", user))
            if not users:
                del self._presence[topic]
        if events:
            await self.publish(CONTROL_TOPIC, presence_message(events), time.time_ns() // 1_000_000)
        return False

    async def presence_beat(self, topics: list[str]) -> bool:
        return False  # one node: nothing to keep alive, nobody to sweep

    async def presence_goodbye(self) -> None:
        self._presence.clear()

    async def presence(self, topic: str, limit: int) -> PresenceState:
        users = self._presence.get(topic, {})
        first = heapq.nsmallest(limit, users)
        return PresenceState(len(users), [(user, users[user]) for user in first])

    def _remembered(self, key: str) -> Accepted | None:
        now = time.monotonic()
        if len(self._answers) > 10000:  # keep memory bounded: forget what has expired
            self._answers = {k: v for k, v in self._answers.items() if v[0] > now}
        entry = self._answers.get(key)
        return entry[1] if entry is not None and entry[0] > now else None


def _fit(found: list[Notification], max_bytes: int) -> tuple[list[Notification], bool]:
    """The leading notifications whose frames fit in ``max_bytes`` (at least one); True if cut."""
    total = 0
    for index, n in enumerate(found):
        total += n.size
        if total > max_bytes and index > 0:
            return found[:index], True
    return found, False
