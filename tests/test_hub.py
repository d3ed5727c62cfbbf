"""The local fan-out: one shared frame per notification, bounded outbound queues, slow consumers."""

from __future__ import annotations

import json

from notifier.auth import Principal
from notifier.errors import CloseCode
from notifier.hub import Connection, Hub
from notifier.protocol import Notification

ALICE = Principal("alice", frozenset({"subscribe", "publish"}), None, None)


class Drops:
    """An ``on_drop`` callback that remembers what it was told."""

    def __init__(self) -> None:
        self.calls: list[int] = []

    def __call__(self, count: int) -> None:
        self.calls.append(count)

    @property
    def total(self) -> int:
        return sum(self.calls)


def notification(id_: int, topic: str = "news", padding: int = 0) -> Notification:
    return Notification.build(id_, topic, json.dumps({"n": id_, "pad": "x" * padding}).encode(), 1_000 + id_)


def connection(max_pending: int = 1 << 20, drops: Drops | None = None) -> Connection:
    return Connection(ALICE, max_pending, drops if drops is not None else Drops())


def texts(conn: Connection) -> list[str]:
    return [text for text, *_ in conn.take()]


# -- fan-out -----------------------------------------------------------------------------------


def test_every_subscriber_gets_the_very_same_frame_object() -> None:
    hub = Hub()
    subscribers = [connection() for _ in range(3)]
    for conn in subscribers:
        hub.add(conn, "news")
    n = notification(1)
    assert hub.broadcast(n) == 0  # no sink: every frame is queued for the writer
    for conn in subscribers:
        (text,) = texts(conn)
        assert text is n.frame


def test_a_notification_reaches_only_subscribers_of_its_topic() -> None:
    hub = Hub()
    news, sport = connection(), connection()
    hub.add(news, "news")
    hub.add(sport, "sport")
    hub.broadcast(notification(1, "news"))
    assert len(texts(news)) == 1
    assert texts(sport) == []


def test_a_topic_without_local_subscribers_delivers_to_nobody() -> None:
    assert Hub().broadcast(notification(1, "nobody-here")) == 0


def test_a_connection_removed_from_a_topic_gets_nothing_more() -> None:
    hub = Hub()
    leaving, staying = connection(), connection()
    hub.add(leaving, "news")
    hub.add(staying, "news")
    assert hub.remove(leaving, "news") is False  # someone is still subscribed here
    hub.broadcast(notification(1))
    assert texts(leaving) == []
    assert len(texts(staying)) == 1
    assert hub.remove(staying, "news") is True  # the last local subscriber left
    assert hub.broadcast(notification(2)) == 0


def test_frames_leave_in_the_order_they_were_queued() -> None:
    hub = Hub()
    conn = connection()
    hub.add(conn, "news")
    ns = [notification(i) for i in range(1, 6)]
    for n in ns:
        hub.broadcast(n)
    assert texts(conn) == [n.frame for n in ns]
    assert texts(conn) == []  # taken once


def test_push_first_puts_the_hello_ahead_of_everything_queued() -> None:
    conn = connection()
    a, b = notification(1), notification(2)
    conn.push(a.frame, a.size, a.ts)
    conn.push(b.frame, b.size, b.ts)
    hello = json.dumps({"type": "hello", "session": conn.session, "user": "alice", "topics": []})
    conn.push_first(hello)
    assert texts(conn) == [hello, a.frame, b.frame]


def test_each_connection_has_its_own_session_id() -> None:
    assert len({connection().session for _ in range(50)}) == 50


# -- slow consumers ----------------------------------------------------------------------------


def test_pending_bytes_up_to_the_limit_keep_the_connection() -> None:
    n = notification(1)
    conn = connection(max_pending=n.size * 3)
    for _ in range(3):
        conn.push(n.frame, n.size, n.ts)
    assert conn.close_code is None
    assert len(conn.take()) == 3


def test_passing_the_limit_dooms_the_connection_with_1013_and_counts_every_pending_notification() -> None:
    drops = Drops()
    n = notification(1, padding=300)
    conn = connection(max_pending=n.size * 3, drops=drops)
    for _ in range(4):
        conn.push(n.frame, n.size, n.ts)
    assert conn.close_code == CloseCode.TRY_AGAIN_LATER == 1013
    assert drops.total == 4  # the three pending and the one that overflowed
    assert conn.take() == []  # nothing of it is sent any more


