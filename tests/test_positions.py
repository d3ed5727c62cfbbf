"""Per-topic positions in recovery: ``since=<topic>:<id>,...`` on the handshake and
``"since": {"<topic>": "<id>"}`` in a subscribe frame, on the server and in the shipped clients.

A topic without a position is subscribed live, without recovery (automatic topics included);
positions of topics not in the request are ignored; one id and positions cannot be mixed;
``recovered`` is true only when nothing after its position was lost for any recovered topic.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlsplit

import httpx
import pytest
from conftest import SECRET, Mint, make_settings, mint_token
from fastapi.testclient import TestClient
from support import ROOT, Instance, RedisServer, hello, memory_instance, next_frame, notification, recv
from test_client import cli, cli_env, command, one_error_line
from test_ws import app_client, ask, connect, expect_nothing, post, refusal, ws_url
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import InvalidStatus

import notifier.client
from notifier.app import create_app
from notifier.client import Client, Subscription
from notifier.protocol import BadFrame, parse_positions, since_from_json

Frame = dict[str, Any]
DEADLINE = 15.0


def positions(**ids: str) -> str:
    """A query ``since`` of per-topic positions; ``__`` in a keyword stands for ``:``."""
    return ",".join(f"{topic.replace('__', ':')}:{id_}" for topic, id_ in ids.items())


def read_until(ws: Any, marker: Frame) -> list[Frame]:
    """TestClient frames up to and including the notification answered with ``marker``."""
    frames: list[Frame] = []
    while not frames or frames[-1].get("id") != marker["id"]:
        frames.append(recv(ws))
    return frames


# -- parsing ------------------------------------------------------------------------------------


def test_a_query_since_is_one_id_or_per_topic_positions_split_at_the_last_colon() -> None:
    assert parse_positions(None, 8) is None
    assert parse_positions("0", 8) == 0
    assert parse_positions("42", 8) == 42
    assert parse_positions("news:5", 8) == {"news": 5}
    assert parse_positions("user:alice:7,a:b:c:0,news:12", 8) == {"user:alice": 7, "a:b:c": 0, "news": 12}


@pytest.mark.parametrize(
    "raw",
    [
        "5,news:3",  # one id mixed with positions
        "news:3,5",
        "5,6",
        "news",  # a topic without an id
        "news:",
        "news:x",
        "news:-1",
        "news:1.5",
        ":5",  # no topic
        "bad topic:5",
        "news:1,news:2",  # a topic twice
        "news:1,",
        ",news:1",
        "a:1,b:2,c:3,d:4",  # more than the request may hold (4 > 3)
        "news:" + "1" * 21,
    ],
)
def test_a_malformed_query_since_is_a_value_error(raw: str) -> None:
    with pytest.raises(ValueError):
        parse_positions(raw, 3)


def test_a_frame_since_is_one_id_or_an_object_of_positions() -> None:
    assert since_from_json(None, 8) is None
    assert since_from_json(5, 8) == 5
    assert since_from_json("5", 8) == 5
    assert since_from_json({}, 8) == {}
    assert since_from_json({"user:alice": "7", "news": 0}, 8) == {"user:alice": 7, "news": 0}


@pytest.mark.parametrize(
    "value",
    [
        "news:5",
        -1,
        True,
        1.5,
        ["5"],
        10**20,
        {"news": "x"},
        {"news": -1},
        {"news": True},
        {"news": None},
        {"news": [1]},
        {"bad topic": 1},
        {"": 1},
        {"a": 1, "b": 2, "c": 3, "d": 4},
    ],
)
def test_a_malformed_frame_since_is_a_bad_frame(value: Any) -> None:
    with pytest.raises(BadFrame):
        since_from_json(value, 3)


# -- the handshake (TestClient, memory broker) ---------------------------------------------------


def test_each_topic_is_recovered_after_its_own_position(client: TestClient, mint: Mint) -> None:
    token = mint(sub="alice")
    n1 = post(client, token, "news", "n1")
    s1 = post(client, token, "sport", "s1")
    n2 = post(client, token, "news", "n2")
    s2 = post(client, token, "sport", "s2")  # the client saw sport up to here, news up to n1
    n3 = post(client, token, "news", "n3")
    s3 = post(client, token, "sport", "s3")
    assert s1  # published before both positions: never replayed
    since = positions(news=n1["id"], sport=s2["id"])
    with connect(client, token, topics="news,sport", since=since) as (ws, hello_frame):
        assert hello_frame["recovered"] is True
        replay = [recv(ws) for _ in range(3)]
        assert [f["id"] for f in replay] == [n2["id"], n3["id"], s3["id"]]  # oldest first
        marker = post(client, token, "news", "live")
        assert recv(ws)["id"] == marker["id"]  # no duplicate, no gap


def test_a_topic_without_a_position_is_subscribed_live_without_replay(client: TestClient, mint: Mint) -> None:
    token = mint(sub="alice")
    seen = post(client, token, "news", "seen")
    post(client, token, "sport", "missed, not asked for")
    post(client, token, "user:alice", "missed, no position for the automatic topic")
    post(client, token, "broadcast", "missed too")
    missed = post(client, token, "news", "missed")
    with connect(client, token, topics="news,sport", since=positions(news=seen["id"])) as (ws, hello_frame):
        assert hello_frame["recovered"] is True
        assert set(hello_frame["topics"]) == {"broadcast", "user:alice", "news", "sport"}
        assert recv(ws)["id"] == missed["id"]
        live = [post(client, token, t, "live") for t in ("sport", "user:alice", "broadcast")]
        assert [recv(ws)["id"] for _ in live] == [a["id"] for a in live]


def test_an_automatic_topic_is_recovered_when_its_position_is_listed(client: TestClient, mint: Mint) -> None:
    backend = mint(sub="backend")
    seen = post(client, backend, "user:alice", "seen")
    missed = post(client, backend, "user:alice", "dm while away")
    post(client, backend, "broadcast", "no position: not replayed")
    since = positions(user__alice=seen["id"])
    with connect(client, mint(sub="alice"), since=since) as (ws, hello_frame):
        assert hello_frame["recovered"] is True
        assert recv(ws)["id"] == missed["id"]
        marker = post(client, backend, "broadcast", "marker")
        assert recv(ws)["id"] == marker["id"]


def test_positions_for_topics_not_in_the_request_are_ignored(client: TestClient, mint: Mint) -> None:
    token = mint(sub="alice")
    seen = post(client, token, "news", "seen")
    post(client, token, "elsewhere", "not requested")
    missed = post(client, token, "news", "missed")
    since = positions(news=seen["id"], elsewhere="0", user__bob="0")
    with connect(client, token, topics="news", since=since) as (ws, hello_frame):
        assert hello_frame["recovered"] is True
        assert "elsewhere" not in hello_frame["topics"] and "user:bob" not in hello_frame["topics"]
        assert recv(ws)["id"] == missed["id"]
        marker = post(client, token, "news", "marker")
        assert recv(ws)["id"] == marker["id"]


def test_a_position_of_0_asks_for_everything_retained(client: TestClient, mint: Mint) -> None:
    token = mint(sub="alice")
    topic = f"zero:{uuid.uuid4().hex[:8]}"
    sent = [post(client, token, topic, i) for i in range(3)]
    with connect(client, token, topics=topic, since=f"{topic}:0") as (ws, hello_frame):
        assert hello_frame["recovered"] is True
        assert [recv(ws)["id"] for _ in sent] == [a["id"] for a in sent]


def test_recovered_is_false_when_one_topic_was_trimmed_past_its_position(mint: Mint) -> None:
    with app_client(create_app(make_settings(history_size=2))) as client:
        token = mint(sub="alice")
        old = post(client, token, "news", "seen long ago")
        news = [post(client, token, "news", i) for i in range(3)]  # 3 > 2: one after `old` is gone
        sport_seen = post(client, token, "sport", "seen")
        sport = post(client, token, "sport", "missed")
        both = positions(news=old["id"], sport=sport_seen["id"])
        with connect(client, token, topics="news,sport", since=both) as (ws, hello_frame):
            assert hello_frame["recovered"] is False
            got = [recv(ws)["id"] for _ in range(3)]  # what is left, still oldest first
            assert got == [news[1]["id"], news[2]["id"], sport["id"]]
        # The same trimmed history, but only sport is recovered: nothing lost for it.
        with connect(client, token, topics="news,sport", since=positions(sport=sport_seen["id"])) as (ws, h):
            assert h["recovered"] is True
            assert recv(ws)["id"] == sport["id"]
            marker = post(client, token, "news", "live")
            assert recv(ws)["id"] == marker["id"]


@pytest.mark.parametrize(
    "since",
    ["5,news:3", "news:3,5", "news", "news:x", "news:", ":5", "bad topic:5", "news:1,news:2", "news:-1"],
)
def test_a_malformed_or_mixed_since_refuses_the_handshake_with_403(
    client: TestClient, mint: Mint, since: str
) -> None:
    assert refusal(client, ws_url(mint(), topics="news", since=since)) == 403


def test_more_positions_than_a_connection_may_hold_topics_refuses_the_handshake(mint: Mint) -> None:
    with app_client(create_app(make_settings(max_topics_per_connection=3))) as client:
        assert refusal(client, ws_url(mint(), since=positions(a="1", b="1", c="1", d="1"))) == 403
        with connect(client, mint(), since=positions(a="1", b="1", c="1")) as (_, hello_frame):
            assert hello_frame["recovered"] is True


# -- subscribe frames ------------------------------------------------------------------------------


def test_a_subscribe_frame_recovers_each_topic_after_its_position_and_the_others_live(
    client: TestClient, mint: Mint
) -> None:
    token = mint(sub="alice")
    n1 = post(client, token, "news", "n1")
    s1 = post(client, token, "sport", "s1")
    post(client, token, "weather", "no position: not replayed")
    n2 = post(client, token, "news", "n2")
    s2 = post(client, token, "sport", "s2")
    with connect(client, token) as (ws, _):
        frame = {
            "type": "subscribe",
            "topics": ["news", "sport", "weather"],
            "since": {"news": n1["id"], "sport": int(s1["id"]), "elsewhere": "0"},
            "ref": "p",
        }
        reply = ask(ws, frame)
        assert reply == {"type": "subscribed", "topics": ["news", "sport", "weather"], "recovered": True,
                         "ref": "p"}  # fmt: skip
        assert [recv(ws)["id"] for _ in range(2)] == [n2["id"], s2["id"]]
        live = post(client, token, "weather", "live")
        assert recv(ws)["id"] == live["id"]


def test_a_subscribe_frames_recovered_is_false_when_one_topic_was_trimmed(mint: Mint) -> None:
    with app_client(create_app(make_settings(history_size=1))) as client:
        token = mint(sub="alice")
        old = post(client, token, "news", 0)
        post(client, token, "news", 1)
        kept = post(client, token, "news", 2)
        seen = post(client, token, "sport", "seen")
        with connect(client, token) as (ws, _):
            frame = {"type": "subscribe", "topics": ["news", "sport"], "since": {"news": old["id"],
                     "sport": seen["id"]}}  # fmt: skip
            reply = ask(ws, frame)
            assert reply["type"] == "subscribed" and reply["recovered"] is False
            assert recv(ws)["id"] == kept["id"]


@pytest.mark.parametrize(
    "since",
    ["news:5", {"news": "x"}, {"news": -1}, {"news": True}, {"bad topic": 1}, ["1"],
     dict.fromkeys("abcd", 1)],  # more positions than a connection may hold topics (3)
)  # fmt: skip
def test_a_malformed_frame_since_gets_bad_request_and_nothing_is_subscribed(mint: Mint, since: Any) -> None:
    with app_client(create_app(make_settings(max_topics_per_connection=3))) as client:
        token = mint(sub="alice")
        with connect(client, token) as (ws, _):
            reply = ask(ws, {"type": "subscribe", "topics": ["news"], "since": since, "ref": 9})
            assert (reply["type"], reply["code"], reply["ref"]) == ("error", "bad_request", 9)
            post(client, token, "news", "not subscribed")
            expect_nothing(ws, within=0.2)
            assert ask(ws, {"type": "ping"}) == {"type": "pong"}


# -- real processes on a real Redis --------------------------------------------------------------


@pytest.fixture(scope="module")
def redis_instances(redis_server: RedisServer) -> Iterator[tuple[Instance, Instance]]:
    env = {
        "NOTIFIER_BROKER_URL": redis_server.url,
        "NOTIFIER_JWT_SECRET": SECRET,
        "NOTIFIER_HISTORY_SIZE": "5",
        "NOTIFIER_SHUTDOWN_TIMEOUT": "2",
    }
    first, second = Instance(env), Instance(env)
    try:
        first.start()
        second.start()
        yield first, second
    finally:
        for instance in (first, second):
            instance.stop()
            os.unlink(instance.log.name)


async def _post(http: httpx.AsyncClient, url: str, token: str, topic: str, data: Any) -> Frame:
    response = await http.post(url + "/v1/notifications", json={"topic": topic, "data": data},
                               headers={"authorization": f"Bearer {token}"})  # fmt: skip
    assert response.status_code == 202, response.text
    answer: Frame = response.json()
    return answer


async def _handshake_status(url: str) -> int:
    """101 when the handshake is accepted, else the refusal's HTTP status."""
    try:
        async with ws_connect(url) as ws:
            await hello(ws, DEADLINE)
            return 101
    except InvalidStatus as refused:
        status: int = refused.response.status_code
        return status


