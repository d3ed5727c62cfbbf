"""History and recovery as a client sees them: GET /v1/topics/{topic}/notifications and ``since``."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from conftest import Mint, make_settings
from fastapi.testclient import TestClient
from support import recv

from notifier.app import create_app


@pytest.fixture
def small() -> Iterator[TestClient]:
    with TestClient(create_app(make_settings(history_size=5))) as client:
        yield client


def auth(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def publish(client: TestClient, token: str, topic: str, count: int) -> list[str]:
    ids = []
    for i in range(count):
        answer = client.post("/v1/notifications", json={"topic": topic, "data": i}, headers=auth(token))
        assert answer.status_code == 202
        ids.append(answer.json()["id"])
    return ids


def history(client: TestClient, token: str, topic: str, **query: Any) -> Any:
    return client.get(f"/v1/topics/{topic}/notifications", params=query, headers=auth(token))


def test_without_since_the_last_limit_retained_come_oldest_first(small: TestClient, mint: Mint) -> None:
    token = mint()
    ids = publish(small, token, "news", 8)
    answer = history(small, token, "news", limit=3)
    assert answer.status_code == 200
    assert [n["id"] for n in answer.json()["notifications"]] == ids[-3:]
    everything = history(small, token, "news").json()["notifications"]
    assert [n["id"] for n in everything] == ids[-5:]  # exactly the last NOTIFIER_HISTORY_SIZE kept
    assert everything[0] == {
        "type": "notification",
        "id": ids[3],
        "topic": "news",
        "data": 3,
        "ts": everything[0]["ts"],
    }


def test_with_since_the_first_limit_after_it_come_oldest_first(small: TestClient, mint: Mint) -> None:
    token = mint()
    ids = publish(small, token, "news", 5)
    answer = history(small, token, "news", since=ids[1], limit=2)
    assert [n["id"] for n in answer.json()["notifications"]] == ids[2:4]
    assert history(small, token, "news", since=ids[-1]).json() == {"notifications": [], "more": False}


def test_limit_defaults_to_100_and_is_capped_at_1000(mint: Mint) -> None:
    token = mint()
    with TestClient(create_app(make_settings(history_size=2000))) as client:
        ids = publish(client, token, "news", 1005)
        assert len(history(client, token, "news").json()["notifications"]) == 100
        capped = history(client, token, "news", limit=5000).json()["notifications"]
        assert [n["id"] for n in capped] == ids[-1000:]


@pytest.mark.parametrize(
    "query",
    [
        {"since": "abc"},
        {"since": "-1"},
        {"limit": "0"},
        {"limit": "x"},
        {"limit": "-5"},
        {"since": "1.5"},
    ],
)
def test_a_malformed_since_or_limit_is_422(small: TestClient, mint: Mint, query: dict[str, str]) -> None:
    assert history(small, mint(), "news", **query).status_code == 422


def test_history_needs_a_valid_token_the_subscribe_scope_and_an_allowed_topic(
    small: TestClient, mint: Mint
) -> None:
    assert small.get("/v1/topics/news/notifications").status_code == 401
    assert history(small, "not-a-token", "news").status_code == 401
    assert history(small, mint(scopes=("publish",)), "news").status_code == 403
    assert history(small, mint(topics=["room:*"]), "news").status_code == 403
    assert history(small, mint(sub="alice"), "user:bob").status_code == 403
    assert history(small, mint(sub="alice"), "user:alice").status_code == 200
    assert history(small, mint(), "bad topic!").status_code in (404, 422)


def test_recovery_reaches_back_as_far_as_the_configured_history(mint: Mint) -> None:
    """NOTIFIER_HISTORY_SIZE above the endpoint's 1000 cap: a reconnect still gets all it missed."""
    token = mint()
    with TestClient(create_app(make_settings(history_size=1500))) as client:
        first = publish(client, token, "news", 1)[0]
        missed = publish(client, token, "news", 1200)
        with client.websocket_connect(f"/v1/ws?token={token}&topics=news&since={first}") as ws:
            hello = recv(ws)
            assert hello["type"] == "hello" and hello["recovered"] is True
            assert [recv(ws)["id"] for _ in missed] == missed


def test_recovery_past_the_retained_history_says_so_and_sends_what_is_left(
    small: TestClient, mint: Mint
) -> None:
    token = mint()
    ids = publish(small, token, "news", 9)
    with small.websocket_connect(f"/v1/ws?token={token}&topics=news&since={ids[0]}") as ws:
        hello = recv(ws)
        assert hello["recovered"] is False  # ids[1..3] were trimmed away
        assert [recv(ws)["id"] for _ in range(5)] == ids[4:]
