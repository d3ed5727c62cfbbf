"""The HTTP edge: publishing, health, readiness, metrics, the demo page, the JS client and the docs."""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import pytest
from conftest import Mint, make_settings
from fastapi import FastAPI
from fastapi.testclient import TestClient
from starlette.testclient import WebSocketTestSession
from support import FailingBroker, recv

from notifier.app import create_app

URL = "/v1/notifications"


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@contextmanager
def subscriber(client: TestClient, token: str, topics: str) -> Iterator[WebSocketTestSession]:
    with client.websocket_connect(f"/v1/ws?token={token}&topics={topics}") as ws:
        assert recv(ws)["type"] == "hello"
        yield ws


@contextmanager
def app_client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as test_client:
        yield test_client


def test_publish_answers_202_with_id_topic_and_ts(client: TestClient, mint: Mint) -> None:
    before = int(time.time() * 1000)
    response = client.post(URL, json={"topic": "news", "data": {"title": "hi"}}, headers=auth(mint()))
    after = int(time.time() * 1000)
    assert response.status_code == 202
    body = response.json()
    assert set(body) == {"id", "topic", "ts"}
    assert isinstance(body["id"], str) and body["id"].isascii() and body["id"].isdigit()
    assert body["topic"] == "news"
    assert isinstance(body["ts"], int) and before <= body["ts"] <= after


def test_ids_increase_strictly_in_publish_order_across_topics(client: TestClient, mint: Mint) -> None:
    token = mint()
    ids = [
        int(client.post(URL, json={"topic": topic, "data": i}, headers=auth(token)).json()["id"])
        for i, topic in enumerate(["a", "b", "a", "user:bob", "broadcast", "c", "a"] * 3)
    ]
    assert all(earlier < later for earlier, later in zip(ids, ids[1:], strict=False))


@pytest.mark.parametrize("data", [None, 0, "text", [1, 2], {"nested": {"deep": [True, None]}}, 1.5])
def test_any_json_data_is_accepted_and_delivered_unchanged(client: TestClient, mint: Mint, data: Any) -> None:
    token = mint()
    with subscriber(client, token, "news") as ws:
        response = client.post(URL, json={"topic": "news", "data": data}, headers=auth(token))
        assert response.status_code == 202
        frame = recv(ws)
        assert frame["data"] == data
        assert frame["id"] == response.json()["id"]


def test_a_publisher_without_topics_claim_may_notify_a_user(client: TestClient, mint: Mint) -> None:
    backend = mint(sub="backend", scopes=("publish",))
    with subscriber(client, mint(sub="alice"), "news") as ws:
        response = client.post(URL, json={"topic": "user:alice", "data": "hi"}, headers=auth(backend))
        assert response.status_code == 202
        assert recv(ws)["topic"] == "user:alice"


def test_a_publisher_with_a_matching_claim_is_accepted(client: TestClient, mint: Mint) -> None:
    token = mint(scopes=("publish",), topics=["room:*", "user:*"])
    for topic in ("room:1", "user:carol"):
        assert client.post(URL, json={"topic": topic, "data": 1}, headers=auth(token)).status_code == 202


# -- 401 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "headers",
    [
        {},
        {"Authorization": "Bearer not-a-jwt"},
        {"Authorization": "Bearer"},
        {"Authorization": "Basic YWxpY2U6c2VjcmV0"},
    ],
    ids=["no header", "garbage token", "empty bearer", "basic auth"],
)
def test_publish_without_a_valid_token_is_401_with_www_authenticate(
    client: TestClient, headers: dict[str, str]
) -> None:
    response = client.post(URL, json={"topic": "news", "data": 1}, headers=headers)
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_publish_with_an_expired_token_is_401(client: TestClient, mint: Mint) -> None:
    response = client.post(URL, json={"topic": "news", "data": 1}, headers=auth(mint(ttl=-10)))
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_publish_with_a_token_of_another_secret_is_401(client: TestClient, mint: Mint) -> None:
    response = client.post(URL, json={"topic": "news", "data": 1}, headers=auth(mint(secret="z" * 40)))
    assert response.status_code == 401
    assert response.headers["www-authenticate"].startswith("Bearer")


def test_a_bad_token_is_401_even_when_the_body_is_bad(client: TestClient) -> None:
    response = client.post(URL, content=b"{not json", headers={"Authorization": "Bearer x"})
    assert response.status_code == 401


# -- 403 -----------------------------------------------------------------------------------------