@pytest.mark.anyio
@pytest.mark.redis
@pytest.mark.slow
async def test_a_client_away_resumes_on_another_instance_from_its_per_topic_positions(
    redis_instances: tuple[Instance, Instance],
) -> None:
    first, second = redis_instances
    run = uuid.uuid4().hex[:8]
    fast, slow, quiet, trimmed = (f"{name}:{run}" for name in ("fast", "slow", "quiet", "trimmed"))
    user = f"u{run}"
    token = mint_token(user)
    topics = ",".join((fast, slow, quiet, trimmed))
    async with httpx.AsyncClient(timeout=10) as http:
        seen: dict[str, str] = {}
        async with ws_connect(f"{first.ws_url}?token={token}&topics={topics}") as ws:
            await hello(ws, DEADLINE)
            for topic in (fast, slow, trimmed):
                answer = await _post(http, first.url, token, topic, "seen")
                assert (await next_frame(ws, DEADLINE))["id"] == answer["id"]
                seen[topic] = answer["id"]
        # Away: fast gets 4 (all within the history of 5), slow 1, quiet 1, trimmed 7 (2 lost).
        away: dict[str, list[Frame]] = {fast: [], slow: [], quiet: [], trimmed: []}
        for n in range(7):
            away[trimmed].append(await _post(http, second.url, token, trimmed, n))
            if n < 4:
                away[fast].append(await _post(http, second.url, token, fast, n))
            if n == 2:
                away[slow].append(await _post(http, second.url, token, slow, n))
                away[quiet].append(await _post(http, second.url, token, quiet, n))

        # fast and slow only: recovered whole; quiet (no position) live, not replayed.
        since = positions(**{fast: seen[fast], slow: seen[slow], f"other{run}": "0"})
        async with ws_connect(f"{second.ws_url}?token={token}&topics={topics}&since={since}") as ws:
            frame = await hello(ws, DEADLINE)
            assert frame["recovered"] is True
            expected = sorted(away[fast] + away[slow], key=lambda a: int(a["id"]))
            assert [(await next_frame(ws, DEADLINE))["id"] for _ in expected] == [a["id"] for a in expected]
            marker = await _post(http, first.url, token, quiet, "live")
            assert (await next_frame(ws, DEADLINE)) == notification(marker, "live")

        # The trimmed topic too: not whole any more, and what is left still comes.
        since = positions(**{fast: away[fast][-1]["id"], trimmed: seen[trimmed]})
        async with ws_connect(f"{first.ws_url}?token={token}&topics={topics}&since={since}") as ws:
            frame = await hello(ws, DEADLINE)
            assert frame["recovered"] is False
            left = [(await next_frame(ws, DEADLINE))["id"] for _ in range(5)]
            assert left == [a["id"] for a in away[trimmed][-5:]]

        for bad in ("1," + f"{fast}:1", f"{fast}:1,1", f"{fast}:x", f"{fast}:1,{fast}:2"):
            assert await _handshake_status(f"{first.ws_url}?token={token}&since={bad}") == 403


