"""Hardening against unlucky clients and a lossy broker, on real processes (redis-server and
``notifier serve`` instances): a recovery larger than the send queue, history reads of large
notifications, Redis memory bounded by the history TTL, pub/sub links that drop, and recovery
that stays honest after Redis lost its data.

Each test says what it injects, what it sends and what arrives; every wait has a deadline.
Memory bounds are on the instance's resident set (VmRSS), sampled while the test runs; the
figures of a run are printed (``pytest -s`` shows them).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from conftest import SECRET, mint_token
from redis.asyncio import Redis
from support import Instance, RedisServer
from test_faults import (
    Publisher,
    eventually,
    fresh,
    hello,
    kill,
    metric,
    next_frame,
    post,
    redis_running,
    rss_bytes,
    running,
    ws_connect,
    ws_url,
)
from websockets.asyncio.client import ClientConnection
from websockets.exceptions import ConnectionClosed, InvalidStatus

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.slow]

Json = dict[str, Any]
MiB = 1 << 20
SERVICE_RESTART = 1012
RESUBSCRIBES = "notifier_broker_resubscribes_total"
DROPPED_SLOW = 'notifier_notifications_dropped_total{reason="slow_consumer"}'


def env_for(redis: RedisServer, **extra: str) -> dict[str, str]:
    return {"NOTIFIER_BROKER_URL": redis.url, "NOTIFIER_JWT_SECRET": SECRET, **extra}


@asynccontextmanager
async def deployment(
    count: int = 1, **env: str
) -> AsyncIterator[tuple[RedisServer, list[Instance], httpx.AsyncClient, Redis]]:
    """A real redis-server and ``count`` instances on it (with ``env``), an HTTP client, and a
    Redis client for injecting faults; everything stopped on the way out."""
    redis = RedisServer()
    instances = [Instance(env_for(redis, **env)) for _ in range(count)]
    async with (
        redis_running(redis),
        running(*instances),
        httpx.AsyncClient(timeout=60, trust_env=False) as http,
        Redis(port=redis.port) as admin,
    ):
        yield redis, instances, http, admin


@asynccontextmanager
async def peak_rss(instance: Instance) -> AsyncIterator[dict[str, int]]:
    """Samples the instance's RSS every 20 ms while the block runs: ``before`` and ``peak``."""
    assert instance.proc is not None
    pid = instance.proc.pid
    figures = {"before": rss_bytes(pid), "peak": 0}
    figures["peak"] = figures["before"]
    stop = asyncio.Event()

    async def sample() -> None:
        while not stop.is_set():
            figures["peak"] = max(figures["peak"], rss_bytes(pid))
            try:
                async with asyncio.timeout(0.02):
                    await stop.wait()
            except TimeoutError:
                pass

    sampler = asyncio.create_task(sample())
    try:
        yield figures
    finally:
        stop.set()
        await sampler
        figures["peak"] = max(figures["peak"], rss_bytes(pid))


async def publish_many(
    http: httpx.AsyncClient, url: str, token: str, topic: str, payloads: list[Any], parallel: int = 8
) -> list[int]:
    """POST every payload to ``topic`` (``parallel`` at a time, each accepted); the ids, sorted."""
    ids: list[int] = []
    for start in range(0, len(payloads), parallel):
        answers = await asyncio.gather(
            *(post(http, url, token, topic, p) for p in payloads[start : start + parallel])
        )
        ids += [int(a["id"]) for a in answers]
    return sorted(ids)


async def read_notifications(ws: ClientConnection, topic: str, count: int, pause: float = 0.0) -> list[int]:
    """The ids of the next ``count`` notifications of ``topic``; ``pause`` s between reads makes
    a slow reader (pacing the test's own client, not waiting on the server)."""
    ids: list[int] = []
    while len(ids) < count:
        frame = await next_frame(ws)
        assert frame["type"] != "error", frame
        if frame["type"] == "notification" and frame["topic"] == topic:
            ids.append(int(frame["id"]))
        if pause:
            await asyncio.sleep(pause)
    return ids


# -- 1. a recovery larger than the send queue ---------------------------------------------------