def test_publish_without_publish_scope_is_403(client: TestClient, mint: Mint) -> None:
    response = client.post(URL, json={"topic": "news", "data": 1}, headers=auth(mint(scopes=("subscribe",))))
    assert response.status_code == 403


@pytest.mark.parametrize("topic", ["news", "broadcast", "user:alice", "user:bob"])
def test_publish_to_a_topic_outside_the_claim_is_403(client: TestClient, mint: Mint, topic: str) -> None:
    token = mint(sub="alice", topics=["room:*"])
    assert client.post(URL, json={"topic": topic, "data": 1}, headers=auth(token)).status_code == 403


def test_a_forbidden_publish_delivers_nothing(client: TestClient, mint: Mint) -> None:
    with subscriber(client, mint(sub="reader"), "news") as ws:
        forbidden = client.post(URL, json={"topic": "news", "data": 1}, headers=auth(mint(topics=["room:*"])))
        assert forbidden.status_code == 403
        marker = client.post(URL, json={"topic": "news", "data": "marker"}, headers=auth(mint())).json()
        assert recv(ws)["id"] == marker["id"]


# -- 413 -----------------------------------------------------------------------------------------


def _body_of_size(size: int) -> bytes:
    head = b'{"topic":"news","data":"'
    body = head + b"x" * (size - len(head) - 2) + b'"}'
    assert len(body) == size
    return body


def test_a_body_of_exactly_max_message_bytes_is_accepted(mint: Mint) -> None:
    with app_client(create_app(make_settings(max_message_bytes=200))) as client:
        response = client.post(URL, content=_body_of_size(200), headers=auth(mint()))
        assert response.status_code == 202


def test_a_body_over_max_message_bytes_is_413(mint: Mint) -> None:
    with app_client(create_app(make_settings(max_message_bytes=200))) as client:
        response = client.post(URL, content=_body_of_size(201), headers=auth(mint()))
        assert response.status_code == 413


def test_a_chunked_body_over_max_message_bytes_is_413(mint: Mint) -> None:
    def chunks() -> Iterator[bytes]:
        body = _body_of_size(1000)
        for start in range(0, len(body), 100):
            yield body[start : start + 100]

    with app_client(create_app(make_settings(max_message_bytes=200))) as client:
        response = client.post(URL, content=chunks(), headers=auth(mint()))
        assert response.status_code == 413


def test_the_body_limit_counts_bytes_not_characters(mint: Mint) -> None:
    body = ('{"topic":"news","data":"' + "é" * 100 + '"}').encode()
    assert len(body.decode()) <= 200 < len(body)
    with app_client(create_app(make_settings(max_message_bytes=200))) as client:
        assert client.post(URL, content=body, headers=auth(mint())).status_code == 413


# -- 422 -----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{not json",
        b'{"topic": "news", "data": 1',
        b"[]",
        b'"news"',
        b"42",
        b"null",
        b'{"data": 1}',
        b'{"topic": "news"}',
        b"{}",
        b'{"topic": "bad topic", "data": 1}',
        b'{"topic": "", "data": 1}',
        b'{"topic": 42, "data": 1}',
        b'{"topic": null, "data": 1}',
        b'{"topic": "news\\n", "data": 1}',
        ('{"topic": "' + "x" * 129 + '", "data": 1}').encode(),
    ],
    ids=[
        "empty",
        "invalid JSON",
        "truncated JSON",
        "array",
        "string",
        "number",
        "null",
        "missing topic",
        "missing data",
        "empty object",
        "topic with space",
        "empty topic",
        "numeric topic",
        "null topic",
        "topic with trailing newline",
        "topic over 128 chars",
    ],
)
def test_a_malformed_publish_body_is_422(client: TestClient, mint: Mint, body: bytes) -> None:
    response = client.post(URL, content=body, headers={**auth(mint()), "Content-Type": "application/json"})
    assert response.status_code == 422


def test_a_rejected_body_delivers_nothing(client: TestClient, mint: Mint) -> None:
    token = mint()
    with subscriber(client, token, "news") as ws:
        assert client.post(URL, content=b'{"topic": "news"}', headers=auth(token)).status_code == 422
        marker = client.post(URL, json={"topic": "news", "data": "marker"}, headers=auth(token)).json()
        assert recv(ws)["id"] == marker["id"]


# -- Idempotency-Key -------------------------------------------------------------------------------


