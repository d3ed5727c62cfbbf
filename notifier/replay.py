"""A recovery (``since``) for one connection: its missed notifications, paged out of history at
the pace its socket drains, then live ones, with no gap and no duplicate. Each topic is
recovered after its own position (one ``since`` id gives every topic the same one).

The topics are *held* on the hub from before their history is read, so everything published
meanwhile is in history, in the held buffer, or both. History is read a page per topic at a
time and merged oldest first; a page is queued only as the connection's queue drains, so a
backlog of any size costs about one page of memory and never a 1013. A held buffer that
overflows is emptied and its notifications read again from history. Going live (releasing
the held topics) happens with no ``await`` after the last check, so nothing slips between.
"""

from __future__ import annotations

import asyncio
import logging
from collections import deque
from typing import TYPE_CHECKING

from notifier.broker import History
from notifier.errors import BrokerUnavailable, CloseCode
from notifier.hub import Connection
from notifier.protocol import Notification, Positions

if TYPE_CHECKING:
    from notifier.node import Node

log = logging.getLogger("notifier.replay")

PAGE_ENTRIES = 64  # notifications read ahead per recovering connection, all topics together
PAGE_BYTES = 256 * 1024  # bytes of frames read ahead, all topics together (at least one each)


class Gap(Exception):
    """History lost something after a recovery was reported whole: the socket gets 1012."""


class Replay:
    """One connection's recovery of each topic of ``positions`` after its own position (the id
    of the last notification of it the client received; see the module docstring)."""

    def __init__(self, node: Node, conn: Connection, positions: Positions) -> None:
        self.node, self.conn = node, conn
        self.topics = list(positions)
        self.recovered = False
        self._pages: dict[str, deque[Notification]] = {t: deque() for t in self.topics}
        self._pos = dict(positions)  # last id queued, per topic
        self._whole: dict[str, bool] = {}  # the first page said nothing was lost
        self._done: set[str] = set()  # history read to its end (for now)
        share = max(1, len(self.topics))
        self._count = max(4, PAGE_ENTRIES // share)
        self._bytes = max(1, PAGE_BYTES // share)

    async def start(self) -> None:
        """Hold every topic, then read its first page: ``recovered`` is known after this.

        Raises :class:`BrokerUnavailable`, leaving none of the new topics subscribed.
        """
        node, conn = self.node, self.conn
        moved: list[str] = []  # topics that were live already: recovered too, then live again
        joined: list[str] = []
        try:
            for topic in self.topics:
                if topic in conn.topics:
                    node.hub.hold(conn, topic)
                    moved.append(topic)
                else:
                    await node.join(conn, topic, hold=True)
                    joined.append(topic)
            await asyncio.gather(*(self._fetch(t) for t in self.topics))
        except BaseException:
            for topic in moved:  # back to live, with whatever arrived meanwhile
                for n in node.hub.release(conn, topic):
                    conn.enqueue(n)
            await node.unsubscribe(conn, joined)
            raise
        self.recovered = all(self._whole.values())

    async def run(self) -> None:
        """Queue the replay as the socket drains, then go live; 1012 if that cannot be whole."""
        try:
            await self._replay()
        except (Gap, BrokerUnavailable) as exc:
            log.info("recovery of %s cut short: %s", self.conn.session, exc)
            self.conn.close(CloseCode.SERVICE_RESTART, "recovery could not be completed; reconnect")
        finally:
            self._pages.clear()

    async def _replay(self) -> None:
        conn, hub = self.conn, self.node.hub
        while conn.close_code is None:
            wanted = [
                t for t in self.topics if not self._pages[t] and t not in self._done and t in conn.topics
            ]
            if wanted:
                await asyncio.gather(*(self._fetch(t) for t in wanted))
                continue
            heads = [(self._pages[t][0].id, t) for t in self.topics if self._pages[t] and t in conn.topics]
            if heads:
                topic = min(heads)[1]
                n = self._pages[topic][0]
                await conn.wait_drained(n.size)
                if conn.close_code is not None:
                    return
                self._pages[topic].popleft()
                if n.id > self._pos[topic]:
                    conn.enqueue(n)
                    self._pos[topic] = n.id
                continue
            # History is read to its end. Buffers that overflowed meanwhile: read on from history.
            again = False
            for topic in self.topics:
                held = hub.held(conn, topic)
                if held is not None and held.overflowed:
                    if self.node.history_size <= 0:
                        conn.close(CloseCode.TRY_AGAIN_LATER, "client too slow")
                        return
                    held.overflowed, again = False, True
                    self._done.discard(topic)
            if not again:
                break
        # No await from the last check to here: nothing arrives unseen in between.
        for topic in self.topics:
            for n in hub.release(conn, topic):
                if n.id > self._pos[topic]:
                    conn.enqueue(n)
                    self._pos[topic] = n.id

    async def _fetch(self, topic: str) -> None:
        history: History = await self.node.broker.history(topic, self._pos[topic], self._count, self._bytes)
        first = topic not in self._whole
        if first:
            self._whole[topic] = history.complete
        elif not history.complete and self._whole[topic]:
            raise Gap(f"history of {topic!r} was trimmed during the recovery")
        self._pages[topic].extend(history.notifications)
        if len(history.notifications) < self._count and not history.more:
            self._done.add(topic)
