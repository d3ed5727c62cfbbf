"""The Redis broker: ids and frames made atomically by a Lua script, fan-out through pub/sub.

Two connections: a pool for publishing (short timeouts, no retries: a retried publish could
deliver twice) and one pub/sub connection owned by a listener task. The listener keeps the
link: on any failure it drops the connection, backs off, reconnects and resubscribes every
topic this node holds, reporting each change of state.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
import uuid
from collections import defaultdict, deque
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.client import PubSub
from redis.exceptions import RedisError

from notifier.broker import (
    CONTROL_TOPIC,
    IDEMPOTENCY_TTL,
    UNBOUNDED,
    History,
    OnNotification,
    OnResync,
    OnState,
    PartlyPublished,
    Rejections,
    topic_idempotency_key,
)
from notifier.errors import BrokerUnavailable
from notifier.protocol import Accepted, Notification, notification_tail, ws_text_frame
from notifier.redis_batch import Pending, PublishBatcher
from notifier.redis_history import (
    CHANNEL_PREFIX,
    EPOCH_KEY,
    HISTORY_PREFIX,
    IDEMPOTENCY_PREFIX,
    MANY_CHANNEL,
    MASTER_KEY,
    PREFIX,
    PRESENCE_PREFIX,
    PROBE_PREFIX,
    PUBLISH_BATCH_LUA,
    PUBLISH_LUA,
    PUBLISH_MANY_LUA,
    REJECTIONS_KEY,
    SEQ_KEY,
    SESSION_LUA,
    HistoryReader,
    parse_rejections,
)
from notifier.redis_presence import PresenceOfRedis, RedisPresence
from notifier.redis_topology import connect

log = logging.getLogger("notifier.broker")

PROBE_INTERVAL = 5.0  # seconds between two probes of the pub/sub link
PROBE_TIMEOUT = 3.0  # a probe not back within this: the link is silently dead, reconnect
PUBLISH_TIMEOUT = 2.0  # POST answers 503 within the contract's 3 s
SUBSCRIBE_TIMEOUT = 3.0
PUBLISH_CONNECTIONS = 32  # per node; Redis runs scripts one at a time anyway
# A publish to many topics goes in script calls of at most this many topics and about this many
# bytes of frames: Redis runs nothing else during one, so each keeps others' latency low.
MANY_TOPICS_PER_CALL, MANY_BYTES_PER_CALL = 100, 1 << 20
DEADLINE_MARGIN = 0.25  # seconds the script's deadline keeps before our own timeout fires
# Capped at 2 s: every second the link is down is a second of notifications to fill in after.
BACKOFF_MIN, BACKOFF_MAX = 0.1, 2.0
# After a lost link: topics read back per pipeline, and entries per topic delivered from
# history; a topic that missed more than that (or whose history lost some) gets 1012.
# (both bound what a fill holds at once: 8 x 257 entries, in practice far less than 1 MiB each).
GAP_TOPICS_PER_READ, GAP_ENTRIES, GAP_BYTES = 8, 256, 1 << 20
GAP_BUFFER_BYTES = 16 << 20  # live messages held while the gap is filled; beyond: 1012 for all

_REDIS_ERRORS = (RedisError, OSError, TimeoutError)
_MANY = MANY_CHANNEL.encode()
UNKEYED = PREFIX + "unkeyed"  # PUBLISH_BATCH_LUA's key for a publish without idempotency key: never written


def _check_cancelled() -> None:
    """Re-raise a cancellation that redis-py turned into a ConnectionError (it does, on a read
    cut short): swallowing it would leave a task that never ends, a close() that hangs."""
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


def redacted(url: str) -> str:
    """``url`` fit for a log line or an error answer: any password (``:pw@``, ``?password=``) hidden."""
    parts = urlsplit(url)
    netloc, query = parts.netloc, parts.query
    if parts.password is not None:
        netloc = f"{parts.username or ''}:***@{netloc.rpartition('@')[2]}"
    if "password" in query:
        query = urlencode([(k, "***" if k == "password" else v) for k, v in parse_qsl(query)], safe="*")
    return urlunsplit(parts._replace(netloc=netloc, query=query))


def _why(exc: BaseException) -> str:
    """Why Redis could not be used, in a few words: ``Connection refused`` rather than redis-py's
    ``Error 111 connecting to 127.0.0.1:6390. Connect call failed ('127.0.0.1', 6390).``"""
    cause: BaseException | None = exc
    for _ in range(8):  # the OS error is at most a few links down redis-py's chain
        if cause is None:
            break
        if isinstance(cause, OSError) and cause.errno:
            return os.strerror(cause.errno) if cause.errno > 0 else (cause.strerror or str(cause))
        cause = cause.__cause__ or cause.__context__
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


@asynccontextmanager
async def unavailable_on_error(
    errors: tuple[type[BaseException], ...] = _REDIS_ERRORS, timeout: float = PUBLISH_TIMEOUT
) -> AsyncIterator[None]:
    """Broker work bounded by ``timeout``, any of ``errors`` in it raised as BrokerUnavailable
    (a cancellation that redis-py turned into a connection error stays a cancellation)."""
    try:
        async with asyncio.timeout(timeout):
            yield
    except errors as exc:
        _check_cancelled()
        raise BrokerUnavailable(f"redis: {_why(exc)}") from None


class RedisBroker(PresenceOfRedis):
    """Broker over one Redis server (``redis://``, ``rediss://``) or the current master of a
    Sentinel set (``redis+sentinel://``): see :mod:`notifier.redis_topology`."""

    def __init__(self, url: str, history_size: int = 1000, history_ttl: int = 86400) -> None:
        self.connected = False
        self._history_size = history_size
        self._history_ttl = history_ttl
        self._url = url
        self._name = redacted(url)  # what logs and error answers call this broker
        self._last_error = "connecting"  # why the pub/sub link is not up, for 503 answers
        # How connections are made (one server, or the current master of a Sentinel set) is the
        # topology's: a blocking publish pool with short timeouts and no retries, and a client
        # for the pub/sub connection with no socket timeout (an idle listener must not time out).
        self._topology = connect(
            url,
            publish_timeout=PUBLISH_TIMEOUT,
            connections=PUBLISH_CONNECTIONS,
            subscribe_timeout=SUBSCRIBE_TIMEOUT,
        )
        self._pub: Redis = self._topology.publisher
        self._sub: Redis = self._topology.subscriber
        self._batch_script = self._pub.register_script(PUBLISH_BATCH_LUA)
        self._batcher = PublishBatcher(self._publish_batch)
        self._many_script = self._pub.register_script(PUBLISH_MANY_LUA)
        self._session_script = self._pub.register_script(SESSION_LUA)
        self._reader = HistoryReader(self._pub, history_size, history_ttl)
        self._node_id = uuid.uuid4().hex
        control = [SEQ_KEY, EPOCH_KEY, CHANNEL_PREFIX + CONTROL_TOPIC, HISTORY_PREFIX + CONTROL_TOPIC]
        self._presence = RedisPresence(
            self._pub, PUBLISH_LUA, control, PRESENCE_PREFIX, self._node_id,
            (history_size, history_ttl), self._deadline, unavailable_on_error,
        )
        # No silent gap: ``_gap_from`` is the position after which a lost session may have
        # missed notifications (None: nothing to fill); ``_seen`` the last id the link delivered,
        # ``_floor`` the id counter when the session subscribed; ``_filled`` the last id a gap
        # fill delivered per topic (live duplicates of it are skipped); ``_held`` what arrives
        # live while a fill runs.
        self._gap_from: int | None = None
        self._seen = self._floor = 0
        self._live = False
        self._filled: dict[str, int] = {}
        self._filling = False
        self._held: list[tuple[bytes, bytes]] | None = []
        self._held_bytes = 0
        self._topics: set[str] = {CONTROL_TOPIC}  # held from the start (notifier.broker)
        self._pubsub: PubSub | None = None
        self._waiters: dict[tuple[str, bytes], deque[asyncio.Future[None]]] = defaultdict(deque)
        # (UN)SUBSCRIBEs waiting for the loop's next turn, by kind (a dict: ordered, no repeats),
        # and the tasks sending them.
        self._outbox: dict[str, dict[bytes, None]] = {}
        self._commands: set[asyncio.Task[None]] = set()
        self._listener: asyncio.Task[None] | None = None
        self._prober: asyncio.Task[None] | None = None
        # Set by close(): the background loops stop on it even if a cancellation was swallowed.
        self._stop = asyncio.Event()
        # The probe: this node publishes to a channel of its own and expects it back on its
        # subscription. A link that looks healthy but delivers nothing is caught this way.
        self._probe_channel = f"{PROBE_PREFIX}{self._node_id}".encode()
        self._probe_sent: dict[bytes, float] = {}
        self.probe_lag: float | None = None  # seconds the last probe took to come back
        self._clock_offset: float | None = None  # Redis's clock minus ours, in seconds
        self._was_connected = False
        self._on_notification: OnNotification = lambda _n: None
        self._on_state: OnState = lambda _c: None
        self._on_resync: OnResync = lambda _lost: None

    async def start(self, on_notification: OnNotification, on_state: OnState, on_resync: OnResync) -> None:
        self._on_notification, self._on_state, self._on_resync = on_notification, on_state, on_resync
        self._listener = asyncio.create_task(self._listen(), name="notifier-redis-listener")
        self._prober = asyncio.create_task(self._probe(), name="notifier-redis-probe")

    async def close(self) -> None:
        self._stop.set()
        for task in (self._prober, self._listener, *self._commands):
            if task is not None:
                task.cancel()
                await asyncio.gather(task, return_exceptions=True)
        self._set_connected(False)
        await self._batcher.close()
        await self._topology.aclose()

    async def publish(
        self, topic: str, data_json: bytes, ts: int, idempotency_key: str | None = None
    ) -> Accepted:
        if self._clock_offset is None:
            raise BrokerUnavailable(f"{self._name} not connected yet: {self._last_error}")
        tail = notification_tail(topic, data_json, ts)
        return await self._batcher.submit(topic, tail, ts, idempotency_key)

    def _deadline(self) -> str:
        """The time (unix ms, Redis's clock) after which a script must refuse to write: a margin
        before our timeout fires, so nothing happens after we answered 503."""
        if self._clock_offset is None:
            raise BrokerUnavailable(f"{self._name} not connected yet: {self._last_error}")
        return str(int((time.time() + self._clock_offset + PUBLISH_TIMEOUT - DEADLINE_MARGIN) * 1000))

    async def _publish_batch(self, batch: list[Pending]) -> list[Accepted]:
        """One PUBLISH_BATCH_LUA call for the publishes of one loop iteration (notifier.redis_batch)."""
        if self._clock_offset is None:
            raise BrokerUnavailable(f"{self._name} not connected yet: {self._last_error}")
        # A publish that reaches Redis after we answered 503 must not happen: the script refuses
        # past this deadline, set in Redis's own clock a margin before our timeout fires.
        deadline = self._deadline()
        keys = [SEQ_KEY, EPOCH_KEY]
        args: list[Any] = [deadline, self._history_size, self._history_ttl, IDEMPOTENCY_TTL]
        for item in batch:
            keys += (
                CHANNEL_PREFIX + item.topic,
                HISTORY_PREFIX + item.topic,
                UNKEYED if item.key is None else IDEMPOTENCY_PREFIX + item.key,
            )
            args += (item.topic, item.tail, item.ts, "0" if item.key is None else "1")
        async with unavailable_on_error():
            reply = await self._batch_script(keys=keys, args=args)
        if reply[0] == 2:
            raise BrokerUnavailable("redis: too slow to answer; nothing published")
        answers: list[Accepted] = []
        for index in range(len(batch)):
            id_, ts_, topic_ = reply[1 + 2 * index].split(b" ", 2)
            answers.append(Accepted(int(id_), topic_.decode(), int(ts_), repeated=reply[2 + 2 * index] == 1))
        return answers

    async def publish_many(
        self, topics: list[str], data_json: bytes, ts: int, idempotency_key: str | None = None
    ) -> list[Accepted]:
        if self._clock_offset is None:
            raise BrokerUnavailable(f"{self._name} not connected yet: {self._last_error}")
        # One deadline for every call: nothing is published after the caller answered 503.
        deadline = str(int((time.time() + self._clock_offset + PUBLISH_TIMEOUT - DEADLINE_MARGIN) * 1000))
        per = 1 if idempotency_key is None else 2
        step = max(1, min(MANY_TOPICS_PER_CALL, MANY_BYTES_PER_CALL // (len(data_json) + 200)))
        answers: list[Accepted] = []
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT):
                for start in range(0, len(topics), step):
                    part = topics[start : start + step]
                    keys = [SEQ_KEY, EPOCH_KEY, MANY_CHANNEL]
                    if idempotency_key is not None:
                        keys.append(IDEMPOTENCY_PREFIX + idempotency_key)
                    for topic in part:
                        keys.append(HISTORY_PREFIX + topic)
                        if idempotency_key is not None:
                            keys.append(IDEMPOTENCY_PREFIX + topic_idempotency_key(idempotency_key, topic))
                    args: list[Any] = [
                        data_json, ts, IDEMPOTENCY_TTL, self._history_size, deadline, self._history_ttl, per,
                        *part,
                    ]  # fmt: skip
                    reply = await self._many_script(keys=keys, args=args)
                    if reply[0] == 2:
                        break
                    given = reply[3:] if reply[0] == 3 else reply[2:]
                    for repeated, answer in zip(reply[1], given, strict=True):
                        id_, ts_, topic_ = answer.split(b" ", 2)
                        answers.append(Accepted(int(id_), topic_.decode(), int(ts_), repeated == ord("1")))
                    if reply[0] == 3:
                        error = reply[2].decode(errors="replace")
                        raise PartlyPublished(f"redis: {error}; some may have been published", answers)
        except _REDIS_ERRORS as exc:
            _check_cancelled()
            raise PartlyPublished(f"redis: {str(exc) or type(exc).__name__}", answers) from None
        if len(answers) < len(topics):
            raise PartlyPublished("redis: too slow to answer; some may have been published", answers)
        return answers

    async def history(self, topic: str, since: int | None, limit: int, max_bytes: int = UNBOUNDED) -> History:
        async with unavailable_on_error():
            return await self._reader.read(topic, since, limit, max_bytes)

    async def reject(self, sub: str, before: int, until: int) -> None:
        # One hash for the deployment: a field per user, read whole when a node (re)connects;
        # fields past their end are dropped then, and the hash lives as long as its newest.
        async with unavailable_on_error(), self._pub.pipeline(transaction=True) as pipe:
            pipe.hset(REJECTIONS_KEY, sub, f"{before} {until}")
            pipe.expireat(REJECTIONS_KEY, until, gt=True)
            pipe.expireat(REJECTIONS_KEY, until, nx=True)
            await pipe.execute()

    async def rejections(self) -> Rejections:
        async with unavailable_on_error():
            stored = await self._pub.hgetall(REJECTIONS_KEY)
        return parse_rejections(stored, time.time())

    async def subscribe(self, topic: str) -> None:
        await self._command("subscribe", topic)

    async def unsubscribe(self, topic: str) -> None:
        self._topics.discard(topic)
        self._filled.pop(topic, None)
        if self.connected:
            try:
                await self._command("unsubscribe", topic)
            except BrokerUnavailable:
                pass  # the link is down: the next session does not resubscribe it anyway

    async def _command(self, kind: str, topic: str) -> None:
        """Send SUBSCRIBE / UNSUBSCRIBE and wait until the listener reads its confirmation."""
        pubsub = self._pubsub
        if not self.connected or pubsub is None:
            raise BrokerUnavailable(f"{self._name} not connected: {self._last_error}")
        channel = (CHANNEL_PREFIX + topic).encode()
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters[(kind, channel)].append(waiter)
        if kind == "subscribe":
            self._topics.add(topic)
        self._queue_command(pubsub, kind, channel)
        try:
            async with asyncio.timeout(SUBSCRIBE_TIMEOUT):
                await waiter
        except (*_REDIS_ERRORS, BrokerUnavailable) as exc:
            _check_cancelled()
            if kind == "subscribe":
                self._topics.discard(topic)
            raise BrokerUnavailable(f"redis: {kind} failed: {exc or type(exc).__name__}") from None
        finally:
            # No empty deque left behind: one per topic ever subscribed was 0.8 KiB per
            # connection on a user's own topic.
            waiters = self._waiters.get((kind, channel))
            if waiters is not None:
                if waiter in waiters:
                    waiters.remove(waiter)
                if not waiters:
                    del self._waiters[(kind, channel)]

    def _queue_command(self, pubsub: PubSub, kind: str, channel: bytes) -> None:
        """Send ``kind`` for ``channel`` with the others of this loop iteration: one SUBSCRIBE
        (or UNSUBSCRIBE) names every channel the handshakes of the iteration need. Redis then
        confirms each channel apart, and the listener resolves each waiter."""
        queued = self._outbox.get(kind)
        if queued is None:
            queued = self._outbox[kind] = {}
            asyncio.get_running_loop().call_soon(self._send_queued, pubsub, kind)
        queued[channel] = None

    def _send_queued(self, pubsub: PubSub, kind: str) -> None:
        channels = list(self._outbox.pop(kind, {}))
        if channels:
            task = asyncio.get_running_loop().create_task(self._send_command(pubsub, kind, channels))
            self._commands.add(task)
            task.add_done_callback(self._commands.discard)

    async def _send_command(self, pubsub: PubSub, kind: str, channels: list[bytes]) -> None:
        try:
            async with asyncio.timeout(SUBSCRIBE_TIMEOUT):
                await getattr(pubsub, kind)(*channels)
        except _REDIS_ERRORS as exc:
            _check_cancelled()
            failure = BrokerUnavailable(f"redis: {kind} failed: {exc or type(exc).__name__}")
            for channel in channels:
                for waiter in self._waiters.get((kind, channel), ()):
                    if not waiter.done():
                        waiter.set_exception(failure)

    # -- the listener -------------------------------------------------------------------------

    async def _listen(self) -> None:
        backoff = BACKOFF_MIN
        while True:
            try:
                await self._session()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure ends the session; we go on
                _check_cancelled()
                self._last_error = _why(exc)
                if self._was_connected:
                    backoff = BACKOFF_MIN
                    log.warning("%s: pub/sub link lost: %s; reconnecting in %.1f s",
                                self._name, self._last_error, backoff)  # fmt: skip
                else:
                    # Every attempt is worth a line: the backoff (capped at BACKOFF_MAX) bounds
                    # them, and an operator must see at once why the instance is not ready.
                    log.warning(
                        "%s unreachable: %s; retrying in %.1f s", self._name, self._last_error, backoff
                    )
            self._was_connected = False
            if await self._stopped_within(backoff):
                return
            backoff = min(backoff * 2, BACKOFF_MAX)

    async def _session(self) -> None:
        pubsub = self._sub.pubsub()
        self._pubsub = pubsub
        try:
            await self._read(pubsub)
        finally:
            self._end_session()
            try:
                async with asyncio.timeout(1):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            except Exception:  # noqa: BLE001 - the link is already gone
                pass

    async def _read(self, pubsub: PubSub) -> None:
        wanted = {(CHANNEL_PREFIX + t).encode() for t in self._topics}
        unconfirmed = wanted | {self._probe_channel, _MANY}
        # Read before subscribing: every id above it is this session's to deliver.
        async with asyncio.timeout(PUBLISH_TIMEOUT):
            sentinel = "1" if self._topology.kind == "sentinel" else "0"
            floor = int(await self._session_script(keys=[SEQ_KEY, EPOCH_KEY, MASTER_KEY], args=[sentinel]))
        # While the gap of an earlier session is not filled, live messages wait (in order).
        self._filling, self._held, self._held_bytes = self._gap_from is not None, [], 0
        await pubsub.subscribe(*unconfirmed)
        while True:
            message = await pubsub.get_message(timeout=None)
            if message is None:
                continue
            kind = message["type"]
            if kind == "message":
                self._deliver(message["channel"], message["data"])
            elif kind in ("subscribe", "unsubscribe"):
                channel = message["channel"]
                if unconfirmed:
                    unconfirmed.discard(channel)
                    if not unconfirmed:
                        await self._resync(pubsub, wanted)
                        # Pooled publish connections may date from before a Redis restart:
                        # drop the idle ones, or the first publish after it fails. And no
                        # publish may go out without a deadline: measure Redis's clock first.
                        await self._pub.connection_pool.disconnect(inuse_connections=False)
                        async with asyncio.timeout(PUBLISH_TIMEOUT):
                            await self._measure_clock()
                        lost = await self._fill_gap() if self._gap_from is not None else None
                        self._floor = self._seen = floor
                        self._live = self._was_connected = True
                        self._last_error = "link lost"
                        self._set_connected(True)
                        log.info("%s connected", self._name)
                        if lost is not None:
                            self._on_resync(lost)
                waiters = self._waiters.get((kind, channel))
                if waiters:
                    waiter = waiters.popleft()
                    if not waiter.done():
                        waiter.set_result(None)

    async def _fill_gap(self) -> list[str]:
        """Deliver what every held topic missed since the last session, then what arrived live
        meanwhile (minus duplicates); returns the topics for which that cannot be done whole."""
        assert self._gap_from is not None
        topics = sorted(self._topics)
        lost: list[str] = []
        for start in range(0, len(topics), GAP_TOPICS_PER_READ):
            chunk = topics[start : start + GAP_TOPICS_PER_READ]
            positions = {t: max(self._filled.get(t, 0), self._gap_from) for t in chunk}
            async with asyncio.timeout(PUBLISH_TIMEOUT):
                gaps = await self._reader.gaps(positions, GAP_ENTRIES, GAP_BYTES)
            for topic, missed in gaps.items():
                if missed is None:
                    lost.append(topic)
                    self._filled[topic] = 1 << 62  # its sockets are told: deliver nothing held
                    continue
                for n in missed:
                    if topic in self._topics:
                        self._on_notification(n)
                    self._filled[topic] = n.id
        held, self._held, self._filling = self._held, [], False
        if held is None:  # too much arrived meanwhile to keep: nobody can be served whole
            lost = sorted(self._topics)
            held = []
        else:
            for channel, data in held:
                self._deliver(channel, data)
        # Messages still unread on the link may be in what history gave too: ``_filled`` stays,
        # and a topic's entry goes once a newer id came live. Lost topics start afresh.
        for topic in lost:
            self._filled.pop(topic, None)
        self._gap_from = None
        log.info("redis subscriptions rebuilt: %d topics, %d could not be filled", len(topics), len(lost))
        return lost

    async def _resync(self, pubsub: PubSub, subscribed: set[bytes]) -> None:
        """Drop channels whose last local subscriber left while the session was being set up."""
        stale = subscribed - {(CHANNEL_PREFIX + t).encode() for t in self._topics}
        if stale:
            await pubsub.unsubscribe(*stale)

    def _deliver(self, channel: bytes, data: bytes) -> None:
        if channel == self._probe_channel:
            sent = self._probe_sent.pop(data, None)
            if sent is not None:
                self.probe_lag = time.monotonic() - sent
            return
        if self._filling:
            self._hold(channel, data)
            return
        if channel == _MANY:
            self._deliver_many(data)
            return
        topic = channel[len(CHANNEL_PREFIX) :].decode()
        try:
            notification = Notification.from_envelope(topic, data)
        except ValueError:
            log.error("dropping malformed broker message on %r", topic)
            return
        if self._filled and topic in self._filled:
            if notification.id <= self._filled[topic]:
                return  # delivered from history by the last gap fill
            del self._filled[topic]
        if notification.id > self._seen:
            self._seen = notification.id
        self._on_notification(notification)

    def _deliver_many(self, data: bytes) -> None:
        """A message of PUBLISH_MANY_LUA: the topics held here get their notification."""
        try:
            head, rest = data.split(b"\n", 1)
            ts, length = head.split(b" ")
            size = int(length)
            tail = b',"data":' + rest[:size] + b',"ts":' + ts + b"}"
            announced = rest[size + 1 :].split(b"\n")
        except ValueError:
            log.error("dropping malformed broker message on %r", MANY_CHANNEL)
            return
        held, filled, at = self._topics, self._filled, int(ts)
        for line in announced:
            sid, _, name = line.partition(b" ")
            topic = name.decode()
            if topic not in held:
                continue
            id_ = int(sid)
            if filled and topic in filled:
                if id_ <= filled[topic]:
                    continue  # delivered from history by the last gap fill
                del filled[topic]
            if id_ > self._seen:
                self._seen = id_
            payload = b'{"type":"notification","id":"' + sid + b'","topic":"' + name + b'"' + tail
            self._on_notification(
                Notification(topic, id_, at, payload.decode(), len(payload), ws_text_frame(payload))
            )

    def _hold(self, channel: bytes, data: bytes) -> None:
        if self._held is None:
            return
        self._held_bytes += len(data)
        if self._held_bytes > GAP_BUFFER_BYTES:
            self._held = None
        else:
            self._held.append((channel, data))

    async def _probe(self) -> None:
        """Every few seconds: measure Redis's clock, publish a probe, and restart the pub/sub
        session if the probe cannot be published or does not come back."""
        seq = 0
        while not self._stop.is_set():
            if not self.connected:
                await self._stopped_within(0.1)  # probe (and measure the clock) as soon as it is up
                continue
            seq += 1
            if not await self._probe_once(str(seq).encode()) and self.connected:
                log.warning("redis pub/sub link silent: no probe back in %.0f s; reconnecting", PROBE_TIMEOUT)
                self.probe_lag = None
                await self._restart_listener()
            await self._stopped_within(PROBE_INTERVAL)

    async def _stopped_within(self, seconds: float) -> bool:
        """Sleep ``seconds``, or less if the broker is closed meanwhile; True when closed."""
        try:
            async with asyncio.timeout(seconds):
                await self._stop.wait()
        except TimeoutError:
            _check_cancelled()
        return self._stop.is_set()

    async def _probe_once(self, token: bytes) -> bool:
        self._probe_sent = {token: time.monotonic()}
        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT):
                await self._measure_clock()
                await self._pub.publish(self._probe_channel, token)
        except TimeoutError:
            _check_cancelled()
            return False  # Redis does not answer: as bad as a silent link
        except _REDIS_ERRORS as exc:
            _check_cancelled()
            log.debug("probe not published: %r", exc)
            return True  # Redis refused or is unreachable: the listener sees to that by itself
        deadline = time.monotonic() + PROBE_TIMEOUT
        while token in self._probe_sent and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        return token not in self._probe_sent

    async def _measure_clock(self) -> None:
        before = time.time()
        seconds, micros = await self._pub.time()
        after = time.time()
        self._clock_offset = seconds + micros / 1e6 - (before + after) / 2

    async def _restart_listener(self) -> None:
        if self._stop.is_set():
            return
        if self._listener is not None:
            self._listener.cancel()
            await asyncio.gather(self._listener, return_exceptions=True)
        self._listener = asyncio.create_task(self._listen(), name="notifier-redis-listener")

    def _end_session(self) -> None:
        if self._live:  # this session may have missed something: the next one fills it in
            self._gap_from, self._live = max(self._floor, self._seen), False
        self._filling = False
        self._set_connected(False)
        self._pubsub = None
        for waiters in self._waiters.values():
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_exception(BrokerUnavailable("redis: link lost"))
        self._waiters.clear()

    def _set_connected(self, connected: bool) -> None:
        if connected != self.connected:
            self.connected = connected
            self._on_state(connected)