def test_a_repeated_idempotency_key_gets_the_first_answer_and_delivers_once(
    client: TestClient, mint: Mint
) -> None:
    token = mint(sub="backend")
    headers = {**auth(token), "Idempotency-Key": "order-42"}
    with subscriber(client, mint(sub="reader"), "news") as ws:
        first = client.post(URL, json={"topic": "news", "data": "first"}, headers=headers)
        again = client.post(URL, json={"topic": "news", "data": "second body"}, headers=headers)
        assert first.status_code == again.status_code == 202
        assert again.json() == first.json()
        marker = client.post(URL, json={"topic": "news", "data": "marker"}, headers=auth(token)).json()
        frames = [recv(ws), recv(ws)]
        assert [f["id"] for f in frames] == [first.json()["id"], marker["id"]]
        assert frames[0]["data"] == "first"


def test_a_repeated_idempotency_key_is_answered_even_for_another_topic(
    client: TestClient, mint: Mint
) -> None:
    headers = {**auth(mint(sub="backend")), "Idempotency-Key": "k-1"}
    first = client.post(URL, json={"topic": "news", "data": 1}, headers=headers).json()
    again = client.post(URL, json={"topic": "sport", "data": 2}, headers=headers).json()
    assert again["id"] == first["id"]


def test_the_same_idempotency_key_of_another_user_is_independent(client: TestClient, mint: Mint) -> None:
    body = {"topic": "news", "data": 1}
    first = client.post(URL, json=body, headers={**auth(mint(sub="svc-a")), "Idempotency-Key": "same"})
    other = client.post(URL, json=body, headers={**auth(mint(sub="svc-b")), "Idempotency-Key": "same"})
    assert first.status_code == other.status_code == 202
    assert int(other.json()["id"]) > int(first.json()["id"])


def test_different_idempotency_keys_publish_separately(client: TestClient, mint: Mint) -> None:
    token = mint()
    body = {"topic": "news", "data": 1}
    a = client.post(URL, json=body, headers={**auth(token), "Idempotency-Key": "a"}).json()
    b = client.post(URL, json=body, headers={**auth(token), "Idempotency-Key": "b"}).json()
    assert a["id"] != b["id"]


# -- 503 -----------------------------------------------------------------------------------------


def test_publish_while_the_broker_is_unavailable_is_503_quickly_and_accepts_nothing(mint: Mint) -> None:
    broker = FailingBroker()
    with app_client(create_app(make_settings(), broker=broker)) as client:
        token = mint()
        with subscriber(client, token, "news") as ws:
            started = time.monotonic()
            response = client.post(URL, json={"topic": "news", "data": "lost"}, headers=auth(token))
            assert response.status_code == 503
            assert time.monotonic() - started < 3
            broker.failing = False
            accepted = client.post(URL, json={"topic": "news", "data": "kept"}, headers=auth(token))
            assert accepted.status_code == 202
            frame = recv(ws)
            assert (frame["id"], frame["data"]) == (accepted.json()["id"], "kept")


def test_a_503_publish_with_an_idempotency_key_can_be_retried(mint: Mint) -> None:
    broker = FailingBroker()
    with app_client(create_app(make_settings(), broker=broker)) as client:
        headers = {**auth(mint()), "Idempotency-Key": "retry-me"}
        assert client.post(URL, json={"topic": "news", "data": 1}, headers=headers).status_code == 503
        broker.failing = False
        assert client.post(URL, json={"topic": "news", "data": 1}, headers=headers).status_code == 202


# -- health, readiness, metrics --------------------------------------------------------------------


def test_healthz_is_200(client: TestClient) -> None:
    assert client.get("/healthz").status_code == 200


def test_readyz_is_200_when_ready_and_503_once_draining(app: FastAPI, client: TestClient) -> None:
    assert client.get("/readyz").status_code == 200
    app.state.services.node.draining = True
    assert client.get("/readyz").status_code == 503
    assert client.get("/healthz").status_code == 200  # still serving


def test_readyz_is_503_while_the_broker_is_disconnected(app: FastAPI, client: TestClient) -> None:
    app.state.services.node.broker.connected = False
    assert client.get("/readyz").status_code == 503


def test_metrics_is_prometheus_text_with_the_contract_metrics(client: TestClient) -> None:
    response = client.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    lines = response.text.splitlines()
    for name in (
        "notifier_connections",
        "notifier_notifications_published_total",
        "notifier_notifications_delivered_total",
        'notifier_notifications_dropped_total{reason="slow_consumer"}',
        "notifier_delivery_latency_seconds_count",
        "notifier_delivery_latency_seconds_bucket",
        "notifier_broker_connected",
    ):
        assert any(line.startswith((name + " ", name + "{")) for line in lines), name
    assert "# TYPE notifier_connections gauge" in lines
    assert "# TYPE notifier_delivery_latency_seconds histogram" in lines


