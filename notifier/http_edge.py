"""The HTTP edge under uvicorn: :class:`HttpProtocol` (uvicorn's httptools protocol, bounded
so an instance is safe to reach without nginx in front) and the one-write answer of the publish
route."""

from __future__ import annotations

import asyncio
import http
import logging
from functools import partial
from typing import Any

import httptools
import orjson
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol, RequestResponseCycle
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string

from notifier.api_publish import PUBLISH_PATH, RESPOND_EXTENSION
from notifier.sse import SSE_PATH
from notifier.uvicorn_internals import require as _require
from notifier.ws import ABORT_EXTENSION, SINK_EXTENSION

log = logging.getLogger("notifier.server")

HEAD_TIMEOUT = 10.0  # seconds a connection has to send a complete request head
BODY_STALL_TIMEOUT = 30.0  # seconds a request body may go without a byte arriving
MAX_HEAD_BYTES = 16 * 1024  # request line and headers; over it: 431
LINGER_TIMEOUT = 5.0  # after an error answer: seconds the rest of the request is read and discarded


def error_response(status: int, detail: str, default_headers: list[tuple[bytes, bytes]]) -> bytes:
    """A complete HTTP/1.1 answer with our usual ``{"detail": ...}`` body, closing the connection."""
    body = orjson.dumps({"detail": detail})
    head = [b"HTTP/1.1 %d %s\r\n" % (status, http.HTTPStatus(status).phrase.encode())]
    for name, value in default_headers:
        head += [name, b": ", value, b"\r\n"]
    head.append(b"content-type: application/json\r\ncontent-length: %d\r\n" % len(body))
    head.append(b"connection: close\r\n\r\n")
    return b"".join(head) + body


def peer(client: tuple[str, int] | None) -> str:
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
        log.info("HTTP %d to %s: %s", status, peer(self.client), detail)
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
        if cycle is not None and cycle.scope is scope:
            if scope["path"] == PUBLISH_PATH:
                extensions: dict[str, Any] = scope.setdefault("extensions", {})
                extensions[RESPOND_EXTENSION] = partial(respond_whole, cycle)
            elif scope["path"] == SSE_PATH:
                # An event stream's client that stopped reading leaves the transport paused: the
                # stream drops the connection this way once it gave up on it (notifier.sse).
                # Notifications go out through the sink, straight to the transport.
                extensions = scope.setdefault("extensions", {})
                extensions[ABORT_EXTENSION] = {"abort": self.transport.abort}
                extensions[SINK_EXTENSION] = {"sink": ChunkSink(cycle)}

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
            "chunked_encoding",
        )
    },
)


class ChunkSink:
    """Writes already-encoded chunks of an event stream's chunked response straight to the
    transport (``notifier.hub.Sink``): a notification's ``sse_chunk``, framed once for every
    stream. Writable only while the response is under way, chunked, and the client keeps up.
    uvicorn internals, checked at import: the cycle's state as its ``send`` keeps it."""

    __slots__ = ("_cycle",)

    def __init__(self, cycle: RequestResponseCycle) -> None:
        self._cycle = cycle

    def writable(self) -> bool:
        c = self._cycle
        return (
            c.response_started
            and c.chunked_encoding is True
            and not c.response_complete
            and not c.disconnected
            and not c.flow.write_paused
        )

    def write(self, data: bytes) -> None:
        self._cycle.transport.write(data)

    async def drain(self) -> None:
        await self._cycle.flow.drain()


def respond_whole(
    cycle: RequestResponseCycle, status: int, headers: list[tuple[bytes, bytes]], body: bytes
) -> bool:
    """A whole answer in one write, as uvicorn's ``send`` writes it in two (status line and
    headers, then the body) after checking each header: the ``notifier.respond`` extension of
    ``POST /v1/notifications`` (see ``api_publish.publish_endpoint``), whose few headers are its own.
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

