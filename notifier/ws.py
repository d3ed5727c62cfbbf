"""The WebSocket edge, ``/v1/ws``: handshake, the reader (client frames) and the writer (queue -> socket).

Every outbound frame, replies included, goes through the connection's queue and only the
writer task sends, so frames keep their order and a slow socket holds up nobody else.
"""

from __future__ import annotations

import asyncio
import logging
import time
from typing import Any

from fastapi import WebSocket
from fastapi.responses import JSONResponse
from starlette.datastructures import QueryParams
from starlette.types import Scope

from notifier.auth import REVOKED, SUBSCRIBE, Principal, bearer
from notifier.errors import AuthError, BrokerUnavailable, CloseCode, ErrorCode, Forbidden, LimitExceeded
from notifier.hub import Connection, Item
from notifier.node import Node
from notifier.protocol import (
    BadFrame,
    ClientFrame,
    Since,
    dumps,
    encode_data,
    parse_client_frame,
    parse_positions,
    since_from_json,
    topic_list,
    valid_topic,
    ws_text_frame,
)
from notifier.replay import Replay
from notifier.services import Services

log = logging.getLogger("notifier.ws")

RATE_PER_SECOND = 100.0
RATE_BURST = 200.0
EXPIRY_GRACE = 0.05  # seconds after exp before the 1008 close: never before exp
CLOSE_GRACE = 2.0  # seconds a close may wait on a socket that does not drain before it is dropped
# ASGI extensions offered by notifier.ws_edge.WebSocketProtocol (other servers offer neither).
# Handshakes an instance works on at once (from the request to `hello`); one more gets 503 at
# once. In a reconnect storm thousands arrive together: worked on all at once, each waits for all
# the others (seconds), clients that give up on a slow handshake retry and the abandoned ones
# are still worked on, until nobody gets through. Refused at once, clients back off with jitter
# and come back when there is room, and every admitted handshake is answered in milliseconds.
MAX_HANDSHAKES_IN_PROGRESS = 128
ABORT_EXTENSION = "notifier.abort"
PRESENCE_VALUES = {"1": True, "true": True, "0": False, "false": False}
SINK_EXTENSION = "notifier.sink"


class Handshake(Exception):
    """Refuse the handshake with this HTTP status (no connection is opened); ``outcome`` is the
    label of ``notifier_handshakes_total`` (by default the status's: 429 limited, 503 unavailable,
    else forbidden)."""

    def __init__(self, status: int, detail: str, outcome: str | None = None) -> None:
        super().__init__(detail)
        self.status, self.detail = status, detail
        self.outcome = outcome or {429: "limited", 503: "unavailable"}.get(status, "forbidden")


async def websocket_endpoint(websocket: WebSocket) -> None:
    services: Services = websocket.app.state.services
    node = services.node
    slot = HandshakeSlot(node)
    try:
        try:
            slot.take()
            principal, topics, since, presence = await authorize(services, websocket.scope)
            conn = admit(services, principal)
        except Handshake as refusal:
            await _deny(services, websocket, refusal)
            return
        try:
            # Subscribe before accepting, so `hello` is only sent once every topic is active.
            try:
                hello, replay = await join(node, conn, topics, since, presence)
            except BrokerUnavailable as exc:
                await _deny(services, websocket, Handshake(503, f"broker unavailable: {exc}"))
                return
            await websocket.accept()
            services.metrics.handshakes.labels("accepted").inc()
            sink = websocket.scope.get("extensions", {}).get(SINK_EXTENSION)
            conn.sink = sink["sink"] if sink else None
            hello["topics"] = sorted(conn.topics)
            conn.push_first(dumps(hello))
            slot.release()
            await Session(services, websocket, conn).run(replay)
        finally:
            await node.detach(conn)
    finally:
        slot.release()