async def test_recovery_of_more_than_the_send_queue_gets_hello_at_once_then_everything_paced() -> None:
    """Sent: one notification X to a topic, then 150 of 8 KB (1.2 MB, over the 1 MiB send queue).

    Then 8 sockets connect at once with ``since=X``; one of them reads slowly (10 ms a frame).

    Arrived (v1: 1013 before ``hello``, every time, +860 MiB of RSS): each gets ``hello`` with
    ``recovered: true`` first, then exactly the 150 ids in order; nothing dropped as a slow
    consumer; the instance's RSS grows by less than 64 MiB through it all.
    """
    topic = fresh("replay")
    token = mint_token("replayer")
    async with deployment() as (_redis, [instance], http, _admin):
        first = int((await post(http, instance.url, token, topic, "x"))["id"])
        sent = await publish_many(http, instance.url, token, topic, [{"pad": "y" * 8000}] * 150)

        async def recover(pause: float) -> tuple[Json, list[int]]:
            async with ws_connect(ws_url(instance.url, token, [topic], since=first)) as ws:
                greeting = await hello(ws)
                return greeting, await read_notifications(ws, topic, len(sent), pause)

        async with peak_rss(instance) as rss:
            results = await asyncio.gather(*(recover(0.01 if i == 0 else 0.0) for i in range(8)))
        dropped = await metric(http, instance, DROPPED_SLOW)
    grown = rss["peak"] - rss["before"]
    print(f"\n[replay] 8 x 150 x 8 KB recovered; RSS +{grown / MiB:.1f} MiB, dropped {dropped:.0f}")
    for greeting, ids in results:
        assert greeting["recovered"] is True
        assert ids == sent
    assert dropped == 0
    assert grown < 64 * MiB


# -- 3. history reads of large notifications ----------------------------------------------------


async def test_history_answers_hold_at_most_4_mib_and_parallel_reads_stay_bounded() -> None:
    """Sent: 1,000 notifications of 60 KB to one topic (60 MB of history), then 8 parallel
    ``GET .../notifications?limit=1000``, and one with ``since`` the first id.

    Arrived (v1: each answer held all 60 MB, +1 GiB of RSS for 8): each answer 200 with at most
    4 MiB of frames and ``"more": true``; without ``since`` the newest that fit (ending with
    the last id), with ``since`` the oldest after it; the instance's RSS grows less than 128 MiB.
    """
    topic = fresh("big")
    token = mint_token("reader")
    headers = {"authorization": f"Bearer {token}"}
    async with deployment() as (_redis, [instance], http, _admin):
        url = f"{instance.url}/v1/topics/{topic}/notifications"
        sent = await publish_many(http, instance.url, token, topic, [{"pad": "z" * 60000}] * 1000, 16)
        async with peak_rss(instance) as rss:
            answers = await asyncio.gather(
                *(http.get(url, params={"limit": 1000}, headers=headers) for _ in range(8))
            )
            after = await http.get(url, params={"limit": 1000, "since": sent[0]}, headers=headers)
    grown = rss["peak"] - rss["before"]
    print(f"\n[history] 8 parallel reads of 60 MB of history: RSS +{grown / MiB:.1f} MiB")
    for answer in [*answers, after]:
        assert answer.status_code == 200
        body = answer.json()
        frames = sum(len(json.dumps(n, separators=(",", ":")).encode()) for n in body["notifications"])
        assert body["more"] is True and 0 < frames <= 4 * MiB
    newest = [int(n["id"]) for n in answers[0].json()["notifications"]]
    assert newest == sent[-len(newest) :]
    oldest = [int(n["id"]) for n in after.json()["notifications"]]
    assert oldest == sent[1 : 1 + len(oldest)]
    assert grown < 128 * MiB


# -- 4. Redis memory bounded by the history TTL --------------------------------------------------