# -- demo page, JS client, docs --------------------------------------------------------------------


def test_the_root_is_an_html_demo_page(client: TestClient) -> None:
    response = client.get("/")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/html")
    assert "<html" in response.text.lower()
    assert "token" in response.text.lower()


def test_the_javascript_client_is_served(client: TestClient) -> None:
    response = client.get("/static/notifier.js")
    assert response.status_code == 200
    assert "javascript" in response.headers["content-type"]
    assert "WebSocket" in response.text


def test_docs_serve_the_openapi_ui_describing_publish(client: TestClient) -> None:
    docs = client.get("/docs")
    assert docs.status_code == 200
    assert "swagger" in docs.text.lower()
    schema = client.get("/openapi.json").json()
    assert "post" in schema["paths"]["/v1/notifications"]
    # The routes NotifierApp serves itself are described too; presence is a route of its own.
    sse = schema["paths"]["/v1/sse"]["get"]
    assert [p["name"] for p in sse["parameters"]] == ["topics", "since", "token", "presence", "Last-Event-ID"]
    assert sorted(sse["responses"]) == ["200", "403", "429", "503"]
    assert "text/event-stream" in sse["responses"]["200"]["content"]
    presence = schema["paths"]["/v1/topics/{topic}/presence"]["get"]
    assert sorted(presence["responses"]) == ["200", "401", "403", "422", "503"]


def test_the_declared_sse_route_refuses_as_the_direct_one(mint: Mint) -> None:
    """Reached through FastAPI's router (the app mounted in another, say), /v1/sse is the same
    endpoint: the same refusals with their JSON detail."""
    routed_app = ThroughFastAPI(create_app(make_settings()))
    with TestClient(create_app(make_settings())) as direct, TestClient(routed_app) as routed:
        for query in ("topics=news&token=bad", f"topics=user:bob&token={mint(sub='alice')}",
                      f"topics=news&presence=yes&token={mint()}"):  # fmt: skip
            a, b = direct.get(f"/v1/sse?{query}"), routed.get(f"/v1/sse?{query}")
            assert (a.status_code, a.json()) == (b.status_code, b.json())
            assert a.status_code == 403


class ThroughFastAPI:
    """The app with every request taken through FastAPI's own middleware and declared routes,
    not ``NotifierApp``'s direct ones."""

    def __init__(self, app: FastAPI) -> None:
        self.app = app

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await FastAPI.__call__(self.app, scope, receive, send)


@pytest.mark.parametrize(
    ("case", "body", "headers"),
    [
        ("accepted", {"topic": "news", "data": [1]}, {}),
        ("no token", {"topic": "news", "data": 1}, {"Authorization": ""}),
        ("no publish scope", {"topic": "news", "data": 1}, {"scopes": "subscribe"}),
        ("bad topic", {"topic": "no spaces", "data": 1}, {}),
        ("missing data", {"topic": "news"}, {}),
        ("too large", {"topic": "news", "data": "x" * 70000}, {}),
        ("bad idempotency key", {"topic": "news", "data": 1}, {"Idempotency-Key": "k" * 300}),
    ],
)
def test_the_direct_publish_route_answers_as_the_declared_fastapi_route(
    mint: Mint, case: str, body: dict[str, Any], headers: dict[str, str]
) -> None:
    scopes = tuple(headers.pop("scopes", "publish subscribe").split())
    token = mint(scopes=scopes)
    sent = {"Authorization": f"Bearer {token}", **headers}
    answers = []
    for app in (create_app(make_settings()), ThroughFastAPI(create_app(make_settings()))):
        with TestClient(app) as client:  # type: ignore[arg-type]
            answers.append(client.post(URL, json=body, headers=sent))
    direct, declared = answers
    assert direct.status_code == declared.status_code, case
    assert direct.headers.get("www-authenticate") == declared.headers.get("www-authenticate")
    assert direct.headers["content-type"] == declared.headers["content-type"] == "application/json"
    if direct.status_code == 202:
        assert direct.json().keys() == declared.json().keys() == {"id", "topic", "ts"}
    else:
        assert direct.json() == declared.json() and set(direct.json()) == {"detail"}, case
