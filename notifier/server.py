"""Running one instance under uvicorn, with a graceful drain on SIGTERM / SIGINT.

uvicorn's own shutdown stops listening at once (so readiness probes and new handshakes get
connection refused instead of 503), closes every socket in the same instant (a reconnect storm
on the other instances) and re-raises the signal afterwards (exit status 143, not 0). The
drain here, in named steps:

1. turn draining on: ``/readyz`` answers 503, new handshakes get 503, the listener stays open;
2. close the sockets with 1001 in paced batches over at most half of the shutdown timeout;
3. hand over to uvicorn's shutdown for in-flight HTTP requests, with what is left of the
   timeout; tasks still running then are cancelled;
4. exit with status 0.

The protocols keep an instance safe to reach without nginx in front (:class:`HttpProtocol`:
request heads within 10 s and 16 KiB, bodies that stall given up after 30 s) and bound what
one socket can make it hold, pong answers included (:class:`WebSocketProtocol`).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import http
import logging
import os
import re
import socket
import stat
import time
from functools import partial
from types import FrameType
from typing import Any

import httptools
import orjson
import uvicorn
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol
from websockets.exceptions import HeaderLineTooLong, RequestLineTooLong, TooManyHeaders
from websockets.http11 import Request

from notifier.api import PUBLISH_PATH, RESPOND_EXTENSION
from notifier.node import Node
from notifier.ws import ABORT_EXTENSION, SINK_EXTENSION

log = logging.getLogger("notifier.server")

_TOKEN_IN_QUERY = re.compile(r"(token=)[^&\s\"]+")


class RedactTokens(logging.Filter):
    """Keep bearer tokens passed as ``?token=`` out of the access log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args and isinstance(record.args, tuple):
            record.args = tuple(
                _TOKEN_IN_QUERY.sub(r"\1[redacted]", a) if isinstance(a, str) else a for a in record.args
            )
        # uvicorn's websockets-sansio protocol logs this after every refused handshake, although
        # the denial response (our 403 / 503) was sent; our endpoint never returns otherwise.
        return record.msg != "ASGI callable returned without completing handshake."


# Where the WebSocket protocol logs when NOTIFIER_ACCESS_LOG is off: warnings and errors reach
# uvicorn.error's handlers as before, the lines of every handshake ("connection open", the
# request with [accepted] or its refusal, "connection closed") are not made at all. They were 2
# to 3 records and writes per handshake, 6% of an instance's CPU in a handshake storm (py-spy);
# notifier_handshakes_total counts handshakes by outcome either way.
QUIET_HANDSHAKES = logging.getLogger("uvicorn.error.handshakes")


def install_log_filters() -> None:
    for name in ("uvicorn.access", "uvicorn.error", QUIET_HANDSHAKES.name):
        logging.getLogger(name).addFilter(RedactTokens())
    QUIET_HANDSHAKES.setLevel(logging.WARNING)


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


# -- the edge reached without nginx in front -----------------------------------------------------

HEAD_TIMEOUT = 10.0  # seconds a connection has to send a complete request head
BODY_STALL_TIMEOUT = 30.0  # seconds a request body may go without a byte arriving
MAX_HEAD_BYTES = 16 * 1024  # request line and headers; over it: 431
LINGER_TIMEOUT = 5.0  # after an error answer: seconds the rest of the request is read and discarded
WRITE_STALL_TIMEOUT = 10.0  # seconds a socket may keep its write buffer full without taking a byte
# The protocols below subclass uvicorn's and use some of their private attributes and methods;
# _require() checks at import that those still exist.
BUILT_AGAINST = "uvicorn 0.54.0, websockets 17.4, httptools 0.9.0"


def error_response(status: int, detail: str, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    """A complete HTTP/1.1 answer with our usual ``{"detail": ...}`` body, closing the connection."""
    body = orjson.dumps({"detail": detail})
    head = [b"HTTP/1.1 %d %s\r\n" % (status, http.HTTPStatus(status).phrase.encode())]
    for name, value in default_headers:
        head += [name, b": ", value, b"\r\n"]
    head.append(b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body))
    head.append(b"connection: close\r\n\r\n")
    return b"".join(head) + body