# -- the Python client ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def memory_server() -> Iterator[Instance]:
    yield from memory_instance(SECRET)


class Spy:
    """Stands in for ``websockets``' ``connect`` in ``notifier.client``: records each URL, keeps
    each socket (a test closes it to drop the connection), and holds reconnections while away."""

    def __init__(self) -> None:
        self.urls: list[str] = []
        self.sockets: list[Any] = []
        self.back = asyncio.Event()
        self.back.set()

    @asynccontextmanager
    async def connect(self, url: str, **options: Any) -> AsyncIterator[Any]:
        await self.back.wait()
        self.urls.append(url)
        async with ws_connect(url, **options) as ws:
            self.sockets.append(ws)
            yield ws


def sent_since(url: str) -> dict[str, str]:
    (since,) = parse_qs(urlsplit(url).query)["since"]
    return dict(item.rsplit(":", 1) for item in since.split(","))


@pytest.mark.anyio
@pytest.mark.slow
async def test_the_python_client_resumes_each_topic_from_its_position_missing_nothing(
    memory_server: Instance, monkeypatch: pytest.MonkeyPatch
) -> None:
    spy = Spy()
    monkeypatch.setattr(notifier.client, "connect", spy.connect)
    run = uuid.uuid4().hex[:8]
    fast, slow = f"py-fast:{run}", f"py-slow:{run}"
    user = f"py{run}"
    token = mint_token(user)
    received: list[Frame] = []
    sub = Subscription(memory_server.url, token, [fast, slow], min_delay=0.05, max_delay=0.2)

    async def pump() -> None:
        async for frame in sub:
            received.append(frame)

    async def wait_for(count: int) -> None:
        async with asyncio.timeout(DEADLINE):
            while len(received) < count:
                await asyncio.sleep(0.01)

    reader = asyncio.create_task(pump())
    published: list[Frame] = []
    try:
        async with Client(memory_server.url, token) as client:
            await asyncio.wait_for(sub.connected.wait(), DEADLINE)
            for n in range(6):  # fast at every step, slow every third
                published.append(await client.publish(fast, n))
                if n % 3 == 0:
                    published.append(await client.publish(slow, n))
            published.append(await client.publish(f"user:{user}", "dm"))
            await wait_for(len(published))
            assert sub.positions[fast] == published[-2]["id"]
            assert sub.last_id == published[-1]["id"]

            spy.back.clear()  # away: the next connection waits
            await spy.sockets[-1].close()
            async with asyncio.timeout(DEADLINE):
                while sub.connected.is_set():
                    await asyncio.sleep(0.01)
            away = []
            for n in range(7):
                away.append(await client.publish(fast, f"away {n}"))
                if n % 4 == 0:
                    away.append(await client.publish(slow, f"away {n}"))
            spy.back.set()
            await wait_for(len(published) + len(away))
            live = await client.publish(slow, "live")
            await wait_for(len(published) + len(away) + 1)
    finally:
        reader.cancel()
        await asyncio.gather(reader, return_exceptions=True)
        await sub.aclose()

    assert [f["id"] for f in received] == [a["id"] for a in [*published, *away, live]]  # none missed, no dup
    assert len(spy.urls) == 2 and sub.connections == 2 and sub.recovered is True
    assert "since" not in parse_qs(urlsplit(spy.urls[0]).query)
    resumed = sent_since(spy.urls[1])
    fast_ids = [a["id"] for a in published if a["topic"] == fast]
    slow_ids = [a["id"] for a in published if a["topic"] == slow]
    assert resumed[fast] == fast_ids[-1] and resumed[slow] == slow_ids[-1]  # each its own
    assert resumed[f"user:{user}"] == published[-1]["id"]
    assert resumed["broadcast"] == published[-1]["id"]  # nothing of its own: the newest id seen


