"""How the Redis broker finds the node to talk to: one server (``redis://``, ``rediss://``) or the
current master of a Sentinel set (``redis+sentinel://``).

Everything else (the scripts, key names, the listener's reconnect-and-resubscribe loop, the
probe) is the same for every topology and lives in :mod:`notifier.broker_redis`; this module
only makes the two clients it uses:

- ``publisher``: a *blocking* pool (a burst waits for a free connection up to the publish
  timeout), short socket timeouts and no retries: a retried publish could deliver twice.
- ``subscriber``: for the listener's pub/sub connection; no socket timeout (an idle listener
  must not time out) and no retries (the listener reconnects with its own backoff).

With Sentinel, every *new* connection asks the sentinels for the current master
(redis-py's ``SentinelManagedConnection``), so after a failover the listener's reconnect finds
the new master by itself. A pooled publish connection to the old master fails (connection
error, or ``READONLY`` once the old master came back as a replica: redis-py then drops that
connection and raises ``ConnectionError``) and answers 503, never retried; the next connection
asks the sentinels again, and the pool drops its idle connections whenever the master's address
changes (and whenever the listener reconnects: see ``broker_redis``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote, urlsplit

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff

SENTINEL_SCHEME = "redis+sentinel://"
# A sentinel answers from memory: one that takes longer is skipped for the next, and a publish
# that must find the master (a new connection) still fits its 2 s with one sentinel hung.
SENTINEL_TIMEOUT = 0.5


def no_retry() -> Retry:
    return Retry(NoBackoff(), 0)


@dataclass(frozen=True, slots=True)
class SentinelURL:
    """``redis+sentinel://[[user]:password@]host:port[,host:port...]/<master name>[/db]``.

    The password (and user) are the master's (and replica's): sentinels are asked without one.
    """

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int
    username: str | None
    password: str | None


def hosts_and_credentials(
    netloc: str, what: str
) -> tuple[str | None, str | None, list[tuple[str, int]]]:
    """``[[user]:password@]host:port[,host:port...]`` as (user, password, addresses); ValueError
    (one line, no secret) naming ``what`` each address is when one is malformed."""
    credentials, _, hosts = netloc.rpartition("@")
    username = password = None
    if credentials:
        user, has_password, secret = credentials.partition(":")
        username = unquote(user) or None
        password = unquote(secret) if has_password else None
    addresses: list[tuple[str, int]] = []
    for address in hosts.split(","):
        host, colon, port = address.strip().rpartition(":")
        if not colon or not host:
            raise ValueError(f"each {what} must be host:port, got {address.strip()!r}")
        host = host.removeprefix("[").removesuffix("]")
        if not port.isdigit() or not 0 < int(port) < 65536:
            raise ValueError(f"the port of {address.strip()!r} must be a number from 1 to 65535")
        addresses.append((host, int(port)))
    return username, password, addresses


def parse_sentinel_url(url: str) -> SentinelURL:
    """The parts of a ``redis+sentinel://`` URL; ValueError (one line, no secret) when malformed."""
    if not url.startswith(SENTINEL_SCHEME):
        raise ValueError(f"must start with {SENTINEL_SCHEME}")
    parts = urlsplit(url)
    if parts.query or parts.fragment:
        raise ValueError("takes no query string or fragment")
    username, password, sentinels = hosts_and_credentials(parts.netloc, "sentinel")
    path = [p for p in parts.path.split("/") if p]
    if not path:
        raise ValueError("names no master: add /<master name> after the sentinels")
    if len(path) > 2 or (len(path) == 2 and not path[1].isdigit()):
        raise ValueError("the path must be /<master name> or /<master name>/<db number>")
    return SentinelURL(tuple(sentinels), unquote(path[0]), int(path[1]) if len(path) == 2 else 0,
                       username, password)  # fmt: skip


class _BlockingSentinelPool(SentinelConnectionPool, BlockingConnectionPool):
    """Sentinel's master discovery per connection, with the blocking pool's wait for a free one.

    Leans on redis-py internals: the two pool classes cooperating through ``super().__init__``
    and the blocking pool's ``get_connection`` winning in the MRO (checked with redis-py 8.1, the
    version constraints.txt pins); :func:`check_pool_classes` verifies at import time that what
    this combines is still there. (redis-py's async ``SentinelConnectionPool.owns_connection``
    is never called: connections to an old master are dropped when they fail, and idle ones
    when the master's address changes or the listener reconnects.)
    """


def check_pool_classes() -> None:
    """Fail fast if a redis-py upgrade changed what :class:`_BlockingSentinelPool` relies on."""
    if not hasattr(SentinelConnectionPool, "get_master_address"):
        raise RuntimeError("redis-py's SentinelConnectionPool has no get_master_address: pin redis<9")
    if _BlockingSentinelPool.get_connection is not BlockingConnectionPool.get_connection:
        raise RuntimeError("redis-py's pool classes changed: the publish pool would not block")


check_pool_classes()


@dataclass(slots=True)
class Topology:
    """The two clients the broker uses, and whatever else must be closed with them."""

    kind: str  # "single" or "sentinel"
    publisher: Redis
    subscriber: Redis
    sentinel: Sentinel | None = None

    async def aclose(self) -> None:
        await self.publisher.aclose()
        await self.subscriber.aclose()
        if self.sentinel is not None:
            await self.sentinel.aclose()


def connect(url: str, *, publish_timeout: float, connections: int, subscribe_timeout: float) -> Topology:
    """The clients for ``url`` (no I/O yet: connections are made when first used)."""
    if url.startswith(SENTINEL_SCHEME):
        return _sentinel(url, publish_timeout, connections, subscribe_timeout)
    pool = BlockingConnectionPool.from_url(
        url,
        max_connections=connections,
        timeout=publish_timeout,
        socket_timeout=publish_timeout,
        socket_connect_timeout=publish_timeout,
        retry=no_retry(),
    )
    publisher = Redis.from_pool(pool)  # owns the pool: aclose() closes its connections
    subscriber = Redis.from_url(
        url, socket_connect_timeout=subscribe_timeout, retry=no_retry(), health_check_interval=0
    )
    return Topology("single", publisher, subscriber)


def _sentinel(url: str, publish_timeout: float, connections: int, subscribe_timeout: float) -> Topology:
    target = parse_sentinel_url(url)
    # Sentinels answer a question or are skipped for the next one: short timeouts, no retries.
    asked: dict[str, Any] = {
        "socket_timeout": SENTINEL_TIMEOUT,
        "socket_connect_timeout": SENTINEL_TIMEOUT,
        "retry": no_retry(),
    }
    sentinel = Sentinel(  # type: ignore[no-untyped-call]
        list(target.sentinels),
        sentinel_kwargs=asked,
        db=target.db,
        username=target.username,
        password=target.password,
        retry=no_retry(),
    )
    publisher = sentinel.master_for(
        target.service,
        connection_pool_class=_BlockingSentinelPool,
        max_connections=connections,
        timeout=publish_timeout,
        socket_timeout=publish_timeout,
        socket_connect_timeout=publish_timeout,
    )
    subscriber = sentinel.master_for(
        target.service, socket_connect_timeout=subscribe_timeout, health_check_interval=0
    )
    return Topology("sentinel", publisher, subscriber, sentinel)