async def test_redis_forgets_topics_after_the_history_ttl_and_ids_and_recovery_stay_honest() -> None:
    """Injected: ``NOTIFIER_HISTORY_TTL=2``.

    Sent: one notification to each of 2,000 distinct topics, and 50 of 60 KB to one of them.

    Arrived (v1: every stream kept forever, 3 MB -> 211 MB for 50,000 topics): each topic's
    history carries the TTL; within 30 s no topic key is left (only the id counter, the epoch
    and idempotency keys remain), and within 30 s more its used memory is back within 1 MiB of
    where it started.
    A topic published again after that gets a higher id; a recovery from before the expiry says
    ``recovered: false``, whether or not something was published since.
    """
    token = mint_token("ttl")
    topics = [fresh("ttl") for _ in range(2000)]
    async with deployment(NOTIFIER_HISTORY_TTL="2") as (_redis, [instance], http, admin):
        await post(http, instance.url, token, fresh("warmup"), 0)
        start_memory = (await admin.info("memory"))["used_memory"]
        for chunk in range(0, len(topics), 32):
            await asyncio.gather(*(post(http, instance.url, token, t, 1) for t in topics[chunk : chunk + 32]))
        first = int(
            (await publish_many(http, instance.url, token, topics[0], [{"pad": "w" * 60000}] * 50))[-1]
        )
        # Every topic's history carries the TTL (Redis forgets it by itself).
        last = topics[-1]
        ttls = [await admin.pttl(f"notifier:history:{topic}") for topic in (last, topics[0])]

        async def forgotten() -> bool:
            # The instance's presence heartbeat (notifier:presence:nodes) is not topic data.
            kept = [k async for k in admin.scan_iter(count=1000) if not k.startswith(b"notifier:presence:")]
            return len(kept) <= 3

        took = await eventually(forgotten, "the topics' keys to expire", 30)
        memory = {"end": 0}

        async def memory_back() -> bool:
            # Client buffers (60 KB requests) shrink on Redis's own schedule: wait for them too.
            memory["end"] = (await admin.info("memory"))["used_memory"]
            return bool(memory["end"] - start_memory < MiB)

        freed = await eventually(memory_back, "used_memory back within 1 MiB of the start", 30)
        end_memory = memory["end"]
        async with ws_connect(ws_url(instance.url, token, [topics[0]], since=first)) as ws:
            nothing_since = await hello(ws)
        again = int((await post(http, instance.url, token, topics[0], 2))["id"])
        async with ws_connect(ws_url(instance.url, token, [topics[0]], since=first)) as ws:
            published_since = await hello(ws)
            replayed = await read_notifications(ws, topics[0], 1)
    print(
        f"\n[ttl] 2,000 topics, keys gone in {took:.1f} s after the last publish; used_memory "
        f"{start_memory / MiB:.2f} -> {end_memory / MiB:.2f} MiB ({freed:.1f} s later)"
    )
    assert all(0 < ttl <= 2000 for ttl in ttls), ttls
    assert again > first
    assert nothing_since["recovered"] is False
    assert published_since["recovered"] is False and replayed == [again]


# -- 5. the pub/sub link drops -------------------------------------------------------------------


class Follower:
    """Reads ``topic`` through one instance; on a 1012 close it reconnects with ``since`` = the
    last id it received (as the shipped clients do). ``ids`` is everything it received."""

    def __init__(self, instance: Instance, token: str, topic: str) -> None:
        self.instance, self.token, self.topic = instance, token, topic
        self.ids: list[int] = []
        self.restarts: list[bool] = []  # ``recovered`` of each reconnect after a 1012
        self.ready = asyncio.Event()

    async def run(self) -> None:
        since: int | None = None
        while True:
            try:
                async with ws_connect(ws_url(self.instance.url, self.token, [self.topic], since)) as ws:
                    greeting = await hello(ws)
                    if since is not None:
                        self.restarts.append(greeting["recovered"])
                    self.ready.set()
                    async for raw in ws:
                        frame = json.loads(raw)
                        if frame["type"] == "notification" and frame["topic"] == self.topic:
                            self.ids.append(int(frame["id"]))
            except ConnectionClosed as closed:
                assert closed.rcvd is not None and closed.rcvd.code == SERVICE_RESTART, closed
                # Nothing received yet: everything retained since the broker's data began (0), the
                # topic being new here. (1 would be a position from before the epoch: "recovered:
                # false" whatever was kept; a race with the live messages B still had buffered
                # decided which one this test saw.)
                since = self.ids[-1] if self.ids else 0
            except InvalidStatus as refused:
                # A reconnect while the instance is not ready (its broker still rebuilding):
                # 503, retried after a pause, as the shipped clients do. Anything else fails.
                assert since is not None and refused.response.status_code == 503, refused
                await asyncio.sleep(0.2)  # pacing of the retries, not a wait on a condition


async def test_pubsub_link_killed_while_posting_every_5_ms_no_notification_is_silently_lost() -> None:
    """Injected: ``CLIENT KILL TYPE pubsub`` three times while a publisher POSTs every 5 ms.

    Arrived (v1: 11 of 400 accepted never reached the open socket, and nothing told it): the
    subscriber ends with every accepted id exactly once, in order: filled in after each
    rebuild of the subscription, or, where it could not be, after a 1012 close and a reconnect
    with ``since`` that says ``recovered: true``. The instance counts each rebuild in
    ``notifier_broker_resubscribes_total``.
    """
    topic = fresh("kill")
    token = mint_token("follower", ("subscribe",))
    async with deployment() as (_redis, [instance], http, admin):
        follower = Follower(instance, token, topic)
        reader = asyncio.create_task(follower.run(), name="follower")
        try:
            await eventually(follower.ready.is_set, "the follower's hello", 20, [reader])
            publisher = Publisher(http, instance.url, topic, frozenset({503}), pace=0.005, limit=400)
            writer = publisher.start()
            for kills in range(3):
                await eventually(
                    lambda k=kills: len(publisher.accepted) >= 100 * (k + 1), "100 more posts", 30, [writer]
                )
                assert await admin.client_kill_filter(_type="pubsub") >= 1
            await eventually(lambda: len(publisher.accepted) == 400, "the last 100 posts", 30, [writer])
            accepted = await publisher.finish()
            await eventually(
                lambda: follower.ids[-1:] == accepted[-1:], "the last notification", 30, [reader]
            )
            resubscribes = await metric(http, instance, RESUBSCRIBES)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
    print(
        f"\n[pubsub kill] {len(accepted)} accepted, 1012 reconnects {follower.restarts}, "
        f"rebuilds {resubscribes:.0f}"
    )
    assert follower.ids == accepted
    assert all(follower.restarts)
    assert resubscribes >= 3