class HandshakeSlot:
    """One of the MAX_HANDSHAKES_IN_PROGRESS an instance works on at once (WebSocket or event
    stream): taken before the request is looked at, given back once ``hello`` is queued or the
    handshake ended, whichever comes first."""

    __slots__ = ("node", "held")

    def __init__(self, node: Node) -> None:
        self.node, self.held = node, False

    def take(self) -> None:
        if self.node.handshakes_in_progress >= MAX_HANDSHAKES_IN_PROGRESS:
            busy = f"{MAX_HANDSHAKES_IN_PROGRESS} handshakes in progress on this instance; retry in a moment"
            raise Handshake(503, busy)
        self.node.handshakes_in_progress += 1
        self.held = True

    def release(self) -> None:
        if self.held:
            self.held = False
            self.node.handshakes_in_progress -= 1


async def join(
    node: Node, conn: Connection, topics: list[str], since: Since | None, presence: bool
) -> tuple[dict[str, Any], Replay | None]:
    """Subscribe a connection being opened (WebSocket or event stream) to its automatic topics
    and ``topics``, live or recovering after ``since``, with the presence events of ``topics``
    when asked: its ``hello`` frame (``topics`` still to be filled in) and the replay to run once
    it is sent. Raises :class:`BrokerUnavailable`."""
    principal = conn.principal
    hello: dict[str, Any] = {"type": "hello", "session": conn.session, "user": principal.sub}
    replay = await node.open(conn, list(dict.fromkeys(principal.auto_topics() + topics)), since)
    if replay is not None:
        hello["recovered"] = replay.recovered
    if presence:
        node.hub.listen(conn, topics)
    return hello, replay


async def authorize(services: Services, scope: Scope) -> tuple[Principal, list[str], Since | None, bool]:
    """The principal, the topics asked for, ``since`` and whether presence events are asked for
    (``presence=1``) of a handshake (WebSocket or SSE), or :class:`Handshake` saying why it is
    refused."""
    # Not websocket.query_params: Starlette would keep that parsed copy for the socket's life.
    params = QueryParams(scope["query_string"])
    token = params.get("token") or bearer(header(scope, b"authorization"))
    try:
        principal = await services.authority.authenticate(token)
    except AuthError as exc:
        raise Handshake(403, str(exc), "unauthorized") from None
    if services.node.rejected(principal):
        raise Handshake(403, REVOKED, "unauthorized")
    try:
        raw = params.get("topics")
        topics = topic_list(raw.split(",")) if raw else []
        limit = services.settings.max_topics_per_connection
        held = len(set(principal.auto_topics()).union(topics))
        if held > limit:
            raise LimitExceeded(
                f"too many topics: {held}, broadcast and user:<sub> included; at most {limit} a connection"
            )
        principal.check_subscribe(topics)
        # One id, or per-topic positions (at most as many as a connection may hold topics).
        since = parse_positions(params.get("since"), limit)
        presence = params.get("presence", "0")
        if presence not in PRESENCE_VALUES:
            raise BadFrame("presence must be 1 (join and leave events) or 0")
    except (Forbidden, LimitExceeded, BadFrame, ValueError) as exc:
        raise Handshake(403, str(exc), "forbidden") from None
    return principal, topics, since, PRESENCE_VALUES[presence]


def header(scope: Scope, name: bytes) -> str | None:
    """One request header, read from the scope: Starlette's ``websocket.headers`` would keep a
    parsed copy of them all alive for the socket's whole life."""
    for key, value in scope["headers"]:
        if key == name:
            return str(value.decode("latin-1"))
    return None


def admit(services: Services, principal: Principal) -> Connection:
    """Take a connection slot, or refuse with 503 (draining, full) or 429 (the user's limit)."""
    node, settings = services.node, services.settings
    if node.draining:
        raise Handshake(503, "instance is draining")
    if len(node.hub.connections) >= settings.max_connections:
        raise Handshake(503, "instance is at its connection limit")
    if node.hub.per_user.get(principal.sub, 0) >= settings.max_connections_per_user:
        raise Handshake(
            429,
            f"this user already holds {settings.max_connections_per_user} connections "
            "on this instance (NOTIFIER_MAX_CONNECTIONS_PER_USER)",
        )
    conn = Connection(principal, settings.send_queue_bytes, services.metrics.dropped_slow.inc)
    node.attach(conn)
    return conn