def _require(
    owner: type, methods: tuple[str, ...] = (), names: dict[str, tuple[str, ...]] | None = None
) -> None:
    """Fail at import, with one clear message, when uvicorn no longer has what we override or use.

    ``methods``: methods of ``owner`` we override or call; ``names``: for a method of ``owner``,
    the attribute names its code must still use (an attribute set in ``__init__`` or read by a
    method we replicate). An :class:`ImportError` (this module cannot be used with the uvicorn
    installed), which ``notifier serve`` reports as one line."""
    missing = [m for m in methods if not callable(getattr(owner, m, None))]
    for method, wanted in (names or {}).items():
        code = getattr(getattr(owner, method, None), "__code__", None)
        used = set(code.co_names) if code is not None else set()
        missing += [f"{method}() using .{name}" for name in wanted if name not in used]
    if missing:
        raise ImportError(
            f"notifier.server overrides internals of {owner.__module__}.{owner.__qualname__} that uvicorn "
            f"{uvicorn.__version__} no longer has: {', '.join(missing)}. It was built against "
            f"{BUILT_AGAINST}: install that, or adapt notifier/server.py."
        )


def _peer(client: tuple[str, int] | None) -> str:
    return f"{client[0]}:{client[1]}" if client else "?"


class _HeadTooLarge(Exception):
    """Raised from a parser callback: the request head passed MAX_HEAD_BYTES."""


# The phases of an HTTP connection, for its one timer.
_IDLE, _HEAD, _BODY, _LINGER = range(4)


class HttpProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol, safe to reach without nginx in front:

    - a connection must send a complete request head within ``HEAD_TIMEOUT`` of its start (or of
      the first byte of its next request); otherwise it is closed (408 when part of a head came);
    - a head over ``MAX_HEAD_BYTES`` gets 431, a WebSocket handshake too, and what the parser
      holds of an unfinished head is never more than ``MAX_HEAD_BYTES`` plus one read;
    - a request body that goes ``BODY_STALL_TIMEOUT`` without a byte arriving is given up: 408
      (if no answer was started) and the connection closed.

    Between requests uvicorn's own ``timeout_keep_alive`` closes an idle connection. One timer at
    most per connection, armed only while a head or a body is awaited. After an error answer the
    rest of the request is read and discarded for up to ``LINGER_TIMEOUT``, so the client reads
    the answer instead of a reset. Everything else is uvicorn's.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase = _IDLE
        self._timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0  # bytes received since the head began (whole reads: may count a body)
        self._head_counted = True  # False: the head began inside a read, _head_bytes counts less
        self._head_since = 0.0  # loop time the head began
        self._body_at = 0.0  # loop time the body last made progress

    # -- timers ---------------------------------------------------------------------------------

    def _arm(self, delay: float, callback: Any) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self._timer = self.loop.call_later(delay, callback)

    def _disarm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _start_head(self, counted: bool = True) -> None:
        # No timer yet: data_received arms one only if the head is still incomplete after a read
        # (most heads arrive whole in the read that starts them).
        self._phase = _HEAD
        self._head_bytes = 0
        self._head_counted = counted
        self._head_since = self.loop.time()

    def _head_timed_out(self) -> None:
        self._timer = None
        if self._phase != _HEAD or self.transport.is_closing():
            return
        if self._head_bytes == 0 and self.cycle is None:
            self.transport.close()  # a connection that never sent a byte: nothing to answer
            return
        self._refuse(408, f"request head not complete within {HEAD_TIMEOUT:.0f} s")

    def _body_stalled(self) -> None:
        self._timer = None
        if self._phase != _BODY or self.transport.is_closing():
            return
        now = self.loop.time()
        if self.flow.read_paused:  # we hold the body back (the app has not taken it): not a stall
            self._body_at = now
        left = self._body_at + BODY_STALL_TIMEOUT - now
        if left > 0:
            self._timer = self.loop.call_later(left, self._body_stalled)
            return
        self._refuse(408, f"request body stalled for {BODY_STALL_TIMEOUT:.0f} s")

    def _refuse(self, status: int, detail: str) -> None:
        """Answer ``status`` and close the connection.

        A head refused while the answer to an earlier (pipelined) request is still on its way:
        that answer goes out, then the connection closes, and nothing more is read. A body given
        up: the app waiting for it sees a disconnect; if its answer was already started, the
        connection is just closed.
        """
        self._disarm()
        # uvicorn internals: self.cycle (RequestResponseCycle: response_started, response_complete,
        # keep_alive, disconnected, message_event) and self.flow, checked at import (_require).
        cycle = self.cycle
        if self._phase == _BODY and cycle is not None:
            cycle.disconnected = True
            cycle.message_event.set()
            if cycle.response_started:
                self._close()
                return
        elif cycle is not None and not cycle.response_complete:
            cycle.keep_alive = False
            self.flow.pause_reading()
            self._phase = _IDLE
            return
        log.info("HTTP %d to %s: %s", status, _peer(self.client), detail)
        self.transport.write(error_response(status, detail, self.server_state.default_headers))
        self._phase = _LINGER
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.flow.resume_reading()
        self._timer = self.loop.call_later(LINGER_TIMEOUT, self._close)

    def _close(self) -> None:
        self._timer = None
        # close() would wait for a write buffer a client that does not read never empties.
        if self.transport.get_write_buffer_size():
            self.transport.abort()
        else:
            self.transport.close()

    # -- asyncio.Protocol -----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._start_head()
        self._arm(HEAD_TIMEOUT, self._head_timed_out)  # a connection that never sends a byte

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        self._phase = _IDLE
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        phase = self._phase
        if phase == _HEAD:
            self._head_bytes += len(data)
        elif phase == _BODY:
            self._body_at = self.loop.time()
        elif phase == _LINGER:
            return  # discarded: the answer is out, the connection is ending
        elif not self.pipeline and (self.cycle is None or self.cycle.response_complete):
            self._start_head()  # the next request begins (or stray bytes: they get a deadline too)
            self._head_bytes = len(data)
        # From here, uvicorn's HttpToolsProtocol.data_received (0.54), plus the refusals. uvicorn
        # internals used: parser, _unset_keepalive_if_required, _should_upgrade,
        # handle_websocket_upgrade, _unsupported_upgrade_warning, send_400_response.
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as exc:
            if isinstance(exc.__context__, _HeadTooLarge):
                self._refuse(431, f"request headers over {MAX_HEAD_BYTES} bytes")
                return
            self._parser_error()
            return
        except httptools.HttpParserError:
            self._parser_error()
            return
        except httptools.HttpParserUpgrade:
            if self._should_upgrade():
                self.handle_websocket_upgrade()
            else:
                self._unsupported_upgrade_warning()
            return
        if self._phase == _HEAD:
            if self._head_bytes > MAX_HEAD_BYTES:
                self._refuse(431, f"request headers over {MAX_HEAD_BYTES} bytes")
            elif self._timer is None:
                left = self._head_since + HEAD_TIMEOUT - self.loop.time()
                self._timer = self.loop.call_later(max(0.0, left), self._head_timed_out)
        elif self._phase == _BODY and self._timer is None:
            self._body_at = self.loop.time()
            self._timer = self.loop.call_later(BODY_STALL_TIMEOUT, self._body_stalled)

    def _parser_error(self) -> None:
        self._disarm()
        msg = "Invalid HTTP request received."
        self.logger.warning(msg)
        self.send_400_response(msg)

    # -- parser callbacks -----------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        if self._phase != _HEAD:  # a pipelined request, begun inside a read
            self._start_head(counted=False)

    def on_headers_complete(self) -> None:
        if self._head_bytes > MAX_HEAD_BYTES or not self._head_counted:
            # Whole reads counted more than the limit (maybe a body with them), or the head began
            # inside a read: measure the head itself.
            size = len(self.url) + sum(len(name) + len(value) + 4 for name, value in self.headers)
            if size > MAX_HEAD_BYTES:
                raise _HeadTooLarge(size)
        self._disarm()
        self._phase = _IDLE if self.parser.should_upgrade() and self._should_upgrade() else _BODY
        super().on_headers_complete()
        scope, cycle = self.scope, self.cycle
        if cycle is not None and cycle.scope is scope and scope["path"] == PUBLISH_PATH:
            extensions: dict[str, Any] = scope.setdefault("extensions", {})
            extensions[RESPOND_EXTENSION] = partial(respond_whole, cycle)

    def on_message_complete(self) -> None:
        if self._phase == _BODY:
            self._phase = _IDLE
            self._disarm()
        super().on_message_complete()
        if self.parser.should_upgrade() and self._should_upgrade():
            return  # a WebSocket handshake: the connection is the WebSocket's now, not ours to time
        cycle = self.cycle
        if cycle is not None and cycle.response_complete and self.timeout_keep_alive_task is None:
            # The answer went out before the body ended (a 413, say): uvicorn armed its keep-alive
            # timer then, and the body's later bytes cancelled it. Arm it again (uvicorn internals:
            # timeout_keep_alive_task, timeout_keep_alive_handler), or the connection idles forever.
            self.timeout_keep_alive_task = self.loop.call_later(
                self.timeout_keep_alive, self.timeout_keep_alive_handler
            )


_require(
    HttpToolsProtocol,
    methods=(
        "connection_made",
        "connection_lost",
        "data_received",
        "on_message_begin",
        "on_headers_complete",
        "on_message_complete",
        "handle_websocket_upgrade",
        "send_400_response",
        "_unset_keepalive_if_required",
        "_should_upgrade",
        "_unsupported_upgrade_warning",
        "timeout_keep_alive_handler",
    ),
    names={
        "__init__": (
            "loop",
            "parser",
            "pipeline",
            "cycle",
            "flow",
            "transport",
            "server_state",
            "client",
            "timeout_keep_alive",
            "timeout_keep_alive_task",
        ),
        "on_message_begin": ("url", "headers"),
        "data_received": ("_unset_keepalive_if_required", "feed_data", "send_400_response"),
    },
)
_require(
    RequestResponseCycle,
    names={
        "__init__": (
            "scope",
            "transport",
            "flow",
            "access_log",
            "access_logger",
            "default_headers",
            "response_started",
            "response_complete",
            "waiting_for_100_continue",
            "keep_alive",
            "disconnected",
            "message_event",
            "on_response",
        )
    },
)


