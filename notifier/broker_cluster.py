"""The Redis broker on a Redis Cluster (``redis+cluster://``): each topic lives in its own slot.

The same broker as :mod:`notifier.broker_redis`, with the same scripts (``PUBLISH_LUA``,
``SESSION_LUA``) and the same history reader, over cluster-safe key names
(:class:`notifier.redis_cluster.ClusterKeys`): every key of a topic (id counter, epoch,
history, trim mark, idempotency keys) carries the topic as its hash tag, so each script call
touches one slot. What differs lives in this module, :mod:`notifier.redis_cluster` (key names,
script variants, the URL) and :mod:`notifier.redis_cluster_links` (the sharded pub/sub links):

- Ids are per topic (``notifier:{<topic>}:seq``): strictly increasing per topic, forever (they
  are still Redis's clock in microseconds, see :func:`notifier.broker.next_id`), but not ordered
  across topics. Each topic has its own epoch too.
- Live delivery uses sharded pub/sub: the script ``SPUBLISH``es to ``notifier:{<topic>}``, which
  reaches only the shard owning the topic's slot. redis-py 8.1's asyncio ``ClusterPubSub`` has
  ``ssubscribe``, but it hides which shard link was lost and when; the no-silent-gap contract
  needs exactly that, so :mod:`notifier.redis_cluster_links` keeps one plain pub/sub connection
  per shard master itself, ``SSUBSCRIBE``s each topic on the link of its slot's owner, and after a
  link is rebuilt fills that link's topics from history (like ``RedisBroker._fill_gap``, but per
  topic), naming the unfillable ones to ``on_resync``. A lost link touches only its own topics.
- Publishing goes through redis-py's async ``RedisCluster``: it routes a script by its keys and
  follows ``MOVED``/``ASK``/``TRYAGAIN`` itself (safe: the command did not run); it is built with
  no retries, so a publish that may have run (a timeout, a dropped connection) is never sent
  twice: it answers 503.
- A publish to many topics is one script call per topic (run concurrently), each with the
  topic's own idempotency key: the topics do not share an id counter, so the many-topic script
  (one counter for the call) does not fit; the answers keep the order given.
- Failover and migration honesty: a topic's ``master`` key holds the replication id of the
  master that last wrote or read its bookkeeping. ``SESSION_LUA`` (run per topic before it is
  subscribed, and before each history read) and the publish script move the topic's epoch past
  its last id whenever the master changed: a promoted replica may lack notifications the old
  master acknowledged. This is conservative: after a failover or a slot migration, recoveries
  from before it say ``recovered: false`` and that shard's sockets get 1012 (the cluster cannot
  tell what the old master had not replicated).
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

from redis.asyncio.cluster import ClusterNode, RedisCluster

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
from notifier.broker_redis import (
    _REDIS_ERRORS,
    DEADLINE_MARGIN,
    PUBLISH_CONNECTIONS,
    PUBLISH_TIMEOUT,
    _check_cancelled,
    _why,
    redacted,
    unavailable_on_error,
)
from notifier.errors import BrokerUnavailable
from notifier.protocol import Accepted, notification_tail
from notifier.redis_cluster import (
    CLUSTER_PUBLISH_LUA,
    REJECT_LUA,
    REJECTIONS_KEY,
    ClusterKeys,
    parse_cluster_url,
)
from notifier.redis_cluster_links import ShardLinks
from notifier.redis_history import SESSION_LUA, HistoryReader, parse_rejections
from notifier.redis_presence import PresenceOfRedis, RedisPresence
from notifier.redis_topology import no_retry

# redis-py 8.1's async cluster client can raise AttributeError ("'NoneType' object has no
# attribute 'writelines'") when a node's connection is torn down while another task reconnects
# it, and uvloop a RuntimeError ("unable to perform operation on <TCPTransport closed=True>;
# the handler is closed") when a command is written to a connection that has just died (both
# seen when a master is SIGKILLed under load, the second once in a fresh-clone run: a POST
# answered 500). Either way the node is unavailable: 503 (a write that failed so never reached it).
_CLUSTER_ERRORS = (*_REDIS_ERRORS, AttributeError, RuntimeError)

MANY_CONCURRENCY = 32  # script calls in flight for one publish to many topics


class ClusterBroker(ShardLinks, PresenceOfRedis):
    """Broker over a Redis Cluster: see the module's docstring."""

    def __init__(self, url: str, history_size: int = 1000, history_ttl: int = 86400) -> None:
        self._target = parse_cluster_url(url)
        self._name = redacted(url)
        self._history_size, self._history_ttl = history_size, history_ttl
        self.connected = False
        self.probe_lag: float | None = None
        self._last_error = "connecting"
        self._pub = RedisCluster(
            startup_nodes=[ClusterNode(host, port) for host, port in self._target.nodes],
            username=self._target.username,
            password=self._target.password,
            retry=no_retry(),
            socket_timeout=PUBLISH_TIMEOUT,
            socket_connect_timeout=PUBLISH_TIMEOUT,
            # Per node; redis-py's cluster pool raises rather than waits when it runs out, so
            # ``_gate`` makes a burst wait for a free one (the probe and slot map keep a few).
            max_connections=PUBLISH_CONNECTIONS + 4,
        )
        self._gate = asyncio.Semaphore(PUBLISH_CONNECTIONS)
        self._names = ClusterKeys()
        self._script = self._pub.register_script(CLUSTER_PUBLISH_LUA)
        self._session_script = self._pub.register_script(SESSION_LUA)
        self._reject_script = self._pub.register_script(REJECT_LUA)
        self._reader = HistoryReader(self._pub, history_size, history_ttl, self._names)
        self._stop = asyncio.Event()
        self._supervisor: asyncio.Task[None] | None = None
        self._prober: asyncio.Task[None] | None = None
        self._clock_offset: float | None = None
        self._on_notification: OnNotification = lambda _n: None
        self._on_state: OnState = lambda _c: None
        self._on_resync: OnResync = lambda _lost: None
        node_id = uuid.uuid4().hex
        self._init_links(node_id)
        k = self._names.key
        control = [k(CONTROL_TOPIC, "seq"), k(CONTROL_TOPIC, "epoch"), self._names.channel(CONTROL_TOPIC),
                   k(CONTROL_TOPIC, "history")]
        # All presence keys in the control topic's slot: one shard runs each presence call.
        self._presence = RedisPresence(
            self._pub, CLUSTER_PUBLISH_LUA, control, k(CONTROL_TOPIC, "presence:"), node_id,
            (history_size, history_ttl), self._deadline, self._guard,
        )

    async def start(self, on_notification: OnNotification, on_state: OnState, on_resync: OnResync) -> None:
        self._on_notification, self._on_state, self._on_resync = on_notification, on_state, on_resync
        self._supervisor = asyncio.create_task(self._supervise(), name="notifier-cluster-supervisor")
        self._prober = asyncio.create_task(self._probe(), name="notifier-cluster-probe")

    async def close(self) -> None:
        self._stop.set()
        tasks = [self._prober, self._supervisor, *self._tasks, *(link.task for link in self._links.values())]
        for task in tasks:
            if task is not None:
                task.cancel()
        await asyncio.gather(*(t for t in tasks if t is not None), return_exceptions=True)
        self._set_connected(False)
        await self._pub.aclose()

    # -- publishing and reading -----------------------------------------------------------------

    def _deadline(self) -> str:
        if self._clock_offset is None:
            raise BrokerUnavailable(f"{self._name} not connected yet: {self._last_error}")
        return str(int((time.time() + self._clock_offset + PUBLISH_TIMEOUT - DEADLINE_MARGIN) * 1000))

    async def _publish_one(
        self, topic: str, data_json: bytes, ts: int, key: str | None, deadline: str
    ) -> Accepted:
        k = self._names.key
        keys = [k(topic, "seq"), k(topic, "epoch"), self._names.channel(topic), k(topic, "history")]
        if key is not None:
            # Idempotency is per topic: a key counts for the topic it was used with (the same
            # name publish_many gives that topic), in the topic's slot.
            keys.append(k(topic, "idem:" + topic_idempotency_key(key, topic)))
        tail = notification_tail(topic, data_json, ts)
        args: list[Any] = [tail, ts, IDEMPOTENCY_TTL, topic, self._history_size, deadline, self._history_ttl]
        async with self._gate:
            answer, outcome = await self._script(keys=keys, args=args)
        if outcome == 2:
            raise TimeoutError("past the deadline")
        id_, ts_, topic_ = answer.split(b" ", 2)
        return Accepted(int(id_), topic_.decode(), int(ts_), repeated=outcome == 1)

    async def publish(
        self, topic: str, data_json: bytes, ts: int, idempotency_key: str | None = None
    ) -> Accepted:
        return (await self._publish([topic], data_json, ts, idempotency_key, single=True))[0]

    async def publish_many(
        self, topics: list[str], data_json: bytes, ts: int, idempotency_key: str | None = None
    ) -> list[Accepted]:
        return await self._publish(topics, data_json, ts, idempotency_key, single=False)

    async def _publish(
        self, topics: list[str], data_json: bytes, ts: int, key: str | None, *, single: bool
    ) -> list[Accepted]:
        """One script call per topic, concurrently (each in its topic's slot). With a key: the
        request's key (its own slot) holds the first answer and counts for the topic it names, as
        PUBLISH_MANY_LUA's does; each topic's own key makes it published at most once under it.
        Set after the topics (NX), so a request that failed part way is finished by a retry.
        (Two requests with one key racing to different topics may both publish: the cluster has
        no atomic step across slots; a retry of one request is what the key is for.)"""
        deadline = self._deadline()
        answers: list[Accepted | None] = [None] * len(topics)
        failure: BaseException | None = None
        gate = asyncio.Semaphore(MANY_CONCURRENCY)

        async def one(index: int) -> None:
            nonlocal failure
            async with gate:
                if failure is not None:
                    return
                try:
                    answers[index] = await self._publish_one(topics[index], data_json, ts, key, deadline)
                except _CLUSTER_ERRORS as exc:
                    _check_cancelled()
                    failure = failure or exc

        try:
            async with asyncio.timeout(PUBLISH_TIMEOUT):
                if key is not None:
                    # The request's key is in a slot of its own, most often on another shard
                    # than the topics': that shard being down (a master killed, until its
                    # replica is promoted) must not refuse topics on the shards that are up.
                    # Each topic's own key still makes a retry publish it at most once; only a
                    # key reused for another topic is not answered with its first answer then.
                    first = None
                    try:
                        async with self._gate:
                            first = await self._pub.get(self._names.request(key))
                    except _CLUSTER_ERRORS:
                        _check_cancelled()
                    if first is not None:
                        text = first.decode() if isinstance(first, bytes) else first
                        id_, ts_, named = text.split(" ", 2)
                        given = Accepted(int(id_), named, int(ts_), repeated=True)
                        if single:  # a single publish: the key's first answer, whatever its topic
                            return [given]
                        if named in topics:
                            answers[topics.index(named)] = given
                await asyncio.gather(*(one(i) for i in range(len(topics)) if answers[i] is None))
        except _CLUSTER_ERRORS as exc:
            _check_cancelled()
            failure = failure or exc
        done = [a for a in answers if a is not None]
        if key is not None and failure is None and len(done) == len(topics):
            # Best effort: every topic is accepted (and its own key set) by now, so failing here
            # must not turn the answer into a 503; without it a retry still repeats each topic.
            try:
                async with asyncio.timeout(PUBLISH_TIMEOUT), self._gate:
                    a = done[0]
                    await self._pub.set(self._names.request(key), f"{a.id} {a.ts} {a.topic}",
                                        ex=IDEMPOTENCY_TTL, nx=True)  # fmt: skip
            except _CLUSTER_ERRORS:
                _check_cancelled()
        if failure is not None or len(done) < len(topics):
            why = f"redis: {_why(failure) if failure else 'too slow'}"
            if single:
                raise BrokerUnavailable(why)
            raise PartlyPublished(why, done)
        return done

    async def history(self, topic: str, since: int | None, limit: int, max_bytes: int = UNBOUNDED) -> History:
        async with unavailable_on_error(_CLUSTER_ERRORS), self._gate:
            return await self._reader.read(topic, since, limit, max_bytes)

    async def reject(self, sub: str, before: int, until: int) -> None:
        async with unavailable_on_error(_CLUSTER_ERRORS):
            await self._reject_script(keys=[REJECTIONS_KEY], args=[sub, f"{before} {until}", until])

    async def rejections(self) -> Rejections:
        async with unavailable_on_error(_CLUSTER_ERRORS):
            stored = await self._pub.hgetall(REJECTIONS_KEY)
        return parse_rejections(stored, time.time())

    @asynccontextmanager
    async def _guard(self) -> AsyncIterator[None]:
        async with unavailable_on_error(_CLUSTER_ERRORS), self._gate:
            yield

