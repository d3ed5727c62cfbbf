"""The Redis broker on a real Redis Cluster (``redis+cluster://``): three masters with a replica
each. Two brokers stand for two instances; topics are picked so that every shard holds some.

The conformance suite runs on the cluster too (tests/test_broker_conformance.py, ``cluster``);
this module covers what only a cluster has: per-topic ids and positions, a shard's failover
(``CLUSTER FAILOVER``, and a master killed) while publishing, and a slot migration while
publishing.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, cast

import anyio
import httpx
import pytest
from conftest import SECRET, mint_token
from support import Instance
from support_cluster import ClusterSet, ask
from test_broker_conformance import Inbox, encoded, now_ms, running
from test_faults import Publisher, eventually
from test_faults import running as instances_running
from test_hardening import Follower

from notifier.broker import CONTROL_TOPIC, create_broker
from notifier.broker_cluster import ClusterBroker
from notifier.errors import BrokerUnavailable
from notifier.protocol import Accepted
from notifier.redis_cluster import parse_cluster_url
from notifier.settings import ConfigError, load_settings

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.slow]


def lost_topics(inbox: Inbox) -> set[str]:
    """Every topic named lost to on_resync so far (its sockets got 1012)."""
    return {t for batch in inbox.resyncs for t in batch}


def last_is(inbox: Inbox, topic: str, id_: int) -> bool:
    return [n.id for n in inbox.of(topic)][-1:] == [id_]


@pytest.fixture(scope="module")
def cluster() -> Iterator[ClusterSet]:
    cluster = ClusterSet()
    try:
        yield cluster.start()
    finally:
        cluster.stop()


def topics_per_shard(cluster: ClusterSet, per_shard: int) -> dict[int, list[str]]:
    """``per_shard`` fresh topics for each master (by port)."""
    found: dict[int, list[str]] = {port: [] for port in cluster.masters()}
    while any(len(v) < per_shard for v in found.values()):
        topic = f"c-{uuid.uuid4().hex[:10]}"
        owner = cluster.owner(f"notifier:{{{topic}}}")
        if len(found[owner]) < per_shard:
            found[owner].append(topic)
    return found


def test_the_url_names_seed_nodes_and_nothing_else() -> None:
    parsed = parse_cluster_url("redis+cluster://:s%40cret@10.0.0.1:7000,[::1]:7001")
    assert parsed.nodes == (("10.0.0.1", 7000), ("::1", 7001)) and parsed.password == "s@cret"
    for bad in ("redis+cluster://h", "redis+cluster://h:1/0", "redis+cluster://h:1?x=1", "redis://h:1"):
        with pytest.raises(ValueError):
            parse_cluster_url(bad)


def test_settings_take_a_cluster_url_and_refuse_a_bad_one_with_one_line() -> None:
    assert load_settings(broker_url="redis+cluster://h:1,h:2", _env_file=None).broker_url == "redis+cluster://h:1,h:2"
    with pytest.raises(ConfigError) as refused:
        load_settings(broker_url="redis+cluster://h:1/0", _env_file=None)
    line = str(refused.value)
    assert line.startswith("NOTIFIER_BROKER_URL: ") and "no path" in line and "\n" not in line
    assert isinstance(create_broker("redis+cluster://127.0.0.1:1"), ClusterBroker)


async def test_topics_on_every_shard_reach_the_other_instance_with_their_keys_in_one_slot(
    cluster: ClusterSet,
) -> None:
    shards = topics_per_shard(cluster, 2)
    topics = [t for ts in shards.values() for t in ts]
    one, two = ClusterBroker(cluster.url), ClusterBroker(cluster.url)
    async with running(one), running(two) as inbox:
        for topic in topics:
            await two.subscribe(topic)
        sent = {t: [await one.publish(t, encoded(i), now_ms()) for i in range(5)] for t in topics}
        many = await one.publish_many(topics, encoded("all"), now_ms())
        for topic in topics:
            got = await inbox.wait_count(topic, 6)
            assert [n.id for n in got] == [a.id for a in sent[topic]] + [many[topics.index(topic)].id]
    # Every key of a topic is in the topic's slot (the publish script touched one slot only), on
    # the shard that delivered it; nothing went to the other shards.
    for port, mine in shards.items():
        keys = set(ask(port, "KEYS", "notifier:{c-*"))
        for topic in mine:
            assert {f"notifier:{{{topic}}}:{k}" for k in ("seq", "epoch", "history", "master")} <= keys
        others = [t for p, ts in shards.items() if p != port for t in ts]
        assert not any(k.startswith(f"notifier:{{{t}}}") for t in others for k in keys)


async def test_recovery_with_per_topic_positions(cluster: ClusterSet) -> None:
    shards = topics_per_shard(cluster, 1)
    topics = [ts[0] for ts in shards.values()]
    broker = ClusterBroker(cluster.url)
    async with running(broker):
        sent = {t: [(await broker.publish(t, encoded(i), now_ms())).id for i in range(6)] for t in topics}
        for topic in topics:
            ids = sent[topic]
            kept = await broker.history(topic, ids[2], 100)  # this topic's own position
            assert kept.complete and [n.id for n in kept.notifications] == ids[3:]
            assert (await broker.history(topic, 0, 100)).complete
            # Another topic's id is no position for this one: ids are per topic.
            everything = await broker.history(topic, None, 100)
            assert [n.id for n in everything.notifications] == ids


async def test_a_shard_failover_leaves_the_other_shards_alone_and_loses_nothing_silently(
    cluster: ClusterSet,
) -> None:
    shards = topics_per_shard(cluster, 2)
    victim = sorted(shards)[0]
    failing = shards[victim]
    others = [t for port, ts in shards.items() if port != victim for t in ts]
    publisher, listener = ClusterBroker(cluster.url), ClusterBroker(cluster.url)
    async with running(publisher), running(listener) as inbox:
        for topic in [*failing, *others]:
            await listener.subscribe(topic)
        accepted: dict[str, list[Accepted]] = {t: [] for t in [*failing, *others]}
        refused_since: dict[str, float | None] = dict.fromkeys(accepted)
        longest_refusal = dict.fromkeys(accepted, 0.0)
        late: list[tuple[str, float]] = []
        stop = asyncio.Event()

        async def publish_to(topic: str) -> None:
            i = 0
            while not stop.is_set():
                try:
                    answer = await publisher.publish(topic, encoded(i), now_ms())
                    sent_at = time.monotonic()
                    accepted[topic].append(answer)
                    refused_since[topic] = None
                    if topic in others:
                        asyncio.get_running_loop().create_task(arrives(topic, answer.id, sent_at))
                except BrokerUnavailable:
                    since = refused_since[topic] or time.monotonic()
                    refused_since[topic] = since
                    longest_refusal[topic] = max(longest_refusal[topic], time.monotonic() - since)
                i += 1
                await asyncio.sleep(0.02)

        async def arrives(topic: str, id_: int, sent_at: float) -> None:
            with anyio.move_on_after(5):
                await inbox.wait_for(lambda: any(n.id == id_ for n in inbox.of(topic)), "delivery", 5)
                return
            late.append((topic, time.monotonic() - sent_at))

        tasks = [asyncio.create_task(publish_to(t)) for t in accepted]
        await asyncio.sleep(1)
        await anyio.to_thread.run_sync(cluster.failover, victim)
        await asyncio.sleep(3)  # keep publishing on the new master
        stop.set()
        await asyncio.gather(*tasks)
        # Every socket on the failed shard's topics gets what was published meanwhile, in
        # order, or is told (named lost to on_resync: 1012).
        for topic in failing:
            await inbox.wait_for(
                lambda t=topic: t in lost_topics(inbox) or last_is(inbox, t, accepted[t][-1].id),
                f"the rest of {topic} or its 1012",
            )
        lost = lost_topics(inbox)
        for topic in failing:
            if topic not in lost:
                assert [n.id for n in inbox.of(topic)] == [a.id for a in accepted[topic]]
        # The other shards' topics: untouched, everything in order, nothing refused for long.
        for topic in others:
            await inbox.wait_count(topic, len(accepted[topic]))
            assert [n.id for n in inbox.of(topic)] == [a.id for a in accepted[topic]]
            assert longest_refusal[topic] <= 5.0, (topic, longest_refusal[topic])
        assert not lost & set(others)
        assert not late, late
        assert all(len(v) > 10 for v in accepted.values())
        # A recovery on a failed-over topic from before the failover is never a dishonest true.
        for topic in failing:
            first = accepted[topic][0].id
            assert not (await listener.history(topic, first, 1000)).complete


async def test_a_slot_migration_while_publishing_moves_the_topic_without_a_silent_gap(
    cluster: ClusterSet,
) -> None:
    shards = topics_per_shard(cluster, 1)
    source, target = sorted(shards)[:2]
    topic = shards[source][0]
    slot = int(ask(source, "CLUSTER", "KEYSLOT", f"notifier:{{{topic}}}"))
    publisher, listener = ClusterBroker(cluster.url), ClusterBroker(cluster.url)
    async with running(publisher), running(listener) as inbox:
        await listener.subscribe(topic)
        accepted: list[Accepted] = []
        stop = asyncio.Event()

        async def publish() -> None:
            i = 0
            while not stop.is_set():
                try:
                    accepted.append(await publisher.publish(topic, encoded(i), now_ms()))
                except BrokerUnavailable:
                    pass
                i += 1
                await asyncio.sleep(0.01)

        task = asyncio.create_task(publish())
        await asyncio.sleep(0.5)
        await anyio.to_thread.run_sync(migrate, cluster, slot, source, target)
        await asyncio.sleep(1.5)
        stop.set()
        await task
        assert cluster.owner(f"notifier:{{{topic}}}") == target
        await inbox.wait_for(
            lambda: topic in lost_topics(inbox) or last_is(inbox, topic, accepted[-1].id),
            "the rest of the topic or its 1012",
        )
        if topic not in lost_topics(inbox):
            assert [n.id for n in inbox.of(topic)] == [a.id for a in accepted]
        ids = [a.id for a in accepted]
        assert ids == sorted(set(ids))  # strictly increasing across the move


def migrate(cluster: ClusterSet, slot: int, source: int, target: int) -> None:
    """Move ``slot`` from ``source`` to ``target``: SETSLOT IMPORTING/MIGRATING, MIGRATE the
    keys, SETSLOT NODE on both (the documented manual procedure)."""
    source_id, target_id = ask(source, "CLUSTER", "MYID"), ask(target, "CLUSTER", "MYID")
    ask(target, "CLUSTER", "SETSLOT", slot, "IMPORTING", source_id)
    ask(source, "CLUSTER", "SETSLOT", slot, "MIGRATING", target_id)
    while True:
        keys = ask(source, "CLUSTER", "GETKEYSINSLOT", slot, 100)
        if not keys:
            break
        ask(source, "MIGRATE", "127.0.0.1", target, "", 0, 5000, "KEYS", *keys)
    ask(target, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
    ask(source, "CLUSTER", "SETSLOT", slot, "NODE", target_id)
    for port in cluster.masters():
        if port not in (source, target):
            ask(port, "CLUSTER", "SETSLOT", slot, "NODE", target_id)


async def test_rejections_and_the_control_topic_work_across_instances(cluster: ClusterSet) -> None:
    one, two = ClusterBroker(cluster.url), ClusterBroker(cluster.url)
    async with running(one), running(two) as inbox:
        until = int(time.time()) + 60
        await one.reject("alice", 123, until)
        assert (await two.rejections())["alice"] == (123, until)
        sent = await one.publish("$control", b'{"type":"disconnect","sub":"alice"}', now_ms())
        await inbox.wait_for(lambda: any(n.id == sent.id for n in inbox.of("$control")), "control")


async def test_two_instances_a_shard_failover_under_posts_other_shards_untouched_nothing_lost(
    cluster: ClusterSet,
) -> None:
    """Injected: ``CLUSTER FAILOVER`` of one shard while a publisher POSTs every 20 ms to one
    topic per shard through instance A, and a follower per topic reads it through instance B.

    Arrived: the other shards' followers keep their socket (no 1012) and get every accepted id in
    order, and their POSTs are never refused; the failed-over shard's follower ends with every
    accepted id exactly once, in order (filled in, or after a 1012 a reconnect with ``since``
    that says ``recovered: false``: the cluster cannot vouch for the gap).
    """
    shards = topics_per_shard(cluster, 1)
    # Every socket also holds ``broadcast`` and ``user:<sub>``: a shard holding one of those would
    # touch every follower. So the victim is another shard, and each follower's user topic is on
    # its own topic's shard.
    victim = next(p for p in sorted(shards) if p != cluster.owner("notifier:{broadcast}"))
    subs: dict[int, str] = {}
    while len(subs) < len(shards):
        sub = f"f-{uuid.uuid4().hex[:8]}"
        subs.setdefault(cluster.owner(f"notifier:{{user:{sub}}}"), sub)
    env = {"NOTIFIER_BROKER_URL": cluster.url, "NOTIFIER_JWT_SECRET": SECRET}
    a, b = Instance(env), Instance(env)
    async with instances_running(a, b), httpx.AsyncClient(timeout=60, trust_env=False) as http:
        followers = {
            port: Follower(b, mint_token(subs[port], ("subscribe",)), ts[0]) for port, ts in shards.items()
        }
        readers = [asyncio.create_task(f.run()) for f in followers.values()]
        try:
            for f in followers.values():
                await eventually(f.ready.is_set, "a follower's hello", 20, readers)
            publishers = {
                port: Publisher(http, a.url, ts[0], frozenset({503}), pace=0.02, limit=5000, patience=40)
                for port, ts in shards.items()
            }
            writers = [p.start() for p in publishers.values()]
            posted = lambda: all(len(p.accepted) >= 30 for p in publishers.values())  # noqa: E731
            await eventually(posted, "30 posts per topic", 30, writers)
            started = time.monotonic()
            await asyncio.to_thread(cluster.failover, victim)
            took = time.monotonic() - started
            counts = {port: len(p.accepted) for port, p in publishers.items()}
            await eventually(
                lambda: all(len(p.accepted) >= counts[port] + 50 for port, p in publishers.items()),
                "50 more posts on every shard", 30, writers,
            )  # fmt: skip
            accepted = {port: await p.finish() for port, p in publishers.items()}
            for port, follower in followers.items():
                got = lambda f=follower, p=port: f.ids[-1:] == accepted[p][-1:]  # noqa: E731
                await eventually(got, "the last notification", 30, readers)
        finally:
            for reader in readers:
                reader.cancel()
            await asyncio.gather(*readers, return_exceptions=True)
    print(
        f"\n[cluster failover] shard {victim} failed over in {took:.2f} s; refusals "
        f"{ {port: dict(p.refusals) for port, p in publishers.items()} }; 1012 reconnects "
        f"{ {port: f.restarts for port, f in followers.items()} }"
    )
    for port, follower in followers.items():
        assert accepted[port] == sorted(set(accepted[port]))
        assert follower.ids == accepted[port]
        if port != victim:
            # Other shards: no 1012; POSTs refused at most ~5 s in a row (Redis's own CLUSTERDOWN
            # window while the cluster promotes; each refusal is retried after 0.1 s).
            assert follower.restarts == [], port
            assert sum(publishers[port].refusals.values()) < 50, publishers[port].refusals
        else:
            assert follower.restarts in ([], [False])


async def test_a_killed_shard_link_is_rebuilt_and_its_topics_filled_in_order_the_others_untouched(
    cluster: ClusterSet,
) -> None:
    """Injected: ``CLIENT KILL TYPE pubsub`` on one master (its links drop; no failover) while
    publishing to two topics per shard. Arrived: that shard's topics are filled from history, in
    order, each id once, nothing named lost (the master did not change); the other shards'
    links never dropped."""
    shards = topics_per_shard(cluster, 2)
    victim = sorted(shards)[0]
    topics = [t for ts in shards.values() for t in ts]
    publisher, listener = ClusterBroker(cluster.url), ClusterBroker(cluster.url)
    async with running(publisher), running(listener) as inbox:
        for topic in topics:
            await listener.subscribe(topic)
        accepted: dict[str, list[int]] = {t: [] for t in topics}
        for round_ in range(30):
            if round_ == 10:
                assert await asyncio.to_thread(ask, victim, "CLIENT", "KILL", "TYPE", "pubsub") >= 1
            for topic in topics:
                accepted[topic].append((await publisher.publish(topic, encoded(round_), now_ms())).id)
            await asyncio.sleep(0.01)
        for topic in topics:
            await inbox.wait_for(lambda t=topic: last_is(inbox, t, accepted[t][-1]), f"all of {topic}")
            assert [n.id for n in inbox.of(topic)] == accepted[topic]
        # The control topic, never published here, may be named: on a cluster a topic with no
        # history cannot vouch for a gap (conservative; no socket is on it).
        assert lost_topics(inbox) - {CONTROL_TOPIC} == set()
        assert inbox.resyncs  # the victim's link was rebuilt and reported


class TimedPublisher(Publisher):
    """A Publisher that also notes when each id was accepted, and for each POST that was refused
    at least once the moment of its first attempt and the seconds until it was accepted."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.why: Counter[str] = Counter()  # the refusals' reasons (their bodies' details)
        post = self.http.post

        async def noted(*a: Any, **kw: Any) -> httpx.Response:
            response = await post(*a, **kw)
            if response.status_code != 202:
                self.why[str(response.json().get("detail", response.text))[:160]] += 1
            return response

        self.http = cast(httpx.AsyncClient, SimpleNamespace(post=noted))
        self.accepted_at: dict[int, float] = {}
        self.refused: list[tuple[float, float]] = []  # (first attempt, seconds until accepted)
        self.slowest = 0.0  # the longest any one POST took, first attempt to 202

    async def _post_until_accepted(self, n: int) -> int:
        started, before = time.monotonic(), sum(self.refusals.values())
        id_ = await super()._post_until_accepted(n)
        self.accepted_at[id_] = now = time.monotonic()
        self.slowest = max(self.slowest, now - started)
        if sum(self.refusals.values()) > before:
            self.refused.append((started, now - started))
        return id_