def test_the_python_client_sends_positions_as_topic_colon_id_and_reads_them_back() -> None:
    url = notifier.client.ws_url("http://h:1", "t", ["news"], {"user:alice": "5", "news": 7})
    assert parse_qs(urlsplit(url).query)["since"] == ["user:alice:5,news:7"]
    assert "since" not in parse_qs(urlsplit(notifier.client.ws_url("http://h:1", "t", [], {})).query)
    assert parse_qs(urlsplit(notifier.client.ws_url("http://h:1", "t", [], 42)).query)["since"] == ["42"]
    given = Subscription("http://h:1", "t", ["news"], since="user:alice:5,news:7")
    assert given.positions == {"user:alice": "5", "news": "7"} and given.last_id is None
    one = Subscription("http://h:1", "t", ["news"], since=42)
    assert one.positions == {} and one.last_id == "42"


@pytest.mark.anyio
@pytest.mark.slow
async def test_the_python_client_starts_from_given_positions_and_keeps_them(memory_server: Instance) -> None:
    run = uuid.uuid4().hex[:8]
    news, sport = f"py-news:{run}", f"py-sport:{run}"
    token = mint_token(f"py{run}")
    async with Client(memory_server.url, token) as client:
        n1 = await client.publish(news, 1)
        s1 = await client.publish(sport, 1)
        n2 = await client.publish(news, 2)
        sub = client.subscribe([news, sport], since={news: n1["id"]})  # sport: live
        try:
            async with asyncio.timeout(DEADLINE):
                assert await anext(sub) == notification(n2, 2)
                live = await client.publish(sport, 2)
                assert await anext(sub) == notification(live, 2)
        finally:
            await sub.aclose()
    assert sub.recovered is True and s1["id"] not in sub.positions.values()
    assert sub.positions[news] == n2["id"] and sub.positions[sport] == live["id"]