def test_replies_pending_at_overflow_are_not_counted_as_dropped_notifications() -> None:
    drops = Drops()
    n = notification(1, padding=300)
    conn = connection(max_pending=n.size * 2, drops=drops)
    pong = '{"type":"pong"}'
    conn.push(pong, len(pong))
    conn.push(n.frame, n.size, n.ts)
    conn.push(pong, len(pong))
    conn.push(n.frame, n.size, n.ts)
    assert conn.close_code == 1013
    assert drops.total == 2


def test_notifications_for_a_doomed_connection_are_counted_as_dropped() -> None:
    drops = Drops()
    hub = Hub()
    n = notification(1, padding=300)
    conn = connection(max_pending=n.size, drops=drops)
    hub.add(conn, "news")
    hub.broadcast(n)
    hub.broadcast(n)  # overflow
    assert conn.close_code == 1013
    assert drops.total == 2
    hub.broadcast(notification(2))
    hub.broadcast(notification(3))
    assert drops.total == 4
    conn.push('{"type":"pong"}', 15)  # a reply is no notification
    assert drops.total == 4
    assert conn.take() == []


def test_a_slow_subscriber_does_not_hold_up_the_others() -> None:
    hub = Hub()
    n = notification(1, padding=300)
    slow, fast = connection(max_pending=n.size), connection()
    hub.add(slow, "news")
    hub.add(fast, "news")
    for _ in range(5):
        hub.broadcast(n)
    assert slow.close_code == 1013
    assert fast.close_code is None
    assert texts(fast) == [n.frame] * 5


def test_a_closed_connection_drops_and_counts_its_queued_notifications() -> None:
    drops = Drops()
    conn = connection(drops=drops)
    for i in range(1, 4):
        n = notification(i)
        conn.push(n.frame, n.size, n.ts)
    conn.close(CloseCode.GOING_AWAY, "shutting down")
    assert conn.close_code == 1001
    assert drops.total == 3
    assert conn.take() == []


def test_the_first_close_code_wins() -> None:
    conn = connection()
    conn.close(CloseCode.POLICY_VIOLATION, "token expired")
    conn.close(CloseCode.GOING_AWAY, "shutting down")
    assert conn.close_code == 1008


# -- direct writes through a sink ---------------------------------------------------------------


class FakeSink:
    """A socket that records what is written and can be made unwritable (a full buffer)."""

    def __init__(self, writable: bool = True) -> None:
        self.open = writable
        self.written: list[bytes] = []

    def writable(self) -> bool:
        return self.open

    def write(self, data: bytes) -> None:
        self.written.append(data)

    async def drain(self) -> None:  # pragma: no cover - the hub never awaits
        raise AssertionError("the hub must not wait on a socket")


def test_writable_sockets_get_the_one_encoded_frame_written_at_once() -> None:
    hub = Hub()
    subscribers = [connection() for _ in range(3)]
    for conn in subscribers:
        conn.sink = FakeSink()
        hub.add(conn, "news")
    n = notification(1)
    assert hub.broadcast(n) == 3
    for conn in subscribers:
        assert conn.sink is not None
        assert conn.sink.written == [n.wire]  # type: ignore[attr-defined]
        assert conn.sink.written[0] is n.wire  # type: ignore[attr-defined]
        assert conn.take() == []


def test_the_encoded_frame_is_a_final_unmasked_text_frame_of_the_json() -> None:
    for padding in (0, 200, 70_000):
        n = notification(1, padding=padding)
        payload = n.frame.encode()
        assert n.wire[0] == 0x81  # FIN + text opcode
        assert n.wire[1] & 0x80 == 0  # server frames are not masked
        length = n.wire[1] & 0x7F
        if length == 126:
            length, offset = int.from_bytes(n.wire[2:4], "big"), 4
        elif length == 127:
            length, offset = int.from_bytes(n.wire[2:10], "big"), 10
        else:
            offset = 2
        assert length == len(payload)
        assert n.wire[offset:] == payload


def test_an_unwritable_socket_queues_and_later_frames_keep_their_order() -> None:
    hub = Hub()
    conn = connection()
    sink = FakeSink(writable=False)
    conn.sink = sink
    hub.add(conn, "news")
    first, second = notification(1), notification(2)
    assert hub.broadcast(first) == 0
    sink.open = True
    # Something is still queued: writing the second now would overtake the first.
    assert hub.broadcast(second) == 0
    assert sink.written == []
    assert texts(conn) == [first.frame, second.frame]
