"""Hostile input: arbitrary bytes, JSON and oversized or deeply nested documents thrown at the
WebSocket and at POST. Each gets the contract's error, nothing crashes, and the instance keeps
serving everyone else."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from conftest import make_settings, mint_token
from fastapi.testclient import TestClient
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from starlette.testclient import WebSocketTestSession
from starlette.websockets import WebSocketDisconnect
from support import recv

from notifier.app import create_app

MAX_BYTES = 4096
TOKEN = mint_token()
REPLY_TYPES = {"subscribed", "unsubscribed", "published", "pong", "refreshed", "error", "notification"}
ERROR_CODES = {"bad_request", "forbidden", "rate_limited", "unavailable"}

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=10), inner, max_size=4),
    max_leaves=20,
)
frame_types = st.sampled_from(["subscribe", "unsubscribe", "publish", "ping", "refresh", "nope", ""])
topics = st.text(max_size=20) | st.sampled_from(["news", "broadcast", "user:bob", "user:alice", "a" * 129])
frames = st.fixed_dictionaries(
    {"type": frame_types},
    optional={
        "topics": st.lists(topics, max_size=3) | json_values,
        "topic": topics | json_values,
        "data": json_values,
        "ref": json_values,
        "since": st.integers() | st.text(max_size=25) | json_values,
        "token": st.text(max_size=40) | json_values,
    },
)
hostile_text = (
    st.text(max_size=200)
    | json_values.map(json.dumps)
    | frames.map(json.dumps)
    | st.integers(min_value=1, max_value=5000).map(lambda depth: "[" * depth + "]" * depth)
    | st.integers(min_value=1, max_value=5000).map(lambda depth: '{"a":' * depth + "1" + "}" * depth)
)


@pytest.fixture(scope="module")
def client() -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(max_message_bytes=MAX_BYTES))) as test_client:
        yield test_client


def roundtrip(ws: WebSocketTestSession, text: str) -> list[dict[str, Any]]:
    """Send ``text``, then a ping; every frame up to the pong (the connection must stay open)."""
    ws.send_text(text)
    ws.send_text('{"type":"ping","ref":"probe"}')
    frames = []
    while True:
        frame = recv(ws)
        if frame == {"type": "pong", "ref": "probe"}:
            return frames
        frames.append(frame)


def check_reply(frame: dict[str, Any]) -> None:
    assert frame["type"] in REPLY_TYPES, frame
    if frame["type"] == "error":
        assert frame["code"] in ERROR_CODES and isinstance(frame["message"], str), frame


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(text=hostile_text)
def test_any_text_frame_gets_a_reply_or_an_error_and_the_socket_stays_open(
    client: TestClient, text: str
) -> None:
    with client.websocket_connect(f"/v1/ws?token={TOKEN}") as ws:
        assert recv(ws)["type"] == "hello"
        if len(text.encode()) > MAX_BYTES:
            ws.send_text(text)
            with pytest.raises(WebSocketDisconnect) as closed:
                recv(ws)
            assert closed.value.code == 1009
            return
        for frame in roundtrip(ws, text):
            check_reply(frame)


def test_a_thousand_garbage_frames_cost_the_sender_errors_and_nobody_else_anything(
    client: TestClient,
) -> None:
    """1,000 garbage frames from one client: it gets bad_request (or rate_limited) for each, stays
    connected, and a bystander still receives a notification published meanwhile."""
    other = mint_token(sub="bob")
    with client.websocket_connect(f"/v1/ws?token={TOKEN}") as attacker:
        with client.websocket_connect(f"/v1/ws?token={other}&topics=news") as bystander:
            assert recv(attacker)["type"] == "hello"
            assert recv(bystander)["type"] == "hello"
            garbage = ["{", "[]", "null", '{"type":42}', '{"type":"subscribe"}', "\x00\x01", "x" * 100]
            for i in range(1000):
                attacker.send_text(garbage[i % len(garbage)])
            codes = [recv(attacker)["code"] for _ in range(1000)]
            assert set(codes) <= {"bad_request", "rate_limited"}
            assert codes.count("bad_request") >= 200  # the burst allowance: 200 frames
            answer = client.post(
                "/v1/notifications",
                json={"topic": "news", "data": "still here"},
                headers={"Authorization": f"Bearer {other}"},
            )
            assert answer.status_code == 202
            assert recv(bystander)["data"] == "still here"


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(
    body=st.binary(max_size=300)
    | hostile_text.map(str.encode)
    | st.binary(min_size=MAX_BYTES + 1, max_size=MAX_BYTES + 50)
)
def test_any_post_body_gets_202_413_or_422_never_a_server_error(client: TestClient, body: bytes) -> None:
    answer = client.post(
        "/v1/notifications",
        content=body,
        headers={"Authorization": f"Bearer {TOKEN}", "content-type": "application/json"},
    )
    if len(body) > MAX_BYTES:
        assert answer.status_code == 413
    else:
        assert answer.status_code in (202, 422), (answer.status_code, body[:80])
        if answer.status_code == 422:
            assert isinstance(answer.json()["detail"], str)
    assert client.get("/healthz").status_code == 200


def test_a_binary_frame_closes_only_that_connection_with_1003(client: TestClient) -> None:
    with client.websocket_connect(f"/v1/ws?token={TOKEN}") as bystander:
        assert recv(bystander)["type"] == "hello"
        with client.websocket_connect(f"/v1/ws?token={TOKEN}") as ws:
            assert recv(ws)["type"] == "hello"
            ws.send_bytes(b"\x00\xff" * 10)
            with pytest.raises(WebSocketDisconnect) as closed:
                recv(ws)
            assert closed.value.code == 1003
        bystander.send_text('{"type":"ping"}')
        assert recv(bystander) == {"type": "pong"}