# -- the command line -------------------------------------------------------------------------------


@pytest.mark.slow
def test_cli_subscribe_since_takes_per_topic_positions(memory_server: Instance, tmp_path: Path) -> None:
    run = uuid.uuid4().hex[:8]
    news, sport = f"cli-news:{run}", f"cli-sport:{run}"
    backend = mint_token("backend")
    with httpx.Client(timeout=10) as http:

        def publish(topic: str, data: Any) -> Frame:
            response = http.post(memory_server.url + "/v1/notifications", json={"topic": topic, "data": data},
                                 headers={"authorization": f"Bearer {backend}"})  # fmt: skip
            assert response.status_code == 202, response.text
            answer: Frame = response.json()
            return answer

        n1, s1, n2, s2 = publish(news, 1), publish(sport, 1), publish(news, 2), publish(sport, 2)
        env = cli_env(NOTIFIER_URL=memory_server.url, NOTIFIER_TOKEN=mint_token("erin"))
        args = ["subscribe", news, sport, "--since", f"{news}:{n1['id']},{sport}:{s1['id']}"]
        with command(args, tmp_path, env) as sub:
            assert json.loads(sub.line()) == notification(n2, 2)
            assert json.loads(sub.line()) == notification(s2, 2)
            live = publish(sport, 3)
            assert json.loads(sub.line()) == notification(live, 3)


