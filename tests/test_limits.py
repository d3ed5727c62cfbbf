"""Contract v2 hardening: per-client limits, handshake outcomes, deep nesting, tokens that always
expire, and ``since=0``. In-process through the TestClient, plus real ``notifier serve`` processes
for the per-user 429 and the deeply nested publish.

Every hostile loop here has a fixed count and every wait a deadline.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import warnings
from collections.abc import Iterator
from contextlib import AsyncExitStack, ExitStack
from pathlib import Path
from typing import Any

import httpx
import jwt
import orjson
import pytest
from conftest import SECRET, Mint, make_settings, mint_token
from fastapi.testclient import TestClient
from pydantic import SecretStr
from starlette.testclient import WebSocketDenialResponse, WebSocketTestSession
from support import ROOT, Instance, next_frame, recv, wait_until
from test_ws import app_client, ws_url
from test_ws import connect as connect_ws
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import InvalidStatus

from notifier.app import create_app
from notifier.broker_memory import MemoryBroker
from notifier.cli import _dev_secret
from notifier.errors import BrokerUnavailable

Frame = dict[str, Any]
OUTCOMES = ("accepted", "unauthorized", "forbidden", "limited", "unavailable")
DEADLINE = 10.0


# -- helpers ----------------------------------------------------------------------------------


def refusal(client: TestClient, url: str) -> WebSocketDenialResponse:
    """The HTTP answer to a refused handshake (fails if the socket opened)."""
    with pytest.raises(WebSocketDenialResponse) as info:
        with client.websocket_connect(url):
            pass
    return info.value


def ask(ws: WebSocketTestSession, frame: Frame | str) -> Frame:
    """Send a client frame (an object, or raw text) and read the next frame."""
    if isinstance(frame, str):
        ws.send_text(frame)
    else:
        ws.send_json(frame)
    return recv(ws)


def still_open(ws: WebSocketTestSession, ref: str = "alive") -> None:
    """The socket answers a ping, and nothing else was queued before the pong."""
    assert ask(ws, {"type": "ping", "ref": ref}) == {"type": "pong", "ref": ref}


def post(client: TestClient, token: str, body: bytes | Frame, **headers: str) -> httpx.Response:
    content = body if isinstance(body, bytes) else orjson.dumps(body)
    return client.post(
        "/v1/notifications",
        content=content,
        headers={"Authorization": f"Bearer {token}", "content-type": "application/json", **headers},
    )


def handshakes(client: TestClient) -> dict[str, float]:
    """``notifier_handshakes_total`` by outcome, and ``notifier_handshakes_rejected_total`` by status."""
    found: dict[str, float] = {}
    for line in client.get("/metrics").text.splitlines():
        if line.startswith(("notifier_handshakes_total{", "notifier_handshakes_rejected_total{")):
            name, value = line.rsplit(" ", 1)
            found[name] = float(value)
    return found


def nested_text(depth: int, kind: str = "list") -> str:
    """A JSON value nested ``depth`` levels deep."""
    if kind == "list":
        return "[" * depth + "]" * depth
    return '{"a":' * depth + "1" + "}" * depth


def publish_body(depth: int, kind: str = "list", topic: str = "news") -> bytes:
    return b'{"topic":"' + topic.encode() + b'","data":' + nested_text(depth, kind).encode() + b"}"


def re_encodable(value: Any) -> bool:
    try:
        orjson.dumps(value)
    except orjson.JSONEncodeError:
        return False
    return True


def claims_token(claims: dict[str, Any], secret: str = SECRET) -> str:
    return jwt.encode(claims, secret, algorithm="HS256")


def without_exp(sub: str = "alice", scope: str = "subscribe publish") -> str:
    return claims_token({"sub": sub, "scope": scope, "iat": int(time.time())})


class DownBroker(MemoryBroker):
    """The memory broker, whose subscribe fails: a handshake gets as far as its subscriptions."""

    async def subscribe(self, topic: str) -> None:
        raise BrokerUnavailable("broker is down (test)")


# -- connections per user -------------------------------------------------------------------------


def test_a_users_sockets_beyond_the_per_user_limit_get_429_and_a_closed_one_frees_its_slot(
    mint: Mint,
) -> None:
    app = create_app(make_settings(max_connections_per_user=3))
    with app_client(app) as client, ExitStack() as stack:
        # Three different tokens of one user: the limit counts the user's sockets, not tokens.
        tokens = [mint(sub="alice"), mint(sub="alice", topics=["room:*"]), mint(sub="alice", ttl=600)]
        sockets = [stack.enter_context(connect_ws(client, token))[0] for token in tokens]

        refused = refusal(client, ws_url(mint(sub="alice", topics=["news"])))
        assert refused.status_code == 429
        detail = refused.json()["detail"]
        assert isinstance(detail, str) and "NOTIFIER_MAX_CONNECTIONS_PER_USER" in detail

        with connect_ws(client, mint(sub="bob")) as (_, hello):  # another user is not affected
            assert hello["user"] == "bob"
        for i, ws in enumerate(sockets):  # nor are the user's open sockets
            still_open(ws, f"s{i}")

        sockets[0].close()

        def admitted_again() -> bool:
            try:
                with connect_ws(client, tokens[0]):
                    return True
            except WebSocketDenialResponse as denied:
                assert denied.status_code == 429
                return False

        wait_until(admitted_again, 5, "the closed socket to free the user's slot")
    # Every socket closed: nothing is left counted for the user.
    assert app.state.services.node.hub.per_user == {}


def test_a_handshake_that_failed_after_admission_does_not_hold_the_users_slot(mint: Mint) -> None:
    app = create_app(make_settings(max_connections_per_user=1), DownBroker())
    with app_client(app) as client:
        for _ in range(3):  # a leaked count would turn the second one into a 429
            assert refusal(client, ws_url(mint(sub="alice"))).status_code == 503
        assert app.state.services.node.hub.per_user == {}


# -- topics per connection ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("sub", "topics", "accepted"),
    [
        ("alice", "a,b,c", True),  # broadcast + user:alice + 3 = 5
        ("alice", "a,b,c,d", False),  # 6
        ("alice", "broadcast,user:alice,a,b,c", True),  # the automatic ones count once
        ("alice", "a,a,b,b,c,c", True),  # duplicates count once
        ("alice smith", "a,b,c,d", True),  # no valid user topic: broadcast + 4 = 5
        ("alice smith", "a,b,c,d,e", False),
    ],
)
def test_the_handshake_topic_limit_counts_the_automatic_topics(
    mint: Mint, sub: str, topics: str, accepted: bool
) -> None:
    with app_client(create_app(make_settings(max_topics_per_connection=5))) as client:
        token = mint(sub=sub)
        if accepted:
            with connect_ws(client, token, topics=topics) as (_, hello):
                assert len(hello["topics"]) == 5
        else:
            refused = refusal(client, ws_url(token, topics=topics))
            assert refused.status_code == 403
            assert "too many topics" in refused.json()["detail"]


def test_a_subscribe_frame_beyond_the_topic_limit_gets_limit_exceeded_and_subscribes_nothing(
    mint: Mint,
) -> None:
    with app_client(create_app(make_settings(max_topics_per_connection=5))) as client:
        publisher = mint(sub="backend", scopes=("publish",))
        with connect_ws(client, mint(sub="alice"), topics="a,b") as (ws, hello):
            assert len(hello["topics"]) == 4

            error = ask(ws, {"type": "subscribe", "topics": ["a", "x", "y"], "ref": "over"})
            assert error["type"] == "error" and error["code"] == "limit_exceeded", error
            assert error["ref"] == "over" and isinstance(error["message"], str)
            for topic in ("x", "y"):  # neither x nor y was subscribed
                assert post(client, publisher, {"topic": topic, "data": 1}).status_code == 202
            still_open(ws)

            # With `since` too: refused before any replay.
            error = ask(ws, {"type": "subscribe", "topics": ["x", "y"], "since": 0, "ref": 2})
            assert (error["type"], error["code"], error["ref"]) == ("error", "limit_exceeded", 2)
            still_open(ws)

            assert ask(ws, {"type": "subscribe", "topics": ["x"]}) == {"type": "subscribed", "topics": ["x"]}
            # At the limit, topics already held may be asked for again...
            again = ask(ws, {"type": "subscribe", "topics": ["a", "b", "x", "broadcast"]})
            assert again["type"] == "subscribed"
            # ...but not one more.
            assert ask(ws, {"type": "subscribe", "topics": ["z"]})["code"] == "limit_exceeded"
            assert ask(ws, {"type": "unsubscribe", "topics": ["x"]})["type"] == "unsubscribed"
            assert ask(ws, {"type": "subscribe", "topics": ["z"]})["type"] == "subscribed"

            assert post(client, publisher, {"topic": "z", "data": "to z"}).status_code == 202
            assert recv(ws)["data"] == "to z"


def test_one_socket_asking_for_100000_topics_in_frames_never_holds_more_than_the_limit(mint: Mint) -> None:
    """100 frames of 1,000 new topics each, on a socket already at the default limit (128): each
    frame gets limit_exceeded, the instance never holds more than 128 topics, and the socket and a
    bystander keep working. Bounded: 102 frames (under the burst of 200), a deadline on each reply."""
    app = create_app(make_settings())
    hub = app.state.services.node.hub
    with app_client(app) as client:
        with connect_ws(client, mint(sub="mallory")) as (ws, _), connect_ws(
            client, mint(sub="bob"), topics="t0"
        ) as (bystander, _):
            filler = [f"t{i}" for i in range(126)]  # + broadcast + user:mallory = 128
            assert ask(ws, {"type": "subscribe", "topics": filler})["type"] == "subscribed"
            assert len(set(hub.topics()) - {"user:bob"}) == 128

            started = time.monotonic()
            for frame in range(100):
                topics = [f"n{frame * 1000 + i}" for i in range(1000)]
                ws.send_text(json.dumps({"type": "subscribe", "topics": topics, "ref": frame}))
            replies = [recv(ws) for _ in range(100)]
            assert [(r["type"], r["code"], r["ref"]) for r in replies] == [
                ("error", "limit_exceeded", i) for i in range(100)
            ]
            assert time.monotonic() - started < 30
            assert len(set(hub.topics()) - {"user:bob"}) == 128  # broadcast is shared with bob
            assert not any(t.startswith("n") for t in hub.topics())

            still_open(ws)
            publisher = mint(sub="backend", scopes=("publish",))
            assert post(client, publisher, {"topic": "t0", "data": "hi"}).status_code == 202
            assert recv(ws)["data"] == "hi"
            assert recv(bystander)["data"] == "hi"


# -- handshake metrics --------------------------------------------------------------------------


def test_a_fresh_instance_shows_every_handshake_outcome_and_resubscribes_at_0(client: TestClient) -> None:
    found = handshakes(client)
    for outcome in OUTCOMES:
        assert found[f'notifier_handshakes_total{{outcome="{outcome}"}}'] == 0
    assert "notifier_broker_resubscribes_total 0.0" in client.get("/metrics").text.splitlines()


def test_each_handshake_is_counted_by_outcome_and_refusals_by_status_too(mint: Mint) -> None:
    app = create_app(make_settings(max_connections_per_user=1, max_topics_per_connection=3))
    with app_client(app) as client:
        with connect_ws(client, mint(sub="alice")):
            unauthorized = [
                ws_url(topics="news"),  # missing
                ws_url("not-a-jwt"),
                ws_url(mint(sub="carol", ttl=-10)),  # expired
                ws_url(without_exp("carol")),
            ]
            forbidden = [
                ws_url(mint(sub="carol", scopes=("publish",))),
                ws_url(mint(sub="carol"), topics="bad topic"),
                ws_url(mint(sub="carol"), since="x"),
                ws_url(mint(sub="carol"), topics="a,b"),  # 4 topics
            ]
            for url in unauthorized + forbidden:
                assert refusal(client, url).status_code == 403
            assert refusal(client, ws_url(mint(sub="alice"))).status_code == 429
            app.state.services.node.draining = True
            assert refusal(client, ws_url(mint(sub="dave"))).status_code == 503
            app.state.services.node.draining = False
        assert handshakes(client) == {
            'notifier_handshakes_total{outcome="accepted"}': 1,
            'notifier_handshakes_total{outcome="unauthorized"}': 4,
            'notifier_handshakes_total{outcome="forbidden"}': 4,
            'notifier_handshakes_total{outcome="limited"}': 1,
            'notifier_handshakes_total{outcome="unavailable"}': 1,
            'notifier_handshakes_rejected_total{status="403"}': 8,
            'notifier_handshakes_rejected_total{status="429"}': 1,
            'notifier_handshakes_rejected_total{status="503"}': 1,
        }


def test_a_handshake_refused_because_the_broker_is_down_counts_as_unavailable(mint: Mint) -> None:
    with app_client(create_app(make_settings(), DownBroker())) as client:
        assert refusal(client, ws_url(mint())).status_code == 503
        found = handshakes(client)
        assert found['notifier_handshakes_total{outcome="unavailable"}'] == 1
        assert found['notifier_handshakes_total{outcome="accepted"}'] == 0


# -- deep nesting and what is echoed -------------------------------------------------------------


@pytest.mark.parametrize("kind", ["list", "object"])
def test_a_post_with_data_nested_300_levels_is_422_saying_so(
    client: TestClient, mint: Mint, kind: str
) -> None:
    answer = post(client, mint(), publish_body(300, kind))
    assert answer.status_code == 422, answer.text
    detail = answer.json()["detail"]
    assert "nested too deeply" in detail and "re-encoded" in detail
    assert client.get("/healthz").status_code == 200


def test_data_is_accepted_exactly_as_deep_as_its_frame_re_encodes(client: TestClient, mint: Mint) -> None:
    """Around orjson's writing limit, a POST is accepted if and only if the notification frame
    carrying its data can be decoded and encoded again (as ``notifier subscribe`` does)."""
    token = mint()
    with connect_ws(client, token, topics="deep") as (ws, _):
        outcomes = {}
        for depth in range(248, 260):
            data = orjson.loads(nested_text(depth))
            answer = post(client, token, publish_body(depth, topic="deep"))
            outcomes[depth] = answer.status_code
            assert answer.status_code == (202 if re_encodable({"data": data}) else 422), depth
            if answer.status_code == 202:
                frame = recv(ws)
                assert frame["data"] == data and re_encodable(frame)
        assert 202 in outcomes.values() and 422 in outcomes.values()
        still_open(ws)


@pytest.mark.parametrize("kind", ["list", "object"])
def test_a_ws_publish_with_data_nested_300_levels_gets_bad_request_and_the_socket_stays_open(
    client: TestClient, mint: Mint, kind: str
) -> None:
    with connect_ws(client, mint(), topics="news") as (ws, _):
        text = '{"type":"publish","topic":"news","ref":"deep","data":' + nested_text(300, kind) + "}"
        error = ask(ws, text)
        assert (error["type"], error["code"], error["ref"]) == ("error", "bad_request", "deep")
        assert "nested too deeply" in error["message"]
        still_open(ws)
        ws.send_json({"type": "publish", "topic": "news", "data": [[1]], "ref": 2})
        frames = sorted((recv(ws), recv(ws)), key=lambda f: str(f["type"]))  # in either order
        assert [f["type"] for f in frames] == ["notification", "published"]
        assert frames[0]["data"] == [[1]] and frames[1]["ref"] == 2


@pytest.mark.parametrize(
    "ref",
    ["18446744073709551615", "-9223372036854775808", "18446744073709551616", "1e308", "-0.0", '"\\u2028é"'],
)
def test_every_ref_a_client_can_send_is_echoed(client: TestClient, mint: Mint, ref: str) -> None:
    with connect_ws(client, mint()) as (ws, _):
        assert ask(ws, '{"type":"ping","ref":' + ref + "}") == {"type": "pong", "ref": orjson.loads(ref)}


def huge_exp_token(sub: str = "alice") -> str:
    return claims_token({"sub": sub, "scope": "subscribe publish", "exp": 10**30})


def test_token_claims_that_could_not_be_echoed_back_are_refused(client: TestClient, mint: Mint) -> None:
    """``sub`` comes back in ``hello`` and ``exp`` in ``refreshed``: a lone surrogate or an
    integer orjson cannot write would drop the socket (or answer 500), so such tokens are invalid."""
    surrogate = claims_token({"sub": "\ud800", "scope": "subscribe publish", "exp": int(time.time()) + 60})
    for token in (surrogate, huge_exp_token()):
        assert refusal(client, ws_url(token)).status_code == 403
        answer = post(client, token, {"topic": "news", "data": 1}, **{"Idempotency-Key": "k1"})
        assert answer.status_code == 401, answer.text
    with connect_ws(client, mint(sub="alice")) as (ws, _):
        reply = ask(ws, {"type": "refresh", "token": huge_exp_token(), "ref": 1})
        assert (reply["type"], reply["code"], reply["ref"]) == ("error", "forbidden", 1)
        still_open(ws)


# -- tokens always expire ----------------------------------------------------------------------


def test_a_token_without_exp_is_refused_everywhere_saying_exp_is_required(
    client: TestClient, mint: Mint
) -> None:
    token = without_exp()
    answer = post(client, token, {"topic": "news", "data": 1})
    assert answer.status_code == 401
    assert answer.headers["www-authenticate"] == "Bearer"
    assert "'exp'" in answer.json()["detail"] and "required" in answer.json()["detail"]

    history = client.get("/v1/topics/news/notifications", headers={"Authorization": f"Bearer {token}"})
    assert history.status_code == 401

    refused = refusal(client, ws_url(token))
    assert refused.status_code == 403 and "'exp'" in refused.json()["detail"]

    with connect_ws(client, mint()) as (ws, _):
        reply = ask(ws, {"type": "refresh", "token": token, "ref": "r"})
        assert (reply["type"], reply["code"], reply["ref"]) == ("error", "forbidden", "r")
        assert "'exp'" in reply["message"]
        still_open(ws)


def test_the_shortest_secret_allowed_serves_without_any_pyjwt_warning(mint: Mint) -> None:
    secret = "k" * 32
    app = create_app(make_settings(jwt_secret=SecretStr(secret)))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with app_client(app) as client:
            token = mint(secret=secret)
            assert post(client, token, {"topic": "news", "data": 1}).status_code == 202
            with connect_ws(client, token) as (ws, _):
                later = mint(secret=secret, ttl=7200)
                assert ask(ws, {"type": "refresh", "token": later})["type"] == "refreshed"
            stranger = mint(secret="another-secret-" + "x" * 20)
            assert post(client, stranger, {"topic": "n", "data": 1}).status_code == 401
    assert [str(w.message) for w in caught] == []


def test_the_dev_token_expires_too(capsys: pytest.CaptureFixture[str]) -> None:
    settings = _dev_secret(make_settings(jwt_secret=None))
    token = capsys.readouterr().out.split("#token=", 1)[1].strip()
    claims = jwt.decode(token, settings.secret, algorithms=["HS256"])
    assert claims["iat"] <= time.time() < claims["exp"]


def _notifier(*args: str, secret: str = SECRET, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOTIFIER_")}
    env["NOTIFIER_JWT_SECRET"] = secret
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), env.get("PYTHONPATH")]))
    command = [sys.executable, "-m", "notifier", *args]
    return subprocess.run(command, cwd=cwd, env=env, capture_output=True, text=True, timeout=30)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("args", "secret", "named"),
    [
        (("--ttl", "0"), SECRET, "--ttl"),
        (("--ttl", "-60"), SECRET, "--ttl"),
        (("--ttl", str(10**20)), SECRET, "--ttl"),  # an exp no JSON reader takes
        ((), "short-secret", "NOTIFIER_JWT_SECRET"),
    ],
)
def test_notifier_token_refuses_a_token_without_a_usable_expiry_or_with_a_short_secret(
    tmp_path: Path, args: tuple[str, ...], secret: str, named: str
) -> None:
    result = _notifier("token", "--sub", "alice", "--scope", "subscribe", *args, secret=secret, cwd=tmp_path)
    assert result.returncode != 0 and result.stdout == ""
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and named in lines[0], result.stderr
    assert secret not in result.stderr


# -- since=0: everything retained ----------------------------------------------------------------


def publish_n(client: TestClient, token: str, topic: str, count: int) -> list[str]:
    ids = []
    for i in range(count):
        answer = post(client, token, {"topic": topic, "data": i})
        assert answer.status_code == 202, answer.text
        ids.append(answer.json()["id"])
    return ids


@pytest.fixture
def small() -> Iterator[TestClient]:
    with app_client(create_app(make_settings(history_size=5))) as client:
        yield client


def test_since_0_on_the_handshake_replays_everything_retained(small: TestClient, mint: Mint) -> None:
    token = mint()
    ids = publish_n(small, token, "news", 3)
    with connect_ws(small, token, topics="news", since="0") as (ws, hello):
        assert hello["recovered"] is True
        assert [recv(ws)["id"] for _ in range(3)] == ids
        still_open(ws)


def test_since_0_reports_not_recovered_when_history_was_trimmed(small: TestClient, mint: Mint) -> None:
    token = mint()
    ids = publish_n(small, token, "news", 8)
    with connect_ws(small, token, topics="news", since="0") as (ws, hello):
        assert hello["recovered"] is False
        assert [recv(ws)["id"] for _ in range(5)] == ids[-5:]
        still_open(ws)


@pytest.mark.parametrize("since", [0, "0"])
def test_since_0_in_a_subscribe_frame_replays_everything_retained(
    small: TestClient, mint: Mint, since: int | str
) -> None:
    token = mint()
    ids = publish_n(small, token, "news", 2)
    with connect_ws(small, token) as (ws, _):
        reply = ask(ws, {"type": "subscribe", "topics": ["news"], "since": since, "ref": 1})
        assert reply == {"type": "subscribed", "topics": ["news"], "recovered": True, "ref": 1}
        assert [recv(ws)["id"] for _ in range(2)] == ids


@pytest.mark.parametrize("since", [-1, "-1", 1.5, True, "", "0x1", [0]])
def test_a_malformed_since_in_a_subscribe_frame_is_still_bad_request(
    small: TestClient, mint: Mint, since: Any
) -> None:
    with connect_ws(small, mint()) as (ws, _):
        reply = ask(ws, {"type": "subscribe", "topics": ["news"], "since": since, "ref": 1})
        assert (reply["type"], reply["code"], reply["ref"]) == ("error", "bad_request", 1)


def test_history_since_0_returns_everything_retained(small: TestClient, mint: Mint) -> None:
    token = mint()
    ids = publish_n(small, token, "news", 3)
    answer = small.get(
        "/v1/topics/news/notifications", params={"since": "0"}, headers={"Authorization": f"Bearer {token}"}
    )
    assert answer.status_code == 200, answer.text
    assert [n["id"] for n in answer.json()["notifications"]] == ids


# -- real processes -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def instance() -> Iterator[Instance]:
    """One real ``notifier serve`` (memory broker, default limits)."""
    server = Instance({"NOTIFIER_BROKER_URL": "memory://", "NOTIFIER_JWT_SECRET": SECRET})
    try:
        server.start()
        yield server
    finally:
        server.stop()
        print("--- instance log (tail) ---", *server.output().splitlines()[-40:], sep="\n")
        os.unlink(server.log.name)


async def open_ws(stack: AsyncExitStack, instance: Instance, token: str) -> ClientConnection:
    ws = await stack.enter_async_context(
        connect(f"{instance.ws_url}?token={token}", open_timeout=5, close_timeout=2)
    )
    assert (await next_frame(ws, DEADLINE))["type"] == "hello"
    return ws


@pytest.mark.anyio
@pytest.mark.slow
async def test_a_real_instance_gives_the_101st_socket_of_a_user_429_and_nobody_else_notices(
    instance: Instance,
) -> None:
    """One token opening 150 sockets on a real instance (limit 100): sockets 101 to 150 get HTTP 429
    with a JSON detail; the first 100 still get what is published to the user; another user still
    gets in; a closed socket frees its slot. Bounded: 150 handshakes, a deadline on each."""
    token, publisher = mint_token("alice"), mint_token("backend", ("publish",))
    limited_before = instance.metric('notifier_handshakes_total{outcome="limited"}')
    async with AsyncExitStack() as stack:
        opened: list[ClientConnection] = []
        refused: list[tuple[int, Any]] = []
        for _ in range(150):
            try:
                opened.append(await open_ws(stack, instance, token))
            except InvalidStatus as exc:
                refused.append((exc.response.status_code, orjson.loads(exc.response.body or b"null")))
        assert len(opened) == 100
        assert len(refused) == 50
        assert all(status == 429 and isinstance(body["detail"], str) for status, body in refused), refused[:3]

        bob = await open_ws(stack, instance, mint_token("bob"))
        async with httpx.AsyncClient(timeout=DEADLINE) as http:
            answer = await http.post(
                instance.url + "/v1/notifications",
                json={"topic": "user:alice", "data": "to every socket"},
                headers={"authorization": f"Bearer {publisher}"},
            )
            assert answer.status_code == 202, answer.text
        for ws in opened:
            assert (await next_frame(ws, DEADLINE))["data"] == "to every socket"
        await bob.send('{"type":"ping","ref":"bob"}')
        assert await next_frame(bob, DEADLINE) == {"type": "pong", "ref": "bob"}

        await opened[0].close()
        deadline = time.monotonic() + DEADLINE
        while True:  # the server frees the slot once it has seen the close
            try:
                await open_ws(stack, instance, token)
                break
            except InvalidStatus as exc:
                assert exc.response.status_code == 429
                assert time.monotonic() < deadline, "the closed socket never freed its slot"
    assert instance.metric('notifier_handshakes_total{outcome="limited"}') - limited_before >= 50
    assert "Traceback" not in instance.output()


@pytest.mark.anyio
@pytest.mark.slow
async def test_a_real_instance_answers_data_nested_300_levels_with_422_and_bad_request(
    instance: Instance,
) -> None:
    token = mint_token("carol")
    async with httpx.AsyncClient(timeout=DEADLINE) as http:
        for kind in ("list", "object"):
            answer = await http.post(
                instance.url + "/v1/notifications",
                content=publish_body(300, kind),
                headers={"authorization": f"Bearer {token}", "content-type": "application/json"},
            )
            assert answer.status_code == 422, answer.text
            assert answer.headers["content-type"] == "application/json"
            assert "nested too deeply" in answer.json()["detail"]
        async with AsyncExitStack() as stack:
            ws = await open_ws(stack, instance, token)
            await ws.send('{"type":"publish","topic":"news","ref":1,"data":' + nested_text(300) + "}")
            error = await next_frame(ws, DEADLINE)
            assert (error["type"], error["code"], error["ref"]) == ("error", "bad_request", 1)
            await ws.send('{"type":"ping","ref":2}')
            assert await next_frame(ws, DEADLINE) == {"type": "pong", "ref": 2}
        assert (await http.get(instance.url + "/healthz")).status_code == 200
    assert "Traceback" not in instance.output()