def respond_whole(
    cycle: RequestResponseCycle, status: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> bool:
    """A whole answer in one write, as uvicorn's ``send`` writes it in two (status line and
    headers, then the body) after checking each header: the ``notifier.respond`` extension of
    ``POST /v1/notifications`` (see ``api.publish_endpoint``), whose few headers are its own.
    False when it cannot (the client's writes are paused, or it left): ``send`` then does.
    uvicorn internals, checked at import: the cycle's state as its ``send`` keeps it."""
    if cycle.response_started or cycle.disconnected or cycle.flow.write_paused:
        return False
    cycle.response_started = True
    cycle.waiting_for_100_continue = False
    if cycle.access_log:
        scope = cycle.scope
        where, path = get_client_addr(scope), get_path_with_query_string(scope)
        cycle.access_logger.info(  # uvicorn's AccessFormatter takes exactly these five
            '%s - "%s %s HTTP/%s" %d', where, scope["method"], path, scope["http_version"], status
        )
    content = [STATUS_LINE[status]]
    for name, value in cycle.default_headers:
        content += (name, b": ", value, b"\r\n")
    for name, value in headers:
        content += (name, b": ", value, b"\r\n")
    if not cycle.keep_alive:
        content.append(b"connection: close\r\n")
    content += (b"content-length: %d\r\n\r\n" % len(body), body)
    cycle.transport.write(b"".join(content))
    cycle.response_complete = True
    cycle.message_event.set()
    if not cycle.keep_alive:
        cycle.transport.close()
    cycle.on_response()
    return True


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
        log.info("dropping the socket of %s: %s (%d bytes unsent)", _peer(self.client), why, unsent)
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


def bind_unix_socket(path: str) -> socket.socket:
    """A listening-ready Unix socket at ``path``, readable and writable by every local user (a
    proxy's workers often run as another user). A socket file left by a process that died is
    replaced; one that still answers is not. ``OSError`` says why it cannot be had."""
    if os.path.exists(path):
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            raise OSError(errno.EEXIST, "it exists and is not a socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(path)
            except ConnectionRefusedError:
                os.unlink(path)
            else:
                raise OSError(errno.EADDRINUSE, "a running server listens there")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o666)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def remove_unix_socket(path: str, sock: socket.socket) -> None:
    """Close ``sock`` and remove its file ``path``, if that is still a socket."""
    sock.close()
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first SIGTERM / SIGINT drains the node; a second one hurries it."""

    def __init__(
        self,
        config: uvicorn.Config,
        node: Node,
        shutdown_timeout: float,
        unix_socket: socket.socket | None = None,
    ) -> None:
        super().__init__(config)
        self.node = node
        self.shutdown_timeout = shutdown_timeout
        self.unix_socket = unix_socket
        self.unix_path: str = unix_socket.getsockname() if unix_socket is not None else ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        install_log_filters()
        try:
            await super().serve(sockets)
        finally:
            if self.unix_socket is not None:
                remove_unix_socket(self.unix_path, self.unix_socket)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.unix_socket is None or self.should_exit:
            return
        # The TCP listener is up; the Unix one serves the same app with the same protocols, and
        # uvicorn closes it with the others (self.servers) at shutdown.
        config, loop = self.config, asyncio.get_running_loop()

        def protocol() -> asyncio.Protocol:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state, app_state=self.lifespan.state
            )

        server = await loop.create_server(protocol, sock=self.unix_socket, backlog=config.backlog)
        self.servers.append(server)
        log.info("also listening on unix:%s", self.unix_path)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs in the signal handler: never record the signal (uvicorn would re-raise it after
        # shutdown and the exit status would be 143), and only schedule work on the loop.
        if self._loop is None or self._drain is not None or not self.started:
            self.should_exit = True
            return
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._drain is None:
            self._drain = self._loop.create_task(self._run_drain()) if self._loop else None
        else:
            self.should_exit = True

    async def _run_drain(self) -> None:
        started = time.monotonic()
        try:
            await self.node.drain(self.shutdown_timeout / 2)
        except Exception:  # noqa: BLE001 - a failed drain must still end in a shutdown
            log.exception("drain failed; shutting down")
        left = self.shutdown_timeout - (time.monotonic() - started)
        self.config.timeout_graceful_shutdown = max(1, int(left))
        self.should_exit = True