@pytest.mark.parametrize("since", ["1,news:2", "news:x", "news", "bad topic:1", "news:1,news:2"])
def test_cli_subscribe_with_a_malformed_since_fails_with_one_line(since: str, tmp_path: Path) -> None:
    result = cli("subscribe", "news", "--since", since, "--token", mint_token(), cwd=tmp_path)
    assert result.returncode == 2
    assert "--since" in one_error_line(result)


# -- the JavaScript client on Node ------------------------------------------------------------------

NODE = shutil.which("node")
NODE_MODULES = ROOT / "benchmarks" / "node_modules"
needs_node_ws = pytest.mark.skipif(
    NODE is None or not (NODE_MODULES / "ws" / "package.json").exists(),
    reason="node or its ws package is not installed (npm ci --prefix benchmarks)",
)

# Connects through a WebSocket class that records each URL; once every notification published
# so far has arrived, it drops the socket, publishes while away (fast every time, slow every
# fourth), lets the client reconnect, and prints what it received and the URLs it opened.
JS_RESUME = """
const out = (event) => console.log(JSON.stringify(event));
setTimeout(() => { out({ event: "timeout" }); process.exit(3); }, 15000).unref();
const WS = require("ws");
const urls = [];
class Spy extends WS { constructor(url, ...rest) { urls.push(url); super(url, ...rest); } }
const { NotifierClient } = require(process.env.NOTIFIER_JS);
const [fast, slow] = JSON.parse(process.env.TOPICS);
const base = process.env.NOTIFIER_URL, token = process.env.NOTIFIER_TOKEN;
const post = async (topic, data) => {
  const r = await fetch(base + "/v1/notifications", { method: "POST", body: JSON.stringify({ topic, data }),
    headers: { authorization: "Bearer " + token, "content-type": "application/json" } });
  return r.json();
};
const client = new NotifierClient({ url: base, token, topics: [fast, slow], WebSocket: Spy,
                                    minDelay: 300, maxDelay: 300, pingInterval: 0 });
const received = [];
const published = [];
let waiting = null;
const arrived = () => waiting && received.length >= waiting.count && waiting.resolve();
const until = (count) => new Promise((resolve) => { waiting = { count, resolve }; arrived(); });
client.on("notification", (n) => { received.push(n.id); arrived(); });
client.on("error", (err) => out({ event: "error", code: err.code, message: err.message }));
let hellos = 0;
client.on("hello", async (hello) => {
  if (++hellos === 2) {
    await until(published.length);
    published.push(await post(slow, "live"));
    await until(published.length);
    out({ event: "done", received, urls, published: published.map((a) => a.id),
          topics: published.map((a) => a.topic),
          recovered: client.recovered, positions: { ...client.positions }, lastId: client.lastId });
    client.close();
    return;
  }
  for (let n = 0; n < 6; n++) {
    published.push(await post(fast, n));
    if (n % 3 === 0) published.push(await post(slow, n));
  }
  await until(published.length);
  client.on("state", async function away(state) {
    if (state !== "disconnected") return;
    client.off("state", away);
    for (let n = 0; n < 8; n++) {
      published.push(await post(fast, "away " + n));
      if (n % 4 === 0) published.push(await post(slow, "away " + n));
    }
  });
  client.ws.close(); // the network drops: the client reconnects after minDelay
});
client.connect();
"""