class TimedIds(list[int]):
    """A follower's ids, noting when each first arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.at: dict[int, float] = {}

    def append(self, id_: int) -> None:
        self.at.setdefault(id_, time.monotonic())
        super().append(id_)


async def test_a_killed_shard_master_under_posts_is_replaced_within_30s_other_shards_untouched_nothing_lost(
    cluster: ClusterSet,
) -> None:
    """Injected: SIGKILL of one shard's master (no coordination: the cluster promotes its replica
    after ``cluster-node-timeout``) while a publisher POSTs every 20 ms to one topic per shard
    through instance A, and a follower per topic reads it through instance B.

    Arrived: the killed shard's topic takes POSTs again, and both /readyz answer 200, within 30 s
    of the kill; the other shards' POSTs are never refused (nor held) more than 5 s in a row,
    their followers keep their socket (no 1012) and get each id within 5 s of its 202; every
    follower ends with every accepted id exactly once, in order; ids per topic increase.
    """
    shards = topics_per_shard(cluster, 1)
    victim = next(p for p in sorted(shards) if p != cluster.owner("notifier:{broadcast}"))
    subs: dict[int, str] = {}
    while len(subs) < len(shards):
        sub = f"f-{uuid.uuid4().hex[:8]}"
        subs.setdefault(cluster.owner(f"notifier:{{user:{sub}}}"), sub)
    env = {"NOTIFIER_BROKER_URL": cluster.url, "NOTIFIER_JWT_SECRET": SECRET}
    a, b = Instance(env), Instance(env)
    readiness: list[tuple[float, bool]] = []  # (when, both /readyz 200)
    try:
        async with instances_running(a, b), httpx.AsyncClient(timeout=60, trust_env=False) as http:

            async def watch_readiness() -> None:
                while True:
                    try:
                        answers = [await http.get(i.url + "/readyz", timeout=2) for i in (a, b)]
                        both = all(r.status_code == 200 for r in answers)
                    except httpx.HTTPError:
                        both = False
                    readiness.append((time.monotonic(), both))
                    await asyncio.sleep(0.1)

            followers = {
                port: Follower(b, mint_token(subs[port], ("subscribe",)), ts[0])
                for port, ts in shards.items()
            }
            for f in followers.values():
                f.ids = TimedIds()
            readers = [asyncio.create_task(f.run()) for f in followers.values()]
            watcher = asyncio.create_task(watch_readiness())
            try:
                for f in followers.values():
                    await eventually(f.ready.is_set, "a follower's hello", 20, readers)
                publishers = {
                    port: TimedPublisher(
                        http, a.url, ts[0], frozenset({503}), pace=0.02, limit=5000, patience=40
                    )
                    for port, ts in shards.items()
                }
                writers = [p.start() for p in publishers.values()]
                posted = lambda: all(len(p.accepted) >= 30 for p in publishers.values())  # noqa: E731
                await eventually(posted, "30 posts per topic", 30, writers)
                killed = time.monotonic()
                _replica, promoted = await asyncio.to_thread(cluster.kill_master, victim)
                counts = {port: len(p.accepted) for port, p in publishers.items()}
                await eventually(
                    lambda: all(len(p.accepted) >= counts[port] + 50 for port, p in publishers.items()),
                    "50 more posts on every shard after the promotion", 30, writers,
                )  # fmt: skip
                await eventually(
                    lambda: readiness[-1][0] > killed and readiness[-1][1], "both /readyz 200", 30, [watcher]
                )
                accepted = {port: await p.finish() for port, p in publishers.items()}
                for port, follower in followers.items():
                    got = lambda f=follower, p=port: f.ids[-1:] == accepted[p][-1:]  # noqa: E731
                    await eventually(got, "the last notification", 30, readers)
            finally:
                for task in [*readers, watcher]:
                    task.cancel()
                await asyncio.gather(*readers, watcher, return_exceptions=True)
    finally:
        if cluster.procs[victim].poll() is not None:
            await asyncio.to_thread(cluster.restart, victim)  # the module's cluster, whole again

    # When the killed shard's topic took POSTs again: the end of its last refusal after the kill.
    back = max((s + d for s, d in publishers[victim].refused if s + d > killed), default=killed) - killed
    not_ready = [t for t, both in readiness if t > killed and not both]
    ready = (max(not_ready) - killed + 0.1) if not_ready else 0.0
    late = {
        port: max((f.ids.at[i] - publishers[port].accepted_at[i] for i in f.ids), default=0.0)  # type: ignore[attr-defined]
        for port, f in followers.items()
    }
    print(
        f"\n[cluster kill] shard {victim}: replica promoted {promoted:.2f} s after the SIGKILL; its "
        f"POSTs accepted again after {back:.2f} s; both /readyz 200 after {ready:.2f} s "
        f"(not 200 for {len(not_ready)} polls); refusals "
        f"{ {port: dict(p.refusals) for port, p in publishers.items()} }; slowest POST "
        f"{ {port: round(p.slowest, 2) for port, p in publishers.items()} }; latest delivery "
        f"{ {port: round(s, 2) for port, s in late.items()} }; 1012 reconnects "
        f"{ {port: f.restarts for port, f in followers.items()} }; accepted "
        f"{ {port: len(ids) for port, ids in accepted.items()} }; refused (from s after the kill, for s) "
        f"{ {port: [(round(s - killed, 2), round(d, 2)) for s, d in p.refused] for port, p in publishers.items()} }"  # noqa: E501
        f"; why {[dict(p.why) for p in publishers.values()]}"
    )
    assert back <= 30 and ready <= 30, (back, ready)
    for port, follower in followers.items():
        assert accepted[port] == sorted(set(accepted[port]))
        missing = sorted(set(accepted[port]) - set(follower.ids))
        assert follower.ids == accepted[port], (port, missing, b.output()[-4000:])
        if port != victim:
            assert follower.restarts == [], b.output()[-4000:]
            assert publishers[port].slowest <= 5.0, (port, publishers[port].refused, a.output()[-4000:])
            assert late[port] <= 5.0, (port, late[port])
