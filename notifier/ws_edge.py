"""The WebSocket edge under uvicorn: :class:`WebSocketProtocol` (uvicorn's websockets-sansio
protocol with notifier's ASGI extensions and per-socket bounds), the direct sink a fan-out writes
through, and the lean queue and event that keep an idle socket small."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import HeaderLineTooLong, RequestLineTooLong, TooManyHeaders
from websockets.http11 import Request

from notifier.http_edge import error_response, peer
from notifier.uvicorn_internals import require as _require
from notifier.ws import ABORT_EXTENSION, SINK_EXTENSION

log = logging.getLogger("notifier.server")

# Where the WebSocket protocol logs when NOTIFIER_ACCESS_LOG is off: warnings and errors reach
# uvicorn.error's handlers as before, the lines of every handshake ("connection open", the
# request with [accepted] or its refusal, "connection closed") are not made at all. They were 2
# to 3 records and writes per handshake, 6% of an instance's CPU in a handshake storm (py-spy);
# notifier_handshakes_total counts handshakes by outcome either way.
QUIET_HANDSHAKES = logging.getLogger("uvicorn.error.handshakes")

WRITE_STALL_TIMEOUT = 10.0  # seconds a socket may keep its write buffer full without taking a byte


class DirectSink:
    """Writes already-encoded frames straight to the socket's transport (``notifier.hub.Sink``).

    Valid only where the frame bytes are the same for every connection: no extension such as
    permessage-deflate negotiated. It never writes before the handshake completed, after a close
    was sent, or while the transport is paused (its buffer over the high-water mark).
    """

    __slots__ = ("_protocol",)

    def __init__(self, protocol: WebSocketProtocol) -> None:
        self._protocol = protocol

    def writable(self) -> bool:
        p = self._protocol
        return p.writable.is_set() and p.handshake_complete and not p.close_sent and not p.disconnected

    def write(self, data: bytes) -> None:
        self._protocol.transport.write(data)

    async def drain(self) -> None:
        await self._protocol.writable.wait()


class LeanQueue:
    """What uvicorn's protocol needs of its receive queue (put_nowait, get, empty) without the
    three deques of an ``asyncio.Queue``: thousands of idle sockets each keep one."""

    __slots__ = ("_items", "_waiter")

    def __init__(self) -> None:
        self._items: list[Any] = []
        self._waiter: asyncio.Future[None] | None = None

    def put_nowait(self, item: Any) -> None:
        self._items.append(item)
        waiter, self._waiter = self._waiter, None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def get(self) -> Any:
        while not self._items:
            self._waiter = asyncio.get_running_loop().create_future()
            await self._waiter
        return self._items.pop(0)

    def empty(self) -> bool:
        return not self._items


class LeanEvent:
    """What uvicorn's protocol needs of its ``writable`` event, without a deque per socket."""

    __slots__ = ("_set", "_waiters")

    def __init__(self) -> None:
        self._set = False
        self._waiters: list[asyncio.Future[None]] | None = None

    def is_set(self) -> bool:
        return self._set

    def set(self) -> None:
        self._set = True
        waiters, self._waiters = self._waiters, None
        for waiter in waiters or ():
            if not waiter.done():
                waiter.set_result(None)

    def clear(self) -> None:
        self._set = False

    async def wait(self) -> None:
        if self._set:
            return
        waiter = asyncio.get_running_loop().create_future()
        if self._waiters is None:
            self._waiters = []
        self._waiters.append(waiter)
        await waiter


# -- WebSocket ------------------------------------------------------------------------------------


class WebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's websockets-sansio protocol plus two ASGI extensions:

    - ``notifier.abort``: drops the TCP connection at once. A client that stopped reading
      leaves the transport paused, and then even a close frame waits forever.
    - ``notifier.sink``: a :class:`DirectSink`, offered when no extension was negotiated, so a
      fan-out writes one shared encoded frame to each socket without a task switch or an
      ASGI message per delivery.

    and bounded per socket: while the transport is paused for writing (its buffer over the
    high-water mark) nothing is read from the socket, so control frames (pong answers to a ping
    flood) cannot pile up either; a socket whose write buffer passes ``send_queue_bytes``
    (NOTIFIER_SEND_QUEUE_BYTES, see :func:`websocket_protocol`), or that stays paused for
    ``WRITE_STALL_TIMEOUT``, is dropped (a close frame could not get out: the client does not
    read). A refused handshake the websockets parser answers itself (a request line over its
    8 KiB: 414; a header line over 8 KiB or over 128 headers: 431; anything else it cannot
    parse: 400) gets that answer with our JSON body, instead of silence.
    """

    send_queue_bytes = 1 << 20  # set per server by websocket_protocol()
    _stall: asyncio.TimerHandle | None = None  # an instance attribute only while paused

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not self.config.access_log:
            self.logger = self.conn.logger = QUIET_HANDSHAKES
        self.queue = LeanQueue()  # type: ignore[assignment]
        self.writable = LeanEvent()  # type: ignore[assignment]
        self.writable.set()

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        # A budget under the transport's default high-water mark (64 KiB): pause well before it.
        high = self.send_queue_bytes // 2
        if high < 64 * 1024:
            self.transport.set_write_buffer_limits(high=high)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._stall is not None:
            self._stall.cancel()
            del self._stall
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        super().data_received(data)
        if not self.handshake_initiated and self.conn.handshake_exc is not None:
            self._refuse_handshake(self.conn.handshake_exc)

    def _refuse_handshake(self, exc: Exception) -> None:
        # The websockets parser refused the request before uvicorn saw it, and queued its own
        # answer, which uvicorn never writes (websockets >= 14 with uvicorn 0.54).
        self.conn.data_to_send()
        if isinstance(exc, RequestLineTooLong):
            status = 414
        elif isinstance(exc, (HeaderLineTooLong, TooManyHeaders)):
            status = 431
        else:
            status = 400
        detail = f"WebSocket handshake refused: {exc}"
        if exc.__cause__ is not None:
            detail += f" ({exc.__cause__})"
        self.handshake_initiated = self.handshake_complete = self.close_sent = True
        if not self.transport.is_closing():
            self.transport.write(error_response(status, detail, self.default_headers))
            self.transport.close()

    # -- back-pressure --------------------------------------------------------------------------

    def pause_writing(self) -> None:
        self.writable.clear()
        transport = self.transport
        if transport.is_closing():
            return
        transport.pause_reading()
        if transport.get_write_buffer_size() > self.send_queue_bytes:
            # Called from inside transport.write(): drop the connection once that returned.
            self.loop.call_soon(self._drop, "its write buffer passed NOTIFIER_SEND_QUEUE_BYTES")
        elif self._stall is None:
            self._stall = self.loop.call_later(WRITE_STALL_TIMEOUT, self._drop, "it did not read for long")

    def resume_writing(self) -> None:
        self.writable.set()
        if self._stall is not None:
            self._stall.cancel()
            del self._stall
        if not self.read_paused and not self.transport.is_closing():
            self.transport.resume_reading()

    def _drop(self, why: str) -> None:
        if self.transport.is_closing() and not self.transport.get_write_buffer_size():
            return
        unsent = self.transport.get_write_buffer_size()
        log.info("dropping the socket of %s: %s (%d bytes unsent)", peer(self.client), why, unsent)
        self.transport.abort()

    def handle_ping(self) -> None:
        transport = self.transport
        if transport.is_closing():
            self.conn.data_to_send()  # the pong: nowhere to go
            return
        super().handle_ping()
        if not self.writable.is_set() and transport.get_write_buffer_size() > self.send_queue_bytes:
            self._drop("pong answers passed NOTIFIER_SEND_QUEUE_BYTES")

    async def receive(self) -> Any:
        # uvicorn's receive(), except that reading stays paused while writing is.
        message = await self.queue.get()
        if self.read_paused and self.queue.empty():
            self.read_paused = False
            if self.writable.is_set() and not self.transport.is_closing():
                self.transport.resume_reading()
        return message

    def keepalive_timeout(self) -> None:
        super().keepalive_timeout()
        # uvicorn wrote a 1011 close frame and called transport.close(), which waits for the write
        # buffer to drain: forever, if the peer (that did not answer the ping) does not read.
        if self.transport.is_closing() and self.transport.get_write_buffer_size():
            self.transport.abort()

    def _close_or_abort(self) -> None:
        """Close; abort when something is still unsent (close() would wait for it forever if the
        peer does not read, and a peer that did not answer in time is not reading)."""
        self.close_timer = None
        self.transport.close()
        if self.transport.get_write_buffer_size():
            self.transport.abort()

    # -- ASGI -----------------------------------------------------------------------------------

    async def send(self, message: Any) -> None:
        await super().send(message)
        kind = message["type"]
        if kind == "websocket.accept":
            # The handshake's request and response (headers and all) are not needed any more:
            # about 3 KiB per idle connection. The request object itself stays referenced by
            # the websockets parser's suspended frame, so its headers are emptied in place; the
            # scope's copy too (notifier reads what it needs from them before accepting).
            if self.request is not None:
                self.request.headers.clear()
            self.scope["headers"] = []
            self.request = self.response = None  # type: ignore[assignment]
        elif kind == "websocket.close":
            # uvicorn resumes reading to see the close answer, even if the close frame filled
            # the buffer; and its close timer calls transport.close(), which waits forever for a
            # buffer a client that does not read never empties.
            if not self.writable.is_set() and not self.transport.is_closing():
                self.transport.pause_reading()
            if self.close_timer is not None:
                self.close_timer.cancel()
                self.close_timer = self.loop.call_later(self.close_timeout, self._close_or_abort)

    def handle_connect(self, event: Request) -> None:
        super().handle_connect(event)
        scope = getattr(self, "scope", None)
        if scope is None:
            return
        extensions = scope["extensions"] or {}
        scope["extensions"] = extensions
        extensions[ABORT_EXTENSION] = {"abort": self.transport.abort}
        if not self.conn.extensions:
            extensions[SINK_EXTENSION] = {"sink": DirectSink(self)}


_require(
    WebSocketsSansIOProtocol,
    methods=(
        "connection_made",
        "connection_lost",
        "data_received",
        "pause_writing",
        "resume_writing",
        "handle_ping",
        "handle_connect",
        "keepalive_timeout",
        "receive",
        "send",
    ),
    names={
        "__init__": (
            "config",
            "logger",
            "transport",
            "loop",
            "conn",
            "queue",
            "writable",
            "read_paused",
            "handshake_initiated",
            "handshake_complete",
            "close_sent",
            "close_timer",
            "close_timeout",
            "default_headers",
            "client",
        ),
        "receive": ("queue", "read_paused", "resume_reading"),
        "send": ("close_timer", "read_paused", "resume_reading"),
    },
)


def websocket_protocol(send_queue_bytes: int) -> type[WebSocketProtocol]:
    """:class:`WebSocketProtocol` bounded by ``send_queue_bytes`` a socket, for ``uvicorn.Config(ws=...)``."""

    class Bounded(WebSocketProtocol):
        pass

    Bounded.send_queue_bytes = send_queue_bytes
    Bounded.__name__ = Bounded.__qualname__ = "WebSocketProtocol"
    return Bounded

