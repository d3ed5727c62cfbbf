"""The in-process broker (``memory://``): one node, no setup. Also the test double for brokers."""

from __future__ import annotations

import time
from collections import deque
from dataclasses import replace
from itertools import islice

from notifier.broker import IDEMPOTENCY_TTL, History, OnNotification, OnState, first_id
from notifier.protocol import Accepted, Notification


class MemoryBroker:
    """Delivers synchronously to this process's node; ids from a counter, history in a ring per topic."""

    def __init__(self, history_size: int = 1000) -> None:
        self.connected = False
        self.probe_lag: float | None = 0.0  # nothing between publisher and subscriber
        self._seq = self._epoch = first_id(int(time.time() * 1000))
        self._history_size = history_size
        self._history: dict[str, deque[Notification]] = {}
        self._trimmed: dict[str, int] = {}  # topic -> highest id dropped from its history
        self._topics: set[str] = set()
        self._answers: dict[str, tuple[float, Accepted]] = {}
        self._deliver: OnNotification = lambda _n: None

    async def start(self, on_notification: OnNotification, on_state: OnState) -> None:
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
        self._seq += 1
        notification = Notification.build(self._seq, topic, data_json, ts)
        accepted = Accepted(notification.id, topic, ts)
        if idempotency_key is not None:
            self._answers[idempotency_key] = (time.monotonic() + IDEMPOTENCY_TTL, accepted)
        self._retain(notification)
        if topic in self._topics:
            self._deliver(notification)
        return accepted

    def _retain(self, notification: Notification) -> None:
        if self._history_size == 0:
            return
        ring = self._history.get(notification.topic)
        if ring is None:
            ring = self._history[notification.topic] = deque(maxlen=self._history_size)
        if len(ring) == ring.maxlen:
            self._trimmed[notification.topic] = ring[0].id
        ring.append(notification)

    async def history(self, topic: str, since: int | None, limit: int) -> History:
        ring = self._history.get(topic, ())
        if since is None:
            found = list(ring)[-limit:] if limit else []
        else:
            found = list(islice((n for n in ring if n.id > since), limit))
        # Anything before this process's first id, or trimmed away, is lost to a recovery.
        lost_before = max(self._trimmed.get(topic, 0), self._epoch)
        complete = self._history_size > 0 and (since is None or lost_before <= since)
        return History(found, complete)

    async def subscribe(self, topic: str) -> None:
        self._topics.add(topic)

    async def unsubscribe(self, topic: str) -> None:
        self._topics.discard(topic)

    def _remembered(self, key: str) -> Accepted | None:
        now = time.monotonic()
        if len(self._answers) > 10000:  # keep memory bounded: forget what has expired
            self._answers = {k: v for k, v in self._answers.items() if v[0] > now}
        entry = self._answers.get(key)
        return entry[1] if entry is not None and entry[0] > now else None
