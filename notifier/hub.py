"""This node's roster: :class:`Connection` (a bounded outbound queue) and :class:`Hub` (topic -> connections).

No ``await`` on the fan-out path. :meth:`Hub.broadcast` hands the one encoded frame of a
notification to each subscriber: a connection whose socket can take it now and has nothing
queued writes it at once through its :class:`Sink` (no queue, no task switch); any other
appends it to its bounded queue for its own writer task, so a slow socket delays nobody else.
"""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Callable, Iterable
from typing import Protocol

from notifier.auth import Principal
from notifier.errors import CloseCode
from notifier.protocol import BROADCAST, Notification

_session_ids = itertools.count(1)

Item = tuple[str, int, int, bytes]  # an outbound frame: (text, size in bytes, ts or 0, encoded or b"")


class Sink(Protocol):
    """Direct, non-blocking writes of encoded frames to a connection's socket (see notifier.ws_edge)."""

    def writable(self) -> bool:
        """True when a write now goes out without piling up (socket open, buffer not full)."""

    def write(self, data: bytes) -> None:
        """Write one encoded frame; never blocks."""

    async def drain(self) -> None:
        """Wait until :meth:`writable` may be true again (or the socket is gone)."""


class Connection:
    """One client socket as the hub sees it.

    Outbound frames wait in ``queue`` as ``(text, size, ts, wire)`` (``ts`` 0 for replies,
    ``wire`` the encoded frame when known) until the socket's writer takes them; ``on_ready``
    tells the edge there is something to write (it starts a writer task only then, so an idle
    or keeping-up connection costs no task). When more than ``max_pending`` bytes are pending
    the connection is doomed: its queue is emptied, the notification frames in it are reported
    to ``on_drop``, and the writer closes it with 1013. Kept small: there are thousands.
    """

    __slots__ = (
        "session",
        "principal",
        "topics",
        "queue",
        "pending",
        "max_pending",
        "busy",
        "on_ready",
        "close_code",
        "close_reason",
        "on_drop",
        "on_close",
        "sink",
        "drained",
        "sse",
    )

    def __init__(
        self, principal: Principal, max_pending: int, on_drop: Callable[[int], None], session: str = ""
    ) -> None:
        self.session = session or f"s{next(_session_ids)}"
        self.principal = principal
        self.topics: set[str] = set()
        self.queue: list[Item] = []  # a list, not a deque: 56 bytes empty, not 600
        self.pending = 0
        self.max_pending = max_pending
        self.busy = False  # the writer holds frames taken from the queue: nothing may overtake them
        self.on_ready: Callable[[], None] = _nothing
        self.close_code: int | None = None
        self.close_reason = ""
        self.on_drop = on_drop
        self.on_close: Callable[[], None] = _nothing
        self.sink: Sink | None = None  # set by the edge once the socket is open
        self.drained: asyncio.Future[None] | None = None  # a replay waiting for the queue to shrink
        self.sse = False  # a Server-Sent Events stream: notifications go out as their ``sse`` bytes

    def deliver(self, n: Notification) -> bool:
        """Hand over one notification: True when written to the socket at once, else queued."""
        sink = self.sink
        if sink is None or self.queue or self.busy or self.close_code is not None or not sink.writable():
            self.enqueue(n)
            return False
        sink.write(n.sse_chunk if self.sse else n.wire)
        return True

    def enqueue(self, n: Notification) -> None:
        """Queue one notification for the writer (replays, and sockets that cannot take it now)."""
        self.push(n.frame, n.size, n.ts, n.sse if self.sse else n.wire)

    def push(self, text: str, size: int, ts: int = 0, wire: bytes = b"") -> None:
        """Queue one frame (never blocks); overflow dooms the connection."""
        if self.close_code is not None:
            if ts:
                self.on_drop(1)
            return
        self.pending += size
        self.queue.append((text, size, ts, wire))
        if self.pending > self.max_pending:
            self.close(CloseCode.TRY_AGAIN_LATER, "client too slow")
            return
        self.on_ready()

    def push_first(self, text: str, wire: bytes = b"") -> None:
        """Queue a frame ahead of everything already queued (the ``hello``)."""
        size = len(text.encode())
        self.pending += size
        self.queue.insert(0, (text, size, 0, wire))
        self.on_ready()

    def close(self, code: int, reason: str = "") -> None:
        """Ask the writer to close the socket; frames still queued are dropped (and counted)."""
        if self.close_code is not None:
            return
        self.close_code, self.close_reason = code, reason
        lost = sum(1 for _, _, ts, _ in self.queue if ts)
        self.queue.clear()
        self.pending = 0
        if lost:
            self.on_drop(lost)
        self.wake()
        self.on_ready()
        self.on_close()

    async def wait_drained(self, size: int) -> None:
        """Return once ``size`` more bytes fit in half the bound (at once when nothing is
        pending), or the connection is closing: a replay goes at the pace the socket drains."""
        while self.pending and self.pending + size > self.max_pending // 2 and self.close_code is None:
            self.drained = asyncio.get_running_loop().create_future()
            try:
                await self.drained
            finally:
                self.drained = None

    def wake(self) -> None:
        """Called by the writer as the queue shrinks (and on close): let a waiting replay go on."""
        waiter = self.drained
        if waiter is not None and not waiter.done() and (
            self.close_code is not None or self.pending <= self.max_pending // 2
        ):
            waiter.set_result(None)

    def take(self) -> list[Item]:
        """Everything queued, oldest first, for the writer to send in one go."""
        batch, self.queue = self.queue, []
        return batch