async def test_instance_cut_by_the_pubsub_output_buffer_limit_closes_with_1012_then_recovers_all() -> None:
    """Injected: Redis's pub/sub output-buffer limit at 256 KB; the subscriber's instance B
    SIGSTOPped while 150 notifications of 60 KB are POSTed through instance A (9 MB: more than
    the kernel's socket buffers take, so Redis cuts B's link), then SIGCONTed; then 20 more.

    Arrived (v1: 66 of 700 delivered, no frame, no close): B rebuilds its subscription; the
    socket on it, which missed more than can be filled in, is closed with 1012; reconnecting
    with ``since`` says ``recovered: true`` and the subscriber ends with all 170 ids, in order.
    """
    topic = fresh("cut")
    token = mint_token("cut-follower")
    async with deployment(2) as (_redis, [a, b], http, admin):
        await admin.config_set("client-output-buffer-limit", "pubsub 262144 131072 1")
        follower = Follower(b, token, topic)
        reader = asyncio.create_task(follower.run(), name="follower")
        try:
            await eventually(follower.ready.is_set, "the follower's hello", 20, [reader])
            assert b.proc is not None
            os.kill(b.proc.pid, signal.SIGSTOP)
            try:
                sent = await publish_many(http, a.url, token, topic, [{"pad": "v" * 60000}] * 150)
                clients = await admin.client_list(_type="pubsub")
            finally:
                os.kill(b.proc.pid, signal.SIGCONT)
            await eventually(lambda: bool(follower.restarts), "a 1012 and a reconnect", 30, [reader])
            sent += await publish_many(http, a.url, token, topic, [{"n": i} for i in range(20)])
            await eventually(lambda: follower.ids[-1:] == sent[-1:], "the last notification", 30, [reader])
            resubscribes = await metric(http, b, RESUBSCRIBES)
        finally:
            reader.cancel()
            await asyncio.gather(reader, return_exceptions=True)
    print(
        f"\n[output limit] pub/sub clients while B was stopped: {len(clients)}; "
        f"1012 reconnects {follower.restarts}"
    )
    assert len(clients) == 1  # only A's link was left: Redis had cut B's
    assert follower.ids == sent
    assert follower.restarts == [True]
    assert resubscribes >= 1


# -- 6. recovery stays honest after Redis lost its data ---------------------------------------


async def test_recovery_after_flushall_or_a_restart_without_persistence_says_not_recovered() -> None:
    """Injected: ``FLUSHALL`` after a client noted its last id L and 3 more were published;
    later a restart of Redis without persistence while a socket is open.

    Arrived (v1: ``recovered: true`` and an empty replay): a reconnect with ``since=L`` before
    anything else is published says ``recovered: false``; a notification published after the
    wipe gets a higher id than any before it. After the restart, the open socket (which may
    have missed something Redis lost) is closed with 1012, and its reconnect with ``since``
    says ``recovered: false``.
    """
    topic = fresh("wipe")
    token = mint_token("wiped")
    async with deployment() as (redis, [instance], http, admin):
        last = int((await post(http, instance.url, token, topic, 0))["id"])
        before = await publish_many(http, instance.url, token, topic, [1, 2, 3])
        await admin.flushall()
        async with ws_connect(ws_url(instance.url, token, [topic], since=last)) as ws:
            after_flush = await hello(ws)
        newer = int((await post(http, instance.url, token, topic, 4))["id"])

        async with ws_connect(ws_url(instance.url, token, [topic])) as ws:
            await hello(ws)
            await asyncio.to_thread(kill, redis)
            await asyncio.to_thread(redis.start)
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await next_frame(ws, 30)
        async with ws_connect(ws_url(instance.url, token, [topic], since=newer)) as ws:
            after_restart = await hello(ws)
    assert after_flush["recovered"] is False
    assert newer > before[-1]
    assert closed.value.rcvd is not None and closed.value.rcvd.code == SERVICE_RESTART
    assert after_restart["recovered"] is False


