"""Publishing one data to many topics in one request (contract v2): ``POST /v1/notifications``
with ``{"topics": [...], "data": ...}``.

In-process (TestClient, memory broker): the answer's shape and order, ids increasing in the order
given, the validation matrix (422, 403, 413) with nothing published, idempotent retries after a
failure part way. On real processes (redis-server, ``notifier serve``): 1000 users' topics in one
POST, each received by its subscriber exactly once; a POST cut short by a slow Redis link (503,
some accepted) retried through another instance with the same key: the whole list answered, each
subscriber served once. Absence is proven with a marker published after, never with a sleep.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Iterator
from contextlib import AsyncExitStack, contextmanager
from typing import Any

import httpx
import pytest
from conftest import SECRET, Mint, make_settings, mint_token
from fastapi.testclient import TestClient
from redis.asyncio import Redis
from starlette.testclient import WebSocketTestSession
from support import Instance, RedisServer, SlowLink, recv
from test_faults import hello, next_frame, redis_running, running, ws_connect, ws_url

from notifier.app import create_app
from notifier.broker_memory import MemoryBroker
from notifier.errors import BrokerUnavailable
from notifier.protocol import Accepted

URL = "/v1/notifications"
PUBLISHED = "notifier_notifications_published_total"
Json = dict[str, Any]


def auth(token: str, key: str | None = None) -> dict[str, str]:
    headers = {"Authorization": f"Bearer {token}"}
    if key is not None:
        headers["Idempotency-Key"] = key
    return headers


@contextmanager
def subscriber(client: TestClient, token: str, topics: list[str]) -> Iterator[WebSocketTestSession]:
    with client.websocket_connect(f"/v1/ws?token={token}&topics={','.join(topics)}") as ws:
        assert recv(ws)["type"] == "hello"
        yield ws


def frames_until(ws: WebSocketTestSession, marker_id: str) -> list[Json]:
    """Every notification frame up to the one with ``marker_id`` (excluded)."""
    frames = []
    while (frame := recv(ws))["id"] != marker_id:
        frames.append(frame)
    return frames


def marker(client: TestClient, token: str, topic: str) -> str:
    answer = client.post(URL, json={"topic": topic, "data": "marker"}, headers=auth(token))
    assert answer.status_code == 202
    marker_id: str = answer.json()["id"]
    return marker_id


def metric(client: TestClient, name: str) -> float:
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise KeyError(name)


# -- the answer ----------------------------------------------------------------------------------


def test_many_topics_are_answered_in_the_order_given_with_increasing_ids(
    client: TestClient, mint: Mint
) -> None:
    token = mint()
    topics = ["zeta", "alpha", "user:bob", "broadcast", "m.1"]
    with subscriber(client, token, ["alpha", "m.1"]) as ws:
        before = int(time.time() * 1000)
        response = client.post(URL, json={"topics": topics, "data": {"k": [1, None]}}, headers=auth(token))
        assert response.status_code == 202
        answers = response.json()["notifications"]
        assert set(response.json()) == {"notifications"}
        assert [set(a) for a in answers] == [{"id", "topic", "ts"}] * len(topics)
        assert [a["topic"] for a in answers] == topics
        ids = [int(a["id"]) for a in answers]
        assert all(a < b for a, b in zip(ids, ids[1:], strict=False))
        assert len({a["ts"] for a in answers}) == 1 and before <= answers[0]["ts"] <= time.time() * 1000
        later = client.post(URL, json={"topic": "alpha", "data": 0}, headers=auth(token)).json()
        assert int(later["id"]) > ids[-1]
        # alice's own socket: broadcast and user:alice are automatic, user:bob is not hers.
        frames = frames_until(ws, later["id"])
    by_topic = {a["topic"]: a for a in answers}
    assert [(f["topic"], f["id"], f["ts"], f["data"]) for f in frames] == [
        (t, by_topic[t]["id"], by_topic[t]["ts"], {"k": [1, None]}) for t in ("alpha", "broadcast", "m.1")
    ]


def test_one_topic_in_a_list_is_still_a_list_and_the_single_form_is_unchanged(
    client: TestClient, mint: Mint
) -> None:
    token = mint()
    many = client.post(URL, json={"topics": ["news"], "data": None}, headers=auth(token))
    single = client.post(URL, json={"topic": "news", "data": None}, headers=auth(token))
    assert many.status_code == single.status_code == 202
    assert [set(a) for a in many.json()["notifications"]] == [{"id", "topic", "ts"}]
    assert set(single.json()) == {"id", "topic", "ts"}


def test_each_newly_accepted_notification_is_counted_once(client: TestClient, mint: Mint) -> None:
    token = mint()
    before = metric(client, PUBLISHED)
    body = {"topics": [f"c{i}" for i in range(7)], "data": 1}
    assert client.post(URL, json=body, headers=auth(token, "count")).status_code == 202
    assert client.post(URL, json=body, headers=auth(token, "count")).status_code == 202  # repeated
    body["topics"] = [*body["topics"], "c7", "c8"]
    assert client.post(URL, json=body, headers=auth(token, "count")).status_code == 202  # 2 new
    assert metric(client, PUBLISHED) - before == 9


# -- refused, nothing published ------------------------------------------------------------------

BAD_BODIES: list[tuple[str, Any]] = [
    ("empty list", {"topics": [], "data": 1}),
    ("over 1000", {"topics": [f"t{i}" for i in range(1001)], "data": 1}),
    ("repeated topic", {"topics": ["news", "other", "news"], "data": 1}),
    ("bad name", {"topics": ["news", "no spaces"], "data": 1}),
    ("name over 128", {"topics": ["news", "x" * 129], "data": 1}),
    ("number in list", {"topics": ["news", 7], "data": 1}),
    ("null in list", {"topics": ["news", None], "data": 1}),
    ("not a list", {"topics": "news", "data": 1}),
    ("object", {"topics": {"news": 1}, "data": 1}),
    ("null topics", {"topics": None, "data": 1}),
    ("topic and topics", {"topic": "news", "topics": ["news"], "data": 1}),
    ("missing data", {"topics": ["news"]}),
    ("data too deep", {"topics": ["news"], "data": "DEEP"}),
]


@pytest.mark.parametrize(("case", "body"), BAD_BODIES, ids=[case for case, _ in BAD_BODIES])
def test_a_bad_list_is_422_and_publishes_nothing(
    client: TestClient, mint: Mint, case: str, body: Any
) -> None:
    token = mint()
    content = json.dumps(body)
    if body.get("data") == "DEEP":  # valid JSON, nested too deeply to be encoded again
        content = content.replace('"DEEP"', "[" * 300 + "]" * 300)
    with subscriber(client, mint(sub="reader"), ["news"]) as ws:
        response = client.post(
            URL, content=content, headers={**auth(token), "content-type": "application/json"}
        )
        assert response.status_code == 422, (case, response.text)
        assert set(response.json()) == {"detail"}
        marker_id = marker(client, token, "news")
        assert frames_until(ws, marker_id) == []


def test_a_list_with_one_forbidden_topic_is_403_and_publishes_nothing(client: TestClient, mint: Mint) -> None:
    publisher = mint(sub="svc", scopes=("publish",), topics=["room:*"])
    with subscriber(client, mint(sub="reader"), ["room:1", "room:2"]) as ws:
        response = client.post(
            URL, json={"topics": ["room:1", "news", "room:2"], "data": 1}, headers=auth(publisher)
        )
        assert response.status_code == 403
        assert "news" in response.json()["detail"]
        allowed = client.post(URL, json={"topics": ["room:2", "room:1"], "data": 2}, headers=auth(publisher))
        assert allowed.status_code == 202
        first, second = recv(ws), recv(ws)
    assert [(f["topic"], f["data"]) for f in (first, second)] == [("room:2", 2), ("room:1", 2)]


def test_1000_topics_of_128_characters_are_over_the_body_limit_413(client: TestClient, mint: Mint) -> None:
    topics = [f"{i:04d}" + "x" * 124 for i in range(1000)]
    response = client.post(URL, json={"topics": topics, "data": 1}, headers=auth(mint()))
    assert response.status_code == 413


def test_1000_short_topics_are_accepted_and_1001_refused(client: TestClient, mint: Mint) -> None:
    token = mint()
    topics = [f"user:{i}" for i in range(1001)]
    assert client.post(URL, json={"topics": topics, "data": 1}, headers=auth(token)).status_code == 422
    accepted = client.post(URL, json={"topics": topics[:1000], "data": 1}, headers=auth(token))
    assert accepted.status_code == 202
    assert [a["topic"] for a in accepted.json()["notifications"]] == topics[:1000]


# -- idempotency, and a failure part way -----------------------------------------------------------


def test_a_repeated_key_answers_the_whole_list_again_and_delivers_nothing_twice(
    client: TestClient, mint: Mint
) -> None:
    token = mint(sub="backend")
    with subscriber(client, mint(sub="reader"), ["a", "b", "c"]) as ws:
        first = client.post(URL, json={"topics": ["a", "b"], "data": 1}, headers=auth(token, "k"))
        again = client.post(URL, json={"topics": ["a", "b"], "data": 2}, headers=auth(token, "k"))
        assert first.status_code == again.status_code == 202
        assert again.json() == first.json()
        # A wider list under the same key: only the new topic is published.
        wider = client.post(URL, json={"topics": ["c", "a", "b"], "data": 3}, headers=auth(token, "k")).json()
        assert wider["notifications"][1:] == first.json()["notifications"]
        marker_id = marker(client, token, "a")
        frames = frames_until(ws, marker_id)
    assert sorted((f["topic"], f["data"]) for f in frames) == [("a", 1), ("b", 1), ("c", 3)]


class BreaksPartWay(MemoryBroker):
    """The memory broker, whose publish to many topics accepts ``accept`` of them and then fails
    as a broker lost mid-request does (the accepted ones remembered under their keys)."""

    def __init__(self, accept: int) -> None:
        super().__init__()
        self.accept = accept

    async def publish_many(
        self, topics: list[str], data_json: bytes, ts: int, idempotency_key: str | None = None
    ) -> list[Accepted]:
        if self.accept >= len(topics):
            return await super().publish_many(topics, data_json, ts, idempotency_key)
        await super().publish_many(topics[: self.accept], data_json, ts, idempotency_key)
        raise BrokerUnavailable("broker lost part way (test)")


def test_after_a_503_part_way_a_retry_with_the_key_publishes_the_rest_once(mint: Mint) -> None:
    broker = BreaksPartWay(accept=3)
    topics = [f"room:{i}" for i in range(8)]
    with TestClient(create_app(make_settings(), broker=broker)) as client:
        token = mint(sub="backend")
        with subscriber(client, mint(sub="reader"), topics) as ws:
            refused = client.post(URL, json={"topics": topics, "data": "x"}, headers=auth(token, "retry"))
            assert refused.status_code == 503
            assert "some may have been accepted" in refused.json()["detail"]
            broker.accept = len(topics)
            retried = client.post(URL, json={"topics": topics, "data": "x"}, headers=auth(token, "retry"))
            assert retried.status_code == 202
            answers = retried.json()["notifications"]
            marker_id = marker(client, token, "room:0")
            frames = frames_until(ws, marker_id)
    assert [a["topic"] for a in answers] == topics
    assert sorted((f["topic"], f["id"]) for f in frames) == sorted((a["topic"], a["id"]) for a in answers)
    ids = [int(a["id"]) for a in answers]
    assert all(a < b for a, b in zip(ids, ids[1:], strict=False))


def test_the_openapi_body_describes_both_forms(client: TestClient) -> None:
    body = client.get("/openapi.json").json()["paths"][URL]["post"]["requestBody"]["content"]
    schema = body["application/json"]["schema"]
    assert "topics" in str(schema) and "topic" in str(schema)
    many = next(form for form in schema["oneOf"] if "topics" in form["properties"])
    assert many["required"] == ["topics", "data"]
    assert (many["properties"]["topics"]["minItems"], many["properties"]["topics"]["maxItems"]) == (1, 1000)


# -- real processes ------------------------------------------------------------------------------


def env_for(url: str) -> dict[str, str]:
    return {"NOTIFIER_BROKER_URL": url, "NOTIFIER_JWT_SECRET": SECRET}


async def post_many(
    http: httpx.AsyncClient, url: str, token: str, topics: list[str], data: Any, key: str | None = None
) -> httpx.Response:
    return await http.post(url + URL, json={"topics": topics, "data": data}, headers=auth(token, key))


async def notifications_until(ws: Any, marker_id: str) -> list[Json]:
    """The notification frames a socket gets up to the broadcast marker ``marker_id``."""
    frames = []
    while (frame := await next_frame(ws))["id"] != marker_id:
        assert frame["type"] == "notification", frame
        frames.append(frame)
    return frames


async def instance_metric(http: httpx.AsyncClient, instance: Instance, name: str) -> float:
    for line in (await http.get(instance.url + "/metrics")).text.splitlines():
        if line.startswith(name + " "):
            return float(line.split()[-1])
    raise KeyError(name)


@pytest.mark.anyio
@pytest.mark.redis
@pytest.mark.slow
async def test_1000_users_in_one_post_each_subscriber_gets_its_notification_exactly_once() -> None:
    """Two instances on one redis-server; 300 users (``u0`` ... ``u299``) hold one socket each,
    half on each instance. One POST to instance A names the topics ``user:u0`` ... ``user:u999``.

    Arrived: 202 with the 1000 answers in order, ids increasing; every socket gets exactly one
    notification before the broadcast marker published after, its own, with the answered id;
    A's ``notifier_notifications_published_total`` grew by 1000. Redis's time per topic is printed.
    """
    redis = RedisServer()
    a, b = Instance(env_for(redis.url)), Instance(env_for(redis.url))
    publisher = mint_token("backend", scopes=("publish",))
    topics = [f"user:u{i}" for i in range(1000)]
    async with (
        redis_running(redis),
        running(a, b),
        httpx.AsyncClient(timeout=30, trust_env=False) as http,
        Redis(port=redis.port) as admin,
        AsyncExitStack() as sockets,
    ):

        async def connect(n: int) -> Any:
            ws = await sockets.enter_async_context(
                ws_connect(ws_url((a, b)[n % 2].url, mint_token(f"u{n}", scopes=("subscribe",))))
            )
            await hello(ws)
            return ws

        users = []
        for start in range(0, 300, 50):
            users += await asyncio.gather(*(connect(n) for n in range(start, start + 50)))
        published = await instance_metric(http, a, PUBLISHED)
        await admin.config_resetstat()
        response = await post_many(http, a.url, publisher, topics, {"text": "your report is ready"})
        stats = await admin.info("commandstats")
        assert response.status_code == 202, response.text
        answers = response.json()["notifications"]
        assert await instance_metric(http, a, PUBLISHED) - published == 1000
        mark = await http.post(
            a.url + URL, json={"topic": "broadcast", "data": "marker"}, headers=auth(publisher)
        )
        marker_id = mark.json()["id"]
        received = await asyncio.gather(*(notifications_until(ws, marker_id) for ws in users))
    assert [x["topic"] for x in answers] == topics
    ids = [int(x["id"]) for x in answers]
    assert all(x < y for x, y in zip(ids, ids[1:], strict=False))
    for n, frames in enumerate(received):
        assert [(f["topic"], f["id"], f["data"]) for f in frames] == [
            (f"user:u{n}", answers[n]["id"], {"text": "your report is ready"})
        ], n
    script = stats.get("cmdstat_evalsha") or stats.get("cmdstat_eval") or {}
    print(f"\n[1000 topics] redis script calls: {script}; usec per topic: {script.get('usec', 0) / 1000:.2f}")


@pytest.mark.anyio
@pytest.mark.redis
@pytest.mark.slow
async def test_a_post_cut_short_by_a_slow_redis_is_503_and_a_retry_elsewhere_completes_it_once() -> None:
    """Injected: instance A reaches Redis through a relay that holds every byte it sends 0.3 s
    (a congested link); instance B reaches Redis directly. 40 users hold a socket on B.

    Sent: one POST of 1000 topics (``user:v0`` ... ``user:v999``) to A, with an Idempotency-Key:
    its script calls go 100 topics at a time, each 0.3 s late, so the 2 s budget runs out part
    way: 503, some (not all) accepted (A's published counter says how many). The same POST, same
    key, to B: 202 with the whole list in order, B publishing exactly the rest.

    Arrived: every socket got its own notification exactly once, with the id of the answer.
    """
    redis = RedisServer()
    publisher = mint_token("backend", scopes=("publish",))
    topics = [f"user:v{i}" for i in range(1000)]
    sample = list(range(0, 1000, 25))
    async with redis_running(redis), SlowLink(redis.port, 0.3) as link, AsyncExitStack() as sockets:
        a, b = Instance(env_for(link.url)), Instance(env_for(redis.url))
        async with running(a, b), httpx.AsyncClient(timeout=30, trust_env=False) as http:
            users = []
            for n in sample:
                ws = await sockets.enter_async_context(
                    ws_connect(ws_url(b.url, mint_token(f"v{n}", scopes=("subscribe",))))
                )
                await hello(ws)
                users.append(ws)
            started = time.monotonic()
            cut = await post_many(http, a.url, publisher, topics, "once", key="report-7")
            refused_in = time.monotonic() - started
            assert cut.status_code == 503, cut.text
            assert refused_in < 3.5
            accepted_by_a = await instance_metric(http, a, PUBLISHED)
            before_b = await instance_metric(http, b, PUBLISHED)
            retried = await post_many(http, b.url, publisher, topics, "once", key="report-7")
            assert retried.status_code == 202, retried.text
            accepted_by_b = await instance_metric(http, b, PUBLISHED) - before_b
            answers = retried.json()["notifications"]
            mark = await http.post(
                b.url + URL, json={"topic": "broadcast", "data": "m"}, headers=auth(publisher)
            )
            marker_id = mark.json()["id"]
            received = await asyncio.gather(*(notifications_until(ws, marker_id) for ws in users))
    print(
        f"\n[cut short] 503 after {refused_in:.2f}s with {accepted_by_a:.0f} accepted; "
        f"the retry published {accepted_by_b:.0f}"
    )
    assert 0 < accepted_by_a < 1000
    assert accepted_by_a + accepted_by_b == 1000
    assert [x["topic"] for x in answers] == topics
    ids = [int(x["id"]) for x in answers]
    assert all(x < y for x, y in zip(ids, ids[1:], strict=False))
    for n, frames in zip(sample, received, strict=True):
        assert [(f["topic"], f["id"]) for f in frames] == [(f"user:v{n}", answers[n]["id"])], n
