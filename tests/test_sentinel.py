"""``redis+sentinel://``: the broker follows a Sentinel failover, on real processes (a master, a
replica and three sentinels, each a real redis-server, and two ``notifier serve`` instances).

Each test says what it injects, what it sends and what arrives; every wait has a deadline. The
failover timings of a run are printed (``pytest -s`` shows them).
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
from conftest import SECRET, make_settings, mint_token
from redis.asyncio import Redis
from support import ROOT, Instance, RedisServer, SentinelSet
from test_faults import Publisher, eventually, fresh, running, status_of
from test_hardening import Follower

from notifier.broker_redis import RedisBroker
from notifier.redis_topology import parse_sentinel_url
from notifier.settings import ConfigError, load_settings

CONTRACT_LIMIT = 30.0  # seconds after a master dies until POSTs and /readyz are back


# -- the URL --------------------------------------------------------------------------------------


def test_sentinel_url_names_sentinels_master_db_and_password() -> None:
    url = parse_sentinel_url("redis+sentinel://:s3cret@10.0.0.1:26379,[::1]:26380/mymaster/2")
    assert url.sentinels == (("10.0.0.1", 26379), ("::1", 26380))
    assert (url.service, url.db, url.username, url.password) == ("mymaster", 2, None, "s3cret")
    plain = parse_sentinel_url("redis+sentinel://127.0.0.1:26379/mymaster")
    assert (plain.service, plain.db, plain.password) == ("mymaster", 0, None)
    assert make_settings(broker_url="redis+sentinel://h:1,h:2/m").broker_url == "redis+sentinel://h:1,h:2/m"


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("redis+sentinel://127.0.0.1:26379", "names no master"),
        ("redis+sentinel://127.0.0.1:26379/", "names no master"),
        ("redis+sentinel://127.0.0.1/mymaster", "must be host:port"),
        ("redis+sentinel://127.0.0.1:26379,:1/mymaster", "must be host:port"),
        ("redis+sentinel://127.0.0.1:99999/mymaster", "from 1 to 65535"),
        ("redis+sentinel://127.0.0.1:26379/mymaster/zero", "/<master name>/<db number>"),
        ("redis+sentinel://127.0.0.1:26379/mymaster?db=1", "no query string"),
    ],
)
def test_a_bad_sentinel_url_is_refused_with_one_line_naming_the_variable(url: str, says: str) -> None:
    with pytest.raises(ConfigError) as refused:
        load_settings(broker_url=url, _env_file=None)
    line = str(refused.value)
    assert line.startswith("NOTIFIER_BROKER_URL: ") and says in line and "\n" not in line


@pytest.mark.slow
def test_serve_with_a_bad_sentinel_url_exits_with_one_line_and_no_traceback() -> None:
    env = {"NOTIFIER_BROKER_URL": "redis+sentinel://127.0.0.1:26379", "NOTIFIER_JWT_SECRET": SECRET}
    done = subprocess.run(
        [sys.executable, "-m", "notifier", "serve", "--port", "0"],
        env={"PATH": "/usr/bin:/bin", **env}, cwd=ROOT, capture_output=True, text=True, timeout=30,
    )  # fmt: skip
    assert done.returncode != 0
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "NOTIFIER_BROKER_URL: names no master" in lines[0], done.stderr
    assert "Traceback" not in done.stderr


# -- a failover under load ------------------------------------------------------------------------


@asynccontextmanager
async def sentinel_deployment(
    count: int,
) -> AsyncIterator[tuple[SentinelSet, list[Instance], httpx.AsyncClient]]:
    """A Sentinel set, ``count`` instances on it and an HTTP client; everything stopped after."""
    sentinels = SentinelSet(down_after_ms=1000, failover_timeout_ms=5000)
    try:
        await asyncio.to_thread(sentinels.start)
        env = {"NOTIFIER_BROKER_URL": sentinels.url, "NOTIFIER_JWT_SECRET": SECRET}
        instances = [Instance(env) for _ in range(count)]
        async with running(*instances), httpx.AsyncClient(timeout=60, trust_env=False) as http:
            yield sentinels, instances, http
    finally:
        await asyncio.to_thread(sentinels.stop)


async def _all_ready(http: httpx.AsyncClient, instances: list[Instance], status: int) -> bool:
    answers = await asyncio.gather(*(status_of(http, i.url + "/readyz") for i in instances))
    return all(a == status for a in answers)


@pytest.mark.anyio
@pytest.mark.redis
@pytest.mark.slow
@pytest.mark.parametrize("how", ["sigkill", "sentinel-failover"])
async def test_master_lost_replica_promoted_posts_and_readyz_back_within_30s_nothing_lost(how: str) -> None:
    """Injected: SIGKILL of the Sentinel master (or, ``sentinel-failover``, a ``SENTINEL
    FAILOVER`` that turns the live old master into a replica: publish connections still on it
    get ``READONLY``) while a publisher POSTs every 20 ms to instance A (retrying 503s with the
    same Idempotency-Key) and a follower reads the topic on instance B.

    Arrived: within 30 s POSTs are accepted again and both instances' /readyz is 200; ids keep
    increasing across the failover; the follower ends with every accepted id exactly once, in
    order. After the SIGKILL the new master cannot vouch that it holds all the old one
    acknowledged, so B closes the socket with 1012 and the reconnect with ``since`` says
    ``recovered: false`` (honest; nothing was in fact lost here); after ``SENTINEL FAILOVER``
    the demoted master goes on delivering and the socket stays open.
    """
    topic = fresh("failover")
    token = mint_token("follower", ("subscribe",))
    async with sentinel_deployment(2) as (sentinels, [a, b], http):
        follower = Follower(b, token, topic)
        reader = asyncio.create_task(follower.run(), name="follower")
        try:
            await eventually(follower.ready.is_set, "the follower's hello", 20, [reader])
            publisher = Publisher(http, a.url, topic, frozenset({503}), pace=0.02, limit=5000, patience=40)
            writer = publisher.start()
            await eventually(lambda: len(publisher.accepted) >= 50, "50 posts before the kill", 30, [writer])
            old = await asyncio.to_thread(sentinels.kill_master if how == "sigkill" else sentinels.failover)
            killed = time.monotonic()
            last_before = publisher.accepted[-1]
            promoted = "the sentinels to name a new master"
            await eventually(lambda: sentinels.master_port() not in (old, None), promoted, CONTRACT_LIMIT)
            switched = time.monotonic() - killed
            new = sentinels.master_port()
            # Accepted on the new master: two more than were accepted when the sentinels named it
            # (the POST in flight then may have gone through on the old one).
            before = len(publisher.accepted)
            again = "a POST accepted again"
            await eventually(lambda: len(publisher.accepted) >= before + 2, again, CONTRACT_LIMIT, [writer])
            first_post = time.monotonic() - killed
            left = CONTRACT_LIMIT - first_post
            await eventually(lambda: _all_ready(http, [a, b], 200), "both /readyz 200", left, [writer])
            ready = time.monotonic() - killed
            await eventually(
                lambda: len(publisher.accepted) >= before + 100, "100 posts after the failover", 30, [writer]
            )
            accepted = await publisher.finish()
            await eventually(
                lambda: follower.ids[-1:] == accepted[-1:], "the last notification", 30, [reader]
            )
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
    print(
        f"\n[sentinel {how}] master {old} -> {new} named after {switched:.2f} s; first POST accepted "
        f"{first_post:.2f} s after the {how}, both /readyz 200 after {ready:.2f} s; {len(accepted)} "
        f"accepted, refusals {dict(publisher.refusals)}, 1012 reconnects {follower.restarts}"
    )
    assert new != old
    assert first_post < CONTRACT_LIMIT and ready < CONTRACT_LIMIT
    assert accepted == sorted(set(accepted)) and accepted[-1] > last_before  # ids keep increasing
    assert follower.ids == accepted
    if how == "sigkill":
        # A new master may lack what the dead one acknowledged: the instance that lost its link
        # cannot vouch for the gap, so its socket got 1012 and the reconnect an honest false
        # (it still received every accepted id, above).
        assert follower.restarts == [False]
    else:
        # The demoted master goes on delivering (replicated publishes), so B's link never broke.
        assert follower.restarts == []


# -- what a failover can lose ---------------------------------------------------------------------


async def _started(url: str) -> RedisBroker:
    broker = RedisBroker(url)
    await broker.start(lambda _n: None, lambda _c: None, lambda _l: None)
    async with asyncio.timeout(10):
        while not broker.connected:
            await asyncio.sleep(0.02)
    return broker


@pytest.mark.anyio
@pytest.mark.redis
async def test_a_write_acknowledged_but_not_replicated_before_a_promotion_makes_recovery_incomplete() -> None:
    """Injected: a replica promoted (``REPLICAOF NO ONE``, as Sentinel does) after the master
    acknowledged one more notification than it replicated; ids, history and epoch as the
    promoted replica holds them.

    Arrived: ids keep increasing, and a recovery from before the lost notification (history and
    the gap fill after a lost link) says incomplete: ``recovered: false`` or 1012.
    """
    old, replica = RedisServer(), RedisServer()
    await asyncio.to_thread(old.start)
    await asyncio.to_thread(replica.start)
    topic = fresh("promoted")
    try:
        async with Redis(port=old.port) as master, Redis(port=replica.port) as promoted:
            await promoted.replicaof("127.0.0.1", old.port)
            publisher = await _started(old.url)
            try:
                kept = await publisher.publish(topic, b"1", int(time.time() * 1000))
                async with asyncio.timeout(10):
                    while await master.wait(1, 100) < 1:  # `kept` is on the replica
                        pass
                await promoted.replicaof("NO", "ONE")  # the failover, before the next write
                lost = await publisher.publish(topic, b"2", int(time.time() * 1000))
            finally:
                await publisher.close()
            survivor = await _started(replica.url)
            try:
                later = await survivor.publish(topic, b"3", int(time.time() * 1000))
                history = await survivor.history(topic, kept.id, 100)
            finally:
                await survivor.close()
    finally:
        await asyncio.to_thread(old.stop)
        await asyncio.to_thread(replica.stop)
    assert kept.id < lost.id < later.id  # ids keep increasing (one host's clock here)
    assert [n.id for n in history.notifications] == [later.id]  # `lost` is gone ...
    assert not history.complete  # ... and recovery says so