# -- Redis full: refuse, never evict ------------------------------------------------------------


async def test_a_full_redis_with_noeviction_refuses_publishes_and_keeps_recovery_honest() -> None:
    """Injected: Redis at ``maxmemory`` with the policy the deployment uses (``noeviction``).

    Sent: 8 KB notifications to one topic until a POST is refused, then a recovery from the
    first accepted id.

    Arrived: the refused POST is a 503 saying the broker is unavailable (nothing accepted:
    the history ends with the last 202); the recovery says ``recovered: true`` and replays
    every accepted id, in order: a full Redis never drops history silently.
    """
    topic = fresh("full")
    token = mint_token("filler")
    async with deployment() as (redis, [instance], http, admin):
        first = int((await post(http, instance.url, token, topic, 0))["id"])
        used = (await admin.info("memory"))["used_memory"]
        await admin.config_set("maxmemory-policy", "noeviction")
        await admin.config_set("maxmemory", str(used + 2 * MiB))
        accepted: list[int] = []
        refused = None
        for _ in range(1000):  # 8 MB at most: well past the 2 MiB left
            response = await http.post(
                instance.url + "/v1/notifications",
                json={"topic": topic, "data": {"pad": "f" * 8000}},
                headers={"authorization": f"Bearer {token}"},
            )
            if response.status_code != 202:
                refused = response
                break
            accepted.append(int(response.json()["id"]))
        await admin.config_set("maxmemory", "0")
        async with ws_connect(ws_url(instance.url, token, [topic], since=first)) as ws:
            greeting = await hello(ws)
            replayed = await read_notifications(ws, topic, len(accepted))
    print(f"\n[full redis] {len(accepted)} accepted before the refusal")
    assert refused is not None and refused.status_code == 503
    assert "broker unavailable" in refused.json()["detail"]
    assert greeting["recovered"] is True and replayed == accepted


# -- a reconnect storm: handshakes in progress are bounded ----------------------------------------


async def test_handshakes_beyond_those_in_progress_get_503_at_once_and_the_instance_serves_after() -> None:
    """Bound: at most notifier.ws.MAX_HANDSHAKES_IN_PROGRESS (128) handshakes between request and
    hello on an instance; one more is refused with 503 at once instead of queueing behind the
    others (in a storm, queued handshakes outlast the clients' patience and pile up). Redis is
    stopped (SIGSTOP) so the admitted handshakes stay in progress, waiting on their SUBSCRIBE."""
    from notifier.ws import MAX_HANDSHAKES_IN_PROGRESS

    extra = 40
    async with deployment() as (redis, (instance,), http, _admin):
        assert redis.proc is not None
        urls = [ws_url(instance.url, mint_token(f"storm{i}", ("subscribe",))) for i in range(
            MAX_HANDSHAKES_IN_PROGRESS + extra)]  # fmt: skip
        os.kill(redis.proc.pid, signal.SIGSTOP)
        try:
            loop = asyncio.get_running_loop()
            started = loop.time()

            async def attempt(url: str) -> tuple[int, float]:
                try:
                    async with ws_connect(url):
                        return 101, loop.time() - started
                except InvalidStatus as exc:
                    return exc.response.status_code, loop.time() - started

            tasks = [asyncio.create_task(attempt(url)) for url in urls]

            def refused() -> list[tuple[int, float]]:
                return [t.result() for t in tasks if t.done() and t.result()[0] == 503]

            # The refused ones come back while Redis is still stopped: at once, not after a wait.
            await eventually(lambda: len(refused()) >= extra, "the handshakes beyond the bound refused", 10)
            early = refused()
        finally:
            os.kill(redis.proc.pid, signal.SIGCONT)
        answers = await asyncio.gather(*tasks)
        assert len([a for a in answers if a[0] == 503]) >= extra, answers
        assert all(a[0] in (101, 503) for a in answers), answers
        # Each answered well before the admitted ones' SUBSCRIBE could time out (3 s).
        assert max(t for _s, t in early) < 2.0, early

        # None of them holds anything: once Redis is back a new handshake is admitted and served.
        async def closed() -> bool:
            return await metric(http, instance, "notifier_connections") == 0

        await eventually(closed, "every socket closed", 30)
        token = mint_token("after", ("subscribe", "publish"))
        async with ws_connect(ws_url(instance.url, token, ["news"])) as ws:
            assert (await hello(ws))["type"] == "hello"
            await post(http, instance.url, token, "news", {"n": 1})
            assert (await next_frame(ws))["data"] == {"n": 1}
