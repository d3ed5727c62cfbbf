"""The in-process broker (``memory://``): one node, no setup. Also the test double for brokers."""

from __future__ import annotations

import time
from dataclasses import replace

from notifier.broker import IDEMPOTENCY_TTL, OnNotification, OnState, first_id
from notifier.protocol import Accepted, Notification


class MemoryBroker:
    """Delivers synchronously to this process's node; ids come from a plain counter."""

    def __init__(self) -> None:
        self.connected = False
        self._seq = first_id(int(time.time() * 1000))
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
        if topic in self._topics:
            self._deliver(notification)
        return accepted

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