def count_refusal(services: Services, refusal: Handshake) -> None:
    """A refused handshake (WebSocket or event stream), in the metrics."""
    services.metrics.rejected_handshakes.labels(str(refusal.status)).inc()
    services.metrics.handshakes.labels(refusal.outcome).inc()


async def _deny(services: Services, websocket: WebSocket, refusal: Handshake) -> None:
    count_refusal(services, refusal)
    response = JSONResponse({"detail": refusal.detail}, status_code=refusal.status)
    try:
        await websocket.send_denial_response(response)
    except RuntimeError:  # a server without the denial extension: a close before accept is a 403
        await websocket.close(code=CloseCode.POLICY_VIOLATION)


class Session:
    """One accepted socket: reads client frames, runs the writer, enforces limits and expiry."""

    __slots__ = (
        "services",
        "node",
        "websocket",
        "conn",
        "max_bytes",
        "tokens",
        "refilled",
        "expiry",
        "watchdog",
        "writer",
        "replay",
    )

    def __init__(self, services: Services, websocket: WebSocket, conn: Connection) -> None:
        self.services = services
        self.node = services.node
        self.websocket = websocket
        self.conn = conn
        self.max_bytes = services.settings.max_message_bytes
        self.tokens = RATE_BURST
        self.refilled = time.monotonic()
        self.expiry: asyncio.TimerHandle | None = None
        self.watchdog: asyncio.TimerHandle | None = None
        self.writer: asyncio.Task[None] | None = None
        self.replay: asyncio.Task[None] | None = None  # the last recovery started (see Replay)

    async def run(self, replay: Replay | None = None) -> None:
        self.conn.on_close = self._closing
        self.conn.on_ready = self._kick
        self._kick()
        self._schedule_expiry()
        if replay is not None:
            self._start_replay(replay)
        try:
            await self._read()
        finally:
            for timer in (self.expiry, self.watchdog):
                if timer is not None:
                    timer.cancel()
            for task in (self.replay, self.writer):
                if task is not None:
                    task.cancel()
                    await asyncio.gather(task, return_exceptions=True)

    def _start_replay(self, replay: Replay) -> None:
        """Run ``replay`` in the background (the reader goes on), after the one before it."""
        self.replay = asyncio.get_running_loop().create_task(self._run_replay(replay, self.replay))

    @staticmethod
    async def _run_replay(replay: Replay, before: asyncio.Task[None] | None) -> None:
        if before is not None:
            await asyncio.gather(before, return_exceptions=True)
        await replay.run()

    def _kick(self) -> None:
        """Something is queued (or a close asked for): make sure a writer runs. Writers are
        started on demand and end when the queue is empty: most deliveries need none."""
        if self.writer is None or self.writer.done():
            self.writer = asyncio.get_running_loop().create_task(self._write())
            self.writer.add_done_callback(self._writer_done)

    def _writer_done(self, writer: asyncio.Task[None]) -> None:
        # A finished writer is not kept: an idle socket holds no task but its reader's.
        if self.writer is writer:
            self.writer = None

    def _closing(self) -> None:
        """A close was asked for: if the writer cannot get it out in time, drop the connection."""
        if self.watchdog is None:
            self.watchdog = asyncio.get_running_loop().call_later(CLOSE_GRACE, self._force_close)

    def _force_close(self) -> None:
        if self.writer is None or self.writer.done():
            return
        log.info("dropping %s: its socket did not drain within %.0f s", self.conn.session, CLOSE_GRACE)
        self.writer.cancel()
        abort = self.websocket.scope.get("extensions", {}).get(ABORT_EXTENSION)
        if abort is not None:
            abort["abort"]()

    # -- writer -----------------------------------------------------------------------------

    async def _write(self) -> None:
        """Drain the queue in order: through the sink when the server offers one (encoded bytes,
        written while the socket takes them), else through ASGI ``send``; then close if asked."""
        conn = self.conn
        try:
            while conn.queue and conn.close_code is None:
                batch = conn.take()
                conn.busy = True
                try:
                    if not await self._write_batch(batch):
                        return  # the socket is gone or closing
                finally:
                    conn.busy = False
            if conn.close_code is not None:
                await self.websocket.close(conn.close_code, conn.close_reason)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - the peer went away mid-send; the reader sees it too
            log.debug("writer of %s ended: %r", conn.session, exc)

    async def _write_batch(self, batch: list[Item]) -> bool:
        conn, sink, send = self.conn, self.conn.sink, self.websocket.send
        delivered = last_ts = 0
        for index, (text, size, ts, wire) in enumerate(batch):
            if conn.close_code is not None:
                lost = sum(1 for item in batch[index:] if item[2])
                if lost:
                    conn.on_drop(lost)
                break
            if sink is not None:
                if not sink.writable():
                    await sink.drain()
                    if not sink.writable():
                        return False
                sink.write(wire or ws_text_frame(text.encode()))
            else:
                await send({"type": "websocket.send", "text": text})
            if conn.close_code is None:
                conn.pending -= size
                if conn.drained is not None:
                    conn.wake()
            if ts:
                delivered += 1
                last_ts = ts
        if delivered:
            metrics = self.services.metrics
            metrics.delivered.inc(delivered)
            metrics.latency.observe(max(0.0, time.time() - last_ts / 1000))
        return True

    # -- reader -----------------------------------------------------------------------------

    async def _read(self) -> None:
        conn, websocket = self.conn, self.websocket
        while True:
            message = await websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            if conn.close_code is not None:
                continue  # closing: ignore whatever still arrives
            text = message.get("text")
            if text is None:
                conn.close(CloseCode.UNSUPPORTED_DATA, "binary frames are not supported")
                continue
            if len(text) > self.max_bytes // 4 and len(text.encode()) > self.max_bytes:
                conn.close(CloseCode.MESSAGE_TOO_BIG, "frame too big")
                continue
            try:
                frame = parse_client_frame(text)
            except BadFrame as exc:
                frame, problem = None, str(exc)
            if not self._take_token():
                self._error(frame, ErrorCode.RATE_LIMITED, "more than 100 frames a second")
            elif frame is None:
                self._error(None, ErrorCode.BAD_REQUEST, problem)
            else:
                await self._handle(frame)

    def _take_token(self) -> bool:
        now = time.monotonic()
        self.tokens = min(RATE_BURST, self.tokens + (now - self.refilled) * RATE_PER_SECOND)
        self.refilled = now
        if self.tokens < 1:
            return False
        self.tokens -= 1
        return True

    async def _handle(self, frame: ClientFrame) -> None:
        handler = _HANDLERS.get(frame.type)
        if handler is None:
            self._error(frame, ErrorCode.BAD_REQUEST, f"unknown frame type: {frame.type[:40]!r}")
            return
        try:
            await handler(self, frame)
        except BadFrame as exc:
            self._error(frame, ErrorCode.BAD_REQUEST, str(exc))
        except (Forbidden, AuthError) as exc:
            self._error(frame, ErrorCode.FORBIDDEN, str(exc))
        except LimitExceeded as exc:
            self._error(frame, ErrorCode.LIMIT_EXCEEDED, str(exc))
        except BrokerUnavailable as exc:
            self._error(frame, ErrorCode.UNAVAILABLE, str(exc))

    def _reply(self, frame: ClientFrame | None, body: dict[str, Any]) -> None:
        text = dumps(frame.reply(body) if frame is not None else body)
        self.conn.push(text, len(text.encode()))

    def _error(self, frame: ClientFrame | None, code: str, message: str) -> None:
        self._reply(frame, {"type": "error", "code": code, "message": message})

    async def _subscribe(self, frame: ClientFrame) -> None:
        topics = topic_list(frame.body.get("topics"))
        held, limit = self.conn.topics, self.services.settings.max_topics_per_connection
        new = sum(1 for topic in topics if topic not in held)
        if len(held) + new > limit:
            raise LimitExceeded(
                f"too many topics: {len(held)} held and {new} more asked for; at most {limit} a connection"
            )
        self.conn.principal.check_subscribe(topics)
        since = _frame_since(frame.body.get("since"), limit)
        presence = frame.body.get("presence", False)
        if not isinstance(presence, bool):
            raise BadFrame("'presence' must be true or false")
        reply: dict[str, Any] = {"type": "subscribed", "topics": topics}
        running, hub = self.replay, self.node.hub
        if since is not None and running is not None and any(
            hub.held(self.conn, t) is not None for t in topics
        ):
            # One recovery of a topic at a time: the new one starts once this one is live.
            await asyncio.gather(running, return_exceptions=True)
        replay = await self.node.open(self.conn, topics, since)
        if presence:
            hub.listen(self.conn, topics)
        if replay is not None:
            reply["recovered"] = replay.recovered
        self._reply(frame, reply)
        if replay is not None:
            self._start_replay(replay)

    async def _unsubscribe(self, frame: ClientFrame) -> None:
        topics = topic_list(frame.body.get("topics"))
        await self.node.unsubscribe(self.conn, topics)
        self._reply(frame, {"type": "unsubscribed", "topics": topics})

    async def _publish(self, frame: ClientFrame) -> None:
        topic = frame.body.get("topic")
        if not valid_topic(topic):
            raise BadFrame("'topic' must be a topic name")
        if "data" not in frame.body:
            raise BadFrame("'data' is required (null allowed)")
        principal = self.conn.principal
        principal.check_publish(topic)
        data_json = encode_data(frame.body["data"])  # BadFrame when nested too deeply
        accepted = await self.node.publish(principal, topic, data_json)
        self._reply(frame, {"type": "published", **accepted.as_json()})

    async def _ping(self, frame: ClientFrame) -> None:
        self._reply(frame, {"type": "pong"})

    async def _refresh(self, frame: ClientFrame) -> None:
        token = frame.body.get("token")
        if not isinstance(token, str):
            raise BadFrame("'token' must be a string")
        new = await self.services.authority.authenticate(token)
        old = self.conn.principal
        if new.sub != old.sub:
            raise Forbidden("the new token is for another user")
        if new.exp is None or (old.exp is not None and new.exp <= old.exp):
            raise Forbidden("the new token must expire later than the current one")
        if SUBSCRIBE not in new.scopes:
            raise Forbidden("token lacks the 'subscribe' scope")
        if self.node.rejected(new):
            raise Forbidden(REVOKED)
        self.conn.principal = new
        self._schedule_expiry()
        self._reply(frame, {"type": "refreshed", "expires_at": new.exp})

    def _schedule_expiry(self) -> None:
        if self.expiry is not None:
            self.expiry.cancel()
            self.expiry = None
        exp = self.conn.principal.exp
        if exp is None:
            return
        delay = max(0.0, exp - time.time()) + EXPIRY_GRACE
        self.expiry = asyncio.get_running_loop().call_later(delay, self._expire)

    def _expire(self) -> None:
        exp = self.conn.principal.exp
        if exp is not None and time.time() < exp:
            self._schedule_expiry()  # refreshed meanwhile, or the timer fired early
            return
        self.conn.close(CloseCode.POLICY_VIOLATION, "token expired")


def _frame_since(value: object, most: int) -> Since | None:
    """``since`` of a subscribe frame: absent, one id (a non-negative integer or a string of its
    digits) for every topic of the frame, or per-topic positions ``{"<topic>": "<id>", ...}``
    (at most ``most``; a topic of the frame without one is subscribed live, without recovery,
    and positions of topics not in the frame are ignored). :class:`BadFrame` otherwise."""
    return since_from_json(value, most)


_HANDLERS = {
    "subscribe": Session._subscribe,
    "unsubscribe": Session._unsubscribe,
    "publish": Session._publish,
    "ping": Session._ping,
    "refresh": Session._refresh,
}
