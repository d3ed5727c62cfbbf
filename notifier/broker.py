"""The :class:`Broker` protocol: how notifications move between nodes, and its factory.

A broker is picked by the URL scheme (``memory://``, ``redis://``, ``rediss://``,
``redis+sentinel://``, ``redis+cluster://``); each
implementation lives in a sibling module ``broker_<kind>.py`` imported lazily.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from notifier.errors import BrokerUnavailable
from notifier.protocol import Accepted, Notification, dumps

OnNotification = Callable[[Notification], None]
OnState = Callable[[bool], None]
OnResync = Callable[[list[str]], None]

IDEMPOTENCY_TTL = 300  # seconds a repeated Idempotency-Key gets the first answer again
# Messages between nodes (an administrator's disconnect, say) travel as notifications of this
# topic: every broker holds it from the start, no client can subscribe to it (not a valid
# topic name), and a node missing some while its link was down gets them like any topic.
CONTROL_TOPIC = "$control"
Rejections = dict[str, tuple[int, int]]  # sub -> (tokens issued before this are refused, until)
# Ids run ahead of the clock only when more than one notification a microsecond is published:
# this much lead is tolerated before an expiry check could call a lost history complete.
CLOCK_LEAD = 100_000  # microseconds
UNBOUNDED = 1 << 62  # no byte bound on a history read


PresenceChange = tuple[str, str, int]  # (topic, user, this node's connections of the user on it now)
# A presence event: (topic, "join" or "leave", user). Brokers publish them as control messages
# {"type": "presence", "events": [[topic, kind, user], ...]}, in the order they happened.
PresenceEvent = tuple[str, str, str]
PRESENCE_DEAD_AFTER = 15  # seconds without a heartbeat after which a node's presence is swept away


@dataclass(frozen=True, slots=True)
class PresenceState:
    """Who is on a topic across the deployment: ``count`` users, the first ``users`` of them
    (sorted) with their connections."""

    count: int
    users: list[tuple[str, int]]


def presence_message(events: list[PresenceEvent]) -> bytes:
    """The control message that carries presence events (see :data:`CONTROL_TOPIC`)."""
    return dumps({"type": "presence", "events": [list(e) for e in events]}).encode()


class PartlyPublished(BrokerUnavailable):
    """A publish to many topics that could not finish: ``accepted`` are the answers known to
    have been accepted before it failed (more may have been)."""

    def __init__(self, message: str, accepted: list[Accepted]) -> None:
        super().__init__(message)
        self.accepted = accepted


def topic_idempotency_key(key: str, topic: str) -> str:
    """The idempotency key of ``topic`` in a publish to many topics under ``key``."""
    return hashlib.sha256(f"{key}\0{topic}".encode()).hexdigest()


def next_id(last: int, now_us: int) -> int:
    """The id after ``last``: the clock in microseconds, or ``last + 1`` when that is not above it.

    An id is thus about its publish time: ids keep increasing across a broker that lost its
    counter (a Redis without persistence, a restarted memory broker) and across a topic's
    expiry, and an id tells how long ago it was published (see :func:`complete`).
    """
    return max(last + 1, now_us)


@dataclass(frozen=True, slots=True)
class History:
    """Retained notifications of one topic, oldest first.

    ``complete``: none with id after ``since`` was lost (trimmed, expired, or gone with the
    broker's data). ``more``: the byte bound cut the answer short.
    """

    notifications: list[Notification]
    complete: bool
    more: bool = False


@dataclass(frozen=True, slots=True)
class Bookkeeping:
    """What a broker knows of a topic's retained history, to judge a recovery from ``since``.

    ``epoch``: the id from which the broker's data is whole (None: lost, e.g. a wiped Redis);
    ``origin``: the first id of the topic's current history (None: it has none); ``trimmed``:
    the highest id trimmed away (None: none); ``now``: the broker's clock in microseconds;
    ``ttl``: seconds a history lives after its last publish (0: forever); ``size``: entries kept.
    """

    epoch: int | None
    origin: int | None
    trimmed: int | None
    now: int
    ttl: int
    size: int


def complete(since: int, book: Bookkeeping) -> bool:
    """Whether every notification of the topic with id after ``since`` is still retained.

    ``since`` 0 means from the beginning of the broker's data. A history that expired leaves
    no trace, so an expiry is inferred from the ids (which are publish times): with no history
    now, anything published after ``since`` would still be here if ``since`` is younger than
    the TTL; and a history that began after ``since`` cannot have had a predecessor expire in
    between if it began within a TTL of ``since``. Unsure is never reported as complete.
    """
    if book.size <= 0 or book.epoch is None:
        return False
    since = since or book.epoch
    if since < book.epoch or (book.trimmed is not None and book.trimmed > since):
        return False
    if book.ttl <= 0:
        return True
    window = book.ttl * 1_000_000 - CLOCK_LEAD
    if book.origin is None:
        return book.now - since < window
    return book.origin <= since or book.origin - since < window


class Broker(Protocol):
    """Moves notifications between the nodes sharing it.

    Contract:
    - ``publish`` assigns the id (strictly increasing across every node sharing the broker, and
      across a loss of the broker's data: see :func:`next_id`)
      and the frame in one atomic step and returns only once the notification is accepted;
      it raises ``BrokerUnavailable`` (nothing accepted) when it cannot.
    - Delivery is at most once per subscription, in id order per topic, through the
      ``on_notification`` callback given to ``start`` (called on the event loop, must not block).
    - ``subscribe`` returns once the topic's subscription is active everywhere: a notification
      published after it returns is delivered. It raises ``BrokerUnavailable`` on failure.
    - After a lost link the broker reconnects by itself, resubscribes every topic it holds and
      delivers what was published meanwhile, in order, before anything newer; where it cannot,
      it names the topics to ``on_resync``. ``on_state`` reports each change of ``connected``.
    - History is kept per topic (the last N, for a TTL after the last publish) and never
      reported complete when something after ``since`` may be gone.
    """

    connected: bool
    probe_lag: float | None  # seconds the last probe of the link took (None: none came back yet)

    async def start(self, on_notification: OnNotification, on_state: OnState, on_resync: OnResync) -> None:
        """Connect (a broker that cannot connect yet keeps trying in the background).

        ``on_resync(lost)`` is called each time the subscriptions were rebuilt after a lost
        link, once what was published meanwhile has been delivered: ``lost`` names the topics
        for which that could not be done (their subscribers must be told: 1012).
        """

    async def close(self) -> None:
        """Release every connection and background task."""

    async def publish(
        self, topic: str, data_json: bytes, ts: int, idempotency_key: str | None = None
    ) -> Accepted:
        """Publish ``data_json`` (encoded JSON) to ``topic``; a repeated key returns the first answer."""

    async def publish_many(
        self, topics: list[str], data_json: bytes, ts: int, idempotency_key: str | None = None
    ) -> list[Accepted]:
        """Publish ``data_json`` to each of ``topics`` (distinct, at most 1000): the answers in the
        order given, their ids increasing in that order. With ``idempotency_key``, each topic is
        published at most once under it (its key: :func:`topic_idempotency_key`; the key itself
        holds the first answer, as ``publish`` keeps it, and counts for the topic it names): a
        repeated one gets its first answer (``repeated``). ``BrokerUnavailable`` when it cannot
        finish: a prefix of the new ones may have been accepted (and remembered under their keys,
        so that a retry with the same key publishes only the rest)."""

    async def history(
        self, topic: str, since: int | None, limit: int, max_bytes: int = UNBOUNDED
    ) -> History:
        """Retained notifications of ``topic``: the first ``limit`` with id > ``since``, or without
        ``since`` the last ``limit``; oldest first; at least one, and no more than fit in
        ``max_bytes`` of frames (then ``more``), read in chunks so that little more is held.
        ``complete`` as :func:`complete` says (False when history is disabled).
        BrokerUnavailable on failure.
        """

    async def subscribe(self, topic: str) -> None:
        """Start receiving ``topic`` on this node."""

    async def unsubscribe(self, topic: str) -> None:
        """Stop receiving ``topic`` on this node."""

    async def reject(self, sub: str, before: int, until: int) -> None:
        """Record, for every node, that ``sub``'s tokens issued before ``before`` are refused
        until ``until`` (unix seconds). BrokerUnavailable on failure."""

    async def rejections(self) -> Rejections:
        """Every rejection recorded and not yet over. BrokerUnavailable on failure."""

    async def presence_update(self, changes: list[PresenceChange]) -> bool:
        """Record this node's connection counts per (topic, user) (absolute numbers: sending one
        twice changes nothing); True, as :meth:`presence_beat` says, when the node must send all
        its counts again. A user whose deployment-wide count goes from 0 up is published
        as a ``join`` event, down to 0 as a ``leave`` (:func:`presence_message`, atomically with
        the change, so every node sees events in the order they happened). BrokerUnavailable on
        failure (then nothing of this call may have been recorded: send it again)."""

    async def presence_beat(self, topics: list[str]) -> bool:
        """This node's heartbeat (every few seconds): keeps its presence alive, keeps ``topics``'
        records from expiring, and sweeps away the presence of nodes silent for
        :data:`PRESENCE_DEAD_AFTER` seconds (publishing their users' leaves). True when the
        broker had no record of this node (new, swept, or the broker lost its data): the node
        must send all its counts again. BrokerUnavailable on failure."""

    async def presence_goodbye(self) -> None:
        """This node is leaving: take its remaining presence away now (leaves published).
        BrokerUnavailable on failure."""

    async def presence(self, topic: str, limit: int) -> PresenceState:
        """Who is on ``topic`` across the deployment: the first ``limit`` users by name, and
        how many there are. BrokerUnavailable on failure."""


def create_broker(url: str, history_size: int = 1000, history_ttl: int = 86400) -> Broker:
    """The broker for ``url``'s scheme, keeping the last ``history_size`` notifications per topic
    for ``history_ttl`` seconds after the topic's last publish (0: forever)."""
    if url.startswith("memory://"):
        from notifier.broker_memory import MemoryBroker

        return MemoryBroker(history_size, history_ttl)
    # Sentinel is a topology of the same Redis broker, not another broker (notifier.redis_topology).
    if url.startswith(("redis://", "rediss://", "redis+sentinel://")):
        from notifier.broker_redis import RedisBroker

        return RedisBroker(url, history_size, history_ttl)
    if url.startswith("redis+cluster://"):  # the same scripts and keys, one slot per topic
        from notifier.broker_cluster import ClusterBroker

        return ClusterBroker(url, history_size, history_ttl)
    raise ValueError(f"unsupported broker URL: {url!r}")
