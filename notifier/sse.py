"""``GET /v1/sse``: the WebSocket's stream as Server-Sent Events, for clients and proxies without
WebSockets (``EventSource`` reconnects by itself and resumes with ``Last-Event-ID``).

The same handshake as ``/v1/ws`` (token, topics, ``since``, limits, refusals before the stream
starts), the same roster (a :class:`~notifier.hub.Connection` marked ``sse``: the hub writes each
notification's SSE event, encoded and chunk-framed once per notification, not per stream,
straight to the socket through the HTTP edge's sink while the client keeps up, and queues it
for the stream's writer otherwise), recovery, slow-consumer cut, drain and metrics. What
differs: no client frames (a stream is read-only), a ``: ping`` comment every 15 s instead of
WebSocket pings, and a close is the end of the response (the client learns nothing of a code;
``EventSource`` reconnects with ``Last-Event-ID``).
"""

from __future__ import annotations

import asyncio
import logging
import time

from starlette.types import Receive, Scope, Send

from notifier.errors import BrokerUnavailable, CloseCode
from notifier.hub import Connection, Item
from notifier.protocol import dumps, sse_event
from notifier.replay import Replay
from notifier.services import Services
from notifier.ws import (
    ABORT_EXTENSION,
    CLOSE_GRACE,
    EXPIRY_GRACE,
    SINK_EXTENSION,
    Handshake,
    HandshakeSlot,
    admit,
    authorize,
    count_refusal,
    header,
    join,
)

log = logging.getLogger("notifier.sse")

SSE_PATH = "/v1/sse"
PING_INTERVAL = 15.0  # seconds between two ": ping" comments (proxies close idle responses)
PING = b": ping\n\n"
HEADERS = [
    (b"content-type", b"text/event-stream; charset=utf-8"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # nginx: pass each event on at once, whatever proxy_buffering says
]


async def sse_endpoint(services: Services, scope: Scope, receive: Receive, send: Send) -> None:
    node = services.node
    slot = HandshakeSlot(node)
    try:
        try:
            slot.take()
            principal, topics, since, presence = await authorize(services, scope)
            last = header(scope, b"last-event-id")
            if last is not None:  # EventSource's resume: newer than any since of the URL
                if not (last.isdigit() and len(last) <= 20):
                    raise Handshake(403, "Last-Event-ID must be a notification id", "forbidden")
                since = int(last)
            conn = admit(services, principal)
        except Handshake as refusal:
            await _deny(services, send, refusal)
            return
        conn.sse = True
        try:
            try:
                hello, replay = await join(node, conn, topics, since, presence)
            except BrokerUnavailable as exc:
                await _deny(services, send, Handshake(503, f"broker unavailable: {exc}"))
                return
            await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
            services.metrics.handshakes.labels("accepted").inc()
            sink = scope.get("extensions", {}).get(SINK_EXTENSION)  # notifier.http_edge's
            conn.sink = sink["sink"] if sink else None
            hello["topics"] = sorted(conn.topics)
            text = dumps(hello)
            conn.push_first(text, sse_event("hello", text))
            slot.release()
            await Stream(services, scope, conn, receive, send).run(replay)
        finally:
            await node.detach(conn)
    finally:
        slot.release()


async def _deny(services: Services, send: Send, refusal: Handshake) -> None:
    count_refusal(services, refusal)
    body = dumps({"detail": refusal.detail}).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": refusal.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class Stream:
    """One open event stream: writes what the hub queues (and a ping when idle long enough),
    ends the response when the connection is closed, and notices the client leaving."""

    def __init__(
        self, services: Services, scope: Scope, conn: Connection, receive: Receive, send: Send
    ) -> None:
        self.services, self.scope, self.conn = services, scope, conn
        self.receive, self.send = receive, send
        self.ready = asyncio.Event()
        self.timers: list[asyncio.TimerHandle] = []

    async def run(self, replay: Replay | None) -> None:
        conn, loop = self.conn, asyncio.get_running_loop()
        conn.on_ready = self.ready.set
        conn.on_close = self._closing
        self.ready.set()  # the hello is queued
        if conn.principal.exp is not None:
            delay = max(0.0, conn.principal.exp - time.time()) + EXPIRY_GRACE
            expire = loop.call_later(delay, conn.close, CloseCode.POLICY_VIOLATION, "token expired")
            self.timers.append(expire)
        tasks = [loop.create_task(self._write()), loop.create_task(self._watch())]
        if replay is not None:
            tasks.append(loop.create_task(replay.run()))
        try:
            await asyncio.wait(tasks[:2], return_when=asyncio.FIRST_COMPLETED)
        finally:
            for timer in self.timers:
                timer.cancel()
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def _watch(self) -> None:
        """The client left (or the server is ending the response): nothing more to write."""
        while (await self.receive())["type"] != "http.disconnect":
            pass

    def _closing(self) -> None:
        """A close was asked for: a writer blocked on a client that does not read is cut off."""
        self.ready.set()
        self.timers.append(asyncio.get_running_loop().call_later(CLOSE_GRACE, self._abort))

    def _abort(self) -> None:
        abort = self.scope.get("extensions", {}).get(ABORT_EXTENSION)
        if abort is not None:
            log.info("dropping stream %s: it did not drain within %.0f s", self.conn.session, CLOSE_GRACE)
            abort["abort"]()

    async def _write(self) -> None:
        conn, send = self.conn, self.send
        try:
            while conn.close_code is None:
                if not conn.queue:
                    self.ready.clear()
                    try:
                        async with asyncio.timeout(PING_INTERVAL):
                            await self.ready.wait()
                    except TimeoutError:
                        await send({"type": "http.response.body", "body": PING, "more_body": True})
                        continue
                    continue
                batch = conn.take()
                conn.busy = True
                try:
                    await send({"type": "http.response.body", "body": _body(batch), "more_body": True})
                finally:
                    conn.busy = False
                self._sent(batch)
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the client went away mid-send; _watch sees it too
            log.debug("stream %s ended: %r", conn.session, exc)

    def _sent(self, batch: list[Item]) -> None:
        conn = self.conn
        delivered = last_ts = 0
        for _text, size, ts, _wire in batch:
            if conn.close_code is None:
                conn.pending -= size
            if ts:
                delivered += 1
                last_ts = ts
        if conn.drained is not None:
            conn.wake()
        if delivered:
            metrics = self.services.metrics
            metrics.delivered.inc(delivered)
            metrics.latency.observe(max(0.0, time.time() - last_ts / 1000))


def _body(batch: list[Item]) -> bytes:
    """Queued items as events: notifications carry their encoded event; anything else (a reply
    frame, which a stream has no use for) goes out as an event of its own type."""
    return b"".join(wire or sse_event("message", text) for text, _size, _ts, wire in batch)
