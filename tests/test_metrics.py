"""The contract's Prometheus metrics, read from ``/metrics`` after known traffic."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from typing import Any

from conftest import Mint, make_settings
from fastapi import FastAPI
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families
from starlette.testclient import WebSocketTestSession
from starlette.websockets import WebSocketDisconnect
from support import recv, wait_until

from notifier.app import create_app

URL = "/v1/notifications"
DROPPED_SLOW = 'notifier_notifications_dropped_total{reason="slow_consumer"}'


def samples(client: TestClient) -> dict[str, float]:
    """Every sample of /metrics as ``name{label="value",...}`` -> value."""
    response = client.get("/metrics")
    assert response.status_code == 200
    found: dict[str, float] = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            found[sample.name + (f"{{{labels}}}" if labels else "")] = sample.value
    return found


def metric(client: TestClient, name: str) -> float:
    return samples(client)[name]


def eventually(client: TestClient, name: str, expected: float, timeout: float = 5.0) -> None:
    """Wait (polling /metrics) until ``name`` shows ``expected``; fail with the last value seen."""
    try:
        wait_until(lambda: metric(client, name) == expected, timeout, f"{name} == {expected}")
    except TimeoutError:
        assert metric(client, name) == expected


@contextmanager
def subscribers(
    client: TestClient, mint: Mint, count: int, topics: str
) -> Iterator[list[WebSocketTestSession]]:
    with ExitStack() as stack:
        sockets = []
        for i in range(count):
            ws = stack.enter_context(
                client.websocket_connect(f"/v1/ws?token={mint(sub=f'u{i}')}&topics={topics}")
            )
            assert recv(ws)["type"] == "hello"
            sockets.append(ws)
        yield sockets


@contextmanager
def app_client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as test_client:
        yield test_client


def publish(
    client: TestClient, token: str, topic: str, data: Any = None, key: str | None = None
) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {token}"}
    if key is not None:
        headers["Idempotency-Key"] = key
    response = client.post(URL, json={"topic": topic, "data": data}, headers=headers)
    assert response.status_code == 202, response.text
    answer: dict[str, Any] = response.json()
    return answer


def test_a_fresh_instance_shows_every_contract_metric_at_rest(client: TestClient) -> None:
    found = samples(client)
    assert found["notifier_connections"] == 0
    assert found["notifier_notifications_published_total"] == 0
    assert found["notifier_notifications_delivered_total"] == 0
    assert found[DROPPED_SLOW] == 0
    assert found["notifier_delivery_latency_seconds_count"] == 0
    assert found["notifier_broker_connected"] == 1


def test_connections_counts_open_sockets_and_falls_back_when_they_close(
    client: TestClient, mint: Mint
) -> None:
    with subscribers(client, mint, 3, "news"):
        assert metric(client, "notifier_connections") == 3
    eventually(client, "notifier_connections", 0)


def test_published_counts_accepted_posts_and_ws_publishes_but_not_repeats_or_refusals(
    client: TestClient, mint: Mint
) -> None:
    token = mint()
    for i in range(4):
        publish(client, token, "news", i)
    publish(client, token, "news", "once", key="k")
    publish(client, token, "news", "once", key="k")  # repeated key: not accepted again
    refused = client.post(
        URL, json={"topic": "news", "data": 1}, headers={"Authorization": f"Bearer {mint(ttl=-5)}"}
    )
    assert refused.status_code == 401
    with subscribers(client, mint, 1, "news") as (ws,):
        ws.send_json({"type": "publish", "topic": "other", "data": 1})
        assert recv(ws)["type"] == "published"
    assert metric(client, "notifier_notifications_published_total") == 6


def test_delivered_counts_notification_frames_written_to_every_subscriber(
    client: TestClient, mint: Mint
) -> None:
    posts, subs = 5, 3
    token = mint(sub="publisher")
    with subscribers(client, mint, subs, "news") as sockets:
        for i in range(posts):
            publish(client, token, "news", i)
        publish(client, token, "elsewhere", "nobody listens")
        for ws in sockets:
            assert [recv(ws)["data"] for _ in range(posts)] == list(range(posts))
            ws.send_json({"type": "ping"})  # replies and hello are no notifications
            assert recv(ws)["type"] == "pong"
        eventually(client, "notifier_notifications_delivered_total", posts * subs)
        eventually(client, "notifier_delivery_latency_seconds_count", posts * subs)
    assert metric(client, "notifier_notifications_published_total") == posts + 1


def test_recovered_notifications_count_as_delivered(client: TestClient, mint: Mint) -> None:
    token = mint()
    seen = publish(client, token, "news", 0)
    for i in (1, 2):
        publish(client, token, "news", i)
    with client.websocket_connect(f"/v1/ws?token={token}&topics=news&since={seen['id']}") as ws:
        assert recv(ws)["type"] == "hello"
        assert [recv(ws)["data"] for _ in range(2)] == [1, 2]
        eventually(client, "notifier_notifications_delivered_total", 2)


def test_latency_histogram_observes_delivered_frames(client: TestClient, mint: Mint) -> None:
    token = mint()
    with subscribers(client, mint, 2, "news") as sockets:
        publish(client, token, "news", 1)
        for ws in sockets:
            recv(ws)
        eventually(client, "notifier_notifications_delivered_total", 2)
        found = samples(client)
        count = found["notifier_delivery_latency_seconds_count"]
        assert 0 < count <= 2  # the histogram may be sampled
        assert found['notifier_delivery_latency_seconds_bucket{le="+Inf"}'] == count
        assert 0 <= found["notifier_delivery_latency_seconds_sum"] < 60


def test_a_slow_consumer_closed_with_pending_notifications_counts_them_as_dropped(mint: Mint) -> None:
    with app_client(create_app(make_settings(send_queue_bytes=1024))) as client:
        token = mint()
        with client.websocket_connect(f"/v1/ws?token={token}&topics=news") as ws:
            assert recv(ws)["type"] == "hello"
            publish(client, token, "news", "x" * 2000)
            try:
                frame = recv(ws)
                raise AssertionError(f"expected the socket to be closed, got {frame}")
            except WebSocketDisconnect as closed:
                assert closed.code == 1013
        assert metric(client, DROPPED_SLOW) == 1
        assert metric(client, "notifier_notifications_delivered_total") == 0


def test_broker_connected_is_1_with_a_working_broker(client: TestClient) -> None:
    assert metric(client, "notifier_broker_connected") == 1