def _nothing() -> None:
    pass


class Held:
    """Live notifications of one topic buffered for a connection while it catches up on history.

    Bounded: past ``limit`` bytes the buffer is emptied and ``overflowed`` set (what it held is
    in history, which the replay reads again); it keeps buffering from there.
    """

    __slots__ = ("items", "size", "limit", "overflowed")

    def __init__(self, limit: int) -> None:
        self.items: list[Notification] = []
        self.size = 0
        self.limit = limit
        self.overflowed = False

    def append(self, n: Notification) -> None:
        self.size += n.size
        if self.size > self.limit:
            self.items, self.size, self.overflowed = [], 0, True
        else:
            self.items.append(n)


HELD_BYTES = 256 * 1024  # per held topic and connection


class Hub:
    """The local roster: which connections hold which topic. Only the node mutates it.

    A connection catching up on history is *held* on a topic: it counts as a subscriber (the
    broker subscription stays) but live notifications are buffered for it (in a bounded
    :class:`Held`) instead of queued, until the node has replayed history and releases it.
    """

    def __init__(self) -> None:
        self._topics: dict[str, set[Connection]] = {}
        self._held: dict[str, dict[Connection, Held]] = {}
        self.connections: set[Connection] = set()
        self.per_user: dict[str, int] = {}  # user (token sub) -> its open connections; no zeros kept
        # topic -> the connections that asked for its join and leave events (notifier.presence)
        self.listeners: dict[str, set[Connection]] = {}

    def user_attached(self, sub: str) -> None:
        self.per_user[sub] = self.per_user.get(sub, 0) + 1

    def user_detached(self, sub: str) -> None:
        left = self.per_user.get(sub, 0) - 1
        if left > 0:
            self.per_user[sub] = left
        else:
            self.per_user.pop(sub, None)

    def add(self, conn: Connection, topic: str) -> None:
        self._topics.setdefault(topic, set()).add(conn)
        conn.topics.add(topic)

    def hold(self, conn: Connection, topic: str) -> None:
        """Buffer ``topic`` for ``conn`` from now on (moving it off live delivery if it was live)."""
        subscribers = self._topics.get(topic)
        if subscribers is not None and conn in subscribers:
            subscribers.discard(conn)
            if not subscribers:
                del self._topics[topic]
        self._held.setdefault(topic, {})[conn] = Held(HELD_BYTES)
        conn.topics.add(topic)

    def held(self, conn: Connection, topic: str) -> Held | None:
        """The buffer of ``conn`` held on ``topic`` (None if not held)."""
        return self._held.get(topic, {}).get(conn)

    def subscribers(self, topic: str) -> list[Connection]:
        """Every local connection on ``topic``, live or held."""
        return [*self._topics.get(topic, ()), *self._held.get(topic, ())]

    def release(self, conn: Connection, topic: str) -> list[Notification]:
        """Turn a held subscription live; returns what was buffered meanwhile, oldest first."""
        held = self._held.get(topic)
        buffered = held.pop(conn, None) if held is not None else None
        if held is not None and not held:
            del self._held[topic]
        if topic in conn.topics:
            self.add(conn, topic)
        return buffered.items if buffered is not None else []

    def remove(self, conn: Connection, topic: str) -> bool:
        """Take ``conn`` off ``topic``; True when that left the topic with no local subscriber."""
        conn.topics.discard(topic)
        held = self._held.get(topic)
        if held is not None and held.pop(conn, None) is not None and not held:
            del self._held[topic]
        subscribers = self._topics.get(topic)
        if subscribers is not None:
            subscribers.discard(conn)
            if not subscribers:
                del self._topics[topic]
        return self.count(topic) == 0

    def listen(self, conn: Connection, topics: list[str]) -> None:
        """Send ``conn`` the join and leave events of ``topics`` (those it holds, not broadcast)."""
        for topic in topics:
            if topic != BROADCAST and topic in conn.topics:
                self.listeners.setdefault(topic, set()).add(conn)

    def unlisten(self, conn: Connection, topic: str) -> None:
        """No more join and leave events of ``topic`` for ``conn``."""
        listening = self.listeners.get(topic)
        if listening is not None:
            listening.discard(conn)
            if not listening:
                del self.listeners[topic]

    def count(self, topic: str) -> int:
        return len(self._topics.get(topic, ())) + len(self._held.get(topic, ()))

    def topics(self) -> Iterable[str]:
        return list(self._topics.keys() | self._held.keys())

    def broadcast(self, notification: Notification) -> int:
        """Hand ``notification`` to every local subscriber; returns how many got it written at once
        (the others have it queued)."""
        held = self._held.get(notification.topic)
        if held:
            for buffer in held.values():
                buffer.append(notification)
        subscribers = self._topics.get(notification.topic)
        if not subscribers:
            return 0
        written = 0
        for conn in subscribers:
            written += conn.deliver(notification)
        return written
