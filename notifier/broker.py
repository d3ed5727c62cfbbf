"""The :class:`Broker` protocol: how notifications move between nodes, and its factory.

A broker is picked by the URL scheme (``memory://``, ``redis://``, ``rediss://``); each
implementation lives in a sibling module ``broker_<kind>.py`` imported lazily.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from notifier.protocol import Accepted, Notification

OnNotification = Callable[[Notification], None]
OnState = Callable[[bool], None]

IDEMPOTENCY_TTL = 300  # seconds a repeated Idempotency-Key gets the first answer again


def first_id(ts_ms: int) -> int:
    """Where a fresh id counter starts: above any id a counter started earlier can have reached.

    Ids stay increasing across a broker restart that lost the counter (a Redis without
    persistence, a restarted memory broker) unless more than 1,000 notifications a millisecond
    were published on average since the older counter started.
    """
    return ts_ms * 1000


@dataclass(frozen=True, slots=True)
class History:
    """Retained notifications of one topic, oldest first; ``complete`` when none after ``since`` was lost."""

    notifications: list[Notification]
    complete: bool


class Broker(Protocol):
    """Moves notifications between the nodes sharing it.

    Contract:
    - ``publish`` assigns the id (strictly increasing across every node sharing the broker)
      and the frame in one atomic step and returns only once the notification is accepted;
      it raises ``BrokerUnavailable`` (nothing accepted) when it cannot.
    - Delivery is at most once per subscription, in id order per topic, through the
      ``on_notification`` callback given to ``start`` (called on the event loop, must not block).
    - ``subscribe`` returns once the topic's subscription is active everywhere: a notification
      published after it returns is delivered. It raises ``BrokerUnavailable`` on failure.
    - After a lost link the broker reconnects by itself and resubscribes every topic it holds;
      ``on_state`` reports each change of ``connected``.
    """

    connected: bool
    probe_lag: float | None  # seconds the last probe of the link took (None: none came back yet)

    async def start(self, on_notification: OnNotification, on_state: OnState) -> None:
        """Connect (a broker that cannot connect yet keeps trying in the background)."""

    async def close(self) -> None:
        """Release every connection and background task."""

    async def publish(
        self, topic: str, data_json: bytes, ts: int, idempotency_key: str | None = None
    ) -> Accepted:
        """Publish ``data_json`` (encoded JSON) to ``topic``; a repeated key returns the first answer."""

    async def history(self, topic: str, since: int | None, limit: int) -> History:
        """Retained notifications of ``topic``: the first ``limit`` with id > ``since``, or without
        ``since`` the last ``limit``; oldest first. ``complete`` is False when a notification
        with id > ``since`` was trimmed away (or history is disabled). BrokerUnavailable on failure.
        """

    async def subscribe(self, topic: str) -> None:
        """Start receiving ``topic`` on this node."""

    async def unsubscribe(self, topic: str) -> None:
        """Stop receiving ``topic`` on this node."""


def create_broker(url: str, history_size: int = 1000) -> Broker:
    """The broker for ``url``'s scheme, keeping the last ``history_size`` notifications per topic."""
    if url.startswith("memory://"):
        from notifier.broker_memory import MemoryBroker

        return MemoryBroker(history_size)
    if url.startswith(("redis://", "rediss://")):
        from notifier.broker_redis import RedisBroker

        return RedisBroker(url, history_size)
    raise ValueError(f"unsupported broker URL: {url!r}")
