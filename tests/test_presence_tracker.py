"""The instance side of presence (notifier.presence.PresenceTracker), in-process over the memory
broker: what it sends the broker, how often, and what it does when the broker fails or forgot it."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest

from notifier import presence as presence_module
from notifier.broker import PresenceChange
from notifier.broker_memory import MemoryBroker
from notifier.errors import BrokerUnavailable
from notifier.presence import PresenceTracker

pytestmark = pytest.mark.anyio


class Recording(MemoryBroker):
    """The memory broker, recording each presence call; ``failing`` makes them raise, and
    ``forgot`` makes the next update say the broker lost this node."""

    def __init__(self) -> None:
        super().__init__()
        self.calls: list[list[PresenceChange]] = []
        self.failing = False
        self.forgot = False
        self.round_trip = 0.0  # seconds each call takes, as a round trip to Redis does

    async def presence_update(self, changes: list[PresenceChange]) -> bool:
        if self.failing:
            raise BrokerUnavailable("redis: Connection refused")
        self.calls.append(list(changes))
        await asyncio.sleep(self.round_trip)
        await super().presence_update(changes)
        forgot, self.forgot = self.forgot, False
        return forgot


async def settled(broker: Recording, tracker: PresenceTracker, what: str) -> None:
    """Wait (with a deadline) until the tracker has nothing pending."""
    async with asyncio.timeout(5):
        while tracker._dirty or (tracker._flusher is not None and not tracker._flusher.done()):
            await asyncio.sleep(0.01)
    assert not tracker._dirty, what


async def test_changes_of_one_moment_go_in_one_call_as_net_absolute_counts() -> None:
    broker = Recording()
    await broker.start(lambda n: None, lambda c: None, lambda lost: None)
    tracker = PresenceTracker(broker)
    for _ in range(3):
        tracker.add("room", "alice")
    tracker.add("room", "bob")
    tracker.remove("room", "bob")  # came and went before the flush: sent as 0, no event
    tracker.add("broadcast", "alice")  # never tracked
    tracker.remove("ghost", "nobody")  # never added: nothing
    await settled(broker, tracker, "one flush")
    assert broker.calls == [[("room", "alice", 3), ("room", "bob", 0)]]
    assert (await tracker.query("room")).users == [("alice", 3)]
    assert tracker.counts == {"room": {"alice": 3}}
    for _ in range(3):
        tracker.remove("room", "alice")
    await settled(broker, tracker, "the leave")
    assert broker.calls[-1] == [("room", "alice", 0)] and tracker.counts == {}
    assert (await tracker.query("room")).count == 0


async def test_a_steady_stream_of_handshakes_makes_one_call_per_flush_delay() -> None:
    """Many: 400 users joining one by one over about 0.8 s are sent in a few calls (at most one
    per FLUSH_DELAY), not one per user (what the benchmark found: 280 calls a second)."""
    broker = Recording()
    await broker.start(lambda n: None, lambda c: None, lambda lost: None)
    broker.round_trip = 0.004
    tracker = PresenceTracker(broker)
    started = time.monotonic()
    for i in range(400):
        tracker.add("room", f"user{i}")
        await asyncio.sleep(0.002)
    await settled(broker, tracker, "all sent")
    took = time.monotonic() - started
    assert sum(len(c) for c in broker.calls) == 400
    assert len(broker.calls) <= took / presence_module.FLUSH_DELAY + 2, (len(broker.calls), took)
    assert (await tracker.query("room")).count == 400


async def test_a_failing_broker_keeps_the_changes_and_they_go_once_it_answers(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(presence_module, "RETRY_DELAY", 0.05)
    broker = Recording()
    await broker.start(lambda n: None, lambda c: None, lambda lost: None)
    tracker = PresenceTracker(broker)
    broker.failing = True
    tracker.add("room", "alice")
    async with asyncio.timeout(5):
        while not tracker._failing:
            await asyncio.sleep(0.01)
    assert tracker._dirty and broker.calls == []
    tracker.add("room", "bob")
    broker.failing = False
    await settled(broker, tracker, "sent after the failure")
    assert sorted(c for call in broker.calls for c in call) == [("room", "alice", 1), ("room", "bob", 1)]


async def test_a_broker_that_forgot_this_node_gets_every_count_again() -> None:
    broker = Recording()
    await broker.start(lambda n: None, lambda c: None, lambda lost: None)
    tracker = PresenceTracker(broker)
    tracker.add("a", "alice")
    tracker.add("b", "bob")
    await settled(broker, tracker, "first")
    broker.forgot = True
    tracker.add("c", "carol")
    await settled(broker, tracker, "the resend")
    assert broker.calls[-1] == [("a", "alice", 1), ("b", "bob", 1), ("c", "carol", 1)]


async def test_close_sends_what_is_pending_and_says_goodbye() -> None:
    said: list[Any] = []

    class Goodbye(Recording):
        async def presence_goodbye(self) -> None:
            said.append(list(self.calls))

    broker = Goodbye()
    await broker.start(lambda n: None, lambda c: None, lambda lost: None)
    tracker = PresenceTracker(broker)
    tracker.start()
    tracker.add("room", "alice")
    tracker.remove("room", "alice")
    await tracker.close(2)
    assert said == [[[("room", "alice", 0)]]]


async def test_a_listener_that_never_takes_its_events_is_closed_at_its_bound_and_others_go_on() -> None:
    """Never reading: join/leave frames count against the connection's send-queue bound like any
    frame. A listener whose queue is never drained is closed with 1013 once 2 KiB wait, holding no
    more than that; another listener on the same topic keeps getting every event."""
    from notifier.auth import Principal
    from notifier.errors import CloseCode
    from notifier.hub import Connection
    from notifier.metrics import Metrics
    from notifier.node import Node

    broker = MemoryBroker()
    node = Node(broker, Metrics())
    await broker.start(node._deliver, lambda c: None, lambda lost: None)
    stuck = Connection(Principal("stuck", frozenset({"subscribe"}), None, 2**31), 2048, lambda n: None)
    reader = Connection(Principal("reader", frozenset({"subscribe"}), None, 2**31), 2048, lambda n: None)
    got: list[str] = []

    def drain() -> None:  # what a socket's writer does, at once
        for text, size, _ts, _wire in reader.take():
            got.append(text)
            reader.pending -= size

    reader.on_ready = drain
    for conn in (stuck, reader):
        node.attach(conn)
        await node.subscribe(conn, ["room"])
        node.hub.listen(conn, ["room"])
    held = 0
    for start in range(0, 400, 50):
        await broker.presence_update([("room", f"user{i}", 1) for i in range(start, start + 50)])
        held = max(held, stuck.pending)
    assert stuck.close_code == CloseCode.TRY_AGAIN_LATER
    assert held <= 2048 + 100 and stuck.queue == []
    assert len(got) == 400 and all('"type":"join"' in text for text in got)