@needs_node_ws
@pytest.mark.slow
def test_the_js_client_on_node_resumes_each_topic_from_its_position_missing_nothing(
    memory_server: Instance, tmp_path: Path
) -> None:
    run = uuid.uuid4().hex[:8]
    fast, slow = f"js-fast:{run}", f"js-slow:{run}"
    user = f"js{run}"
    script = tmp_path / "resume.js"
    script.write_text(JS_RESUME)
    assert NODE is not None
    env = {
        **os.environ,
        "NODE_PATH": str(NODE_MODULES),
        "NOTIFIER_JS": str(ROOT / "notifier" / "static" / "notifier.js"),
        "NOTIFIER_URL": memory_server.url,
        "NOTIFIER_TOKEN": mint_token(user),
        "TOPICS": json.dumps([fast, slow]),
    }
    done = subprocess.run([NODE, str(script)], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=25)  # fmt: skip
    assert done.returncode == 0, f"node exited with {done.returncode}: {done.stdout}{done.stderr}"
    events = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    assert [e["event"] for e in events] == ["done"], events
    result = events[0]
    assert result["received"] == result["published"]  # every one, once, in order
    assert len(result["urls"]) == 2 and result["recovered"] is True
    assert "since" not in parse_qs(urlsplit(result["urls"][0]).query)
    resumed = sent_since(result["urls"][1])
    before = list(zip(result["topics"][:8], result["published"][:8], strict=True))  # before the drop
    assert [t for t, _ in before].count(fast) == 6 and [t for t, _ in before].count(slow) == 2
    newest = {t: id_ for t, id_ in before}
    assert resumed[fast] == newest[fast] and resumed[slow] == newest[slow]  # each its own position
    assert resumed["broadcast"] == before[-1][1] and resumed[f"user:{user}"] == before[-1][1]
    last = result["published"][-1]
    assert result["positions"][slow] == last and result["lastId"] == last
