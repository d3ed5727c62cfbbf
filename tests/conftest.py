from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import jwt
import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient
from pydantic import SecretStr
from support import RedisServer

from notifier.app import create_app
from notifier.settings import Settings

SECRET = "test-secret-0123456789abcdef0123456789abcdef"

Mint = Callable[..., str]


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def secret() -> str:
    return SECRET


def make_settings(**overrides: Any) -> Settings:
    """Settings for a test: nothing from the environment or a .env file, memory broker by default."""
    values: dict[str, Any] = {"jwt_secret": SecretStr(SECRET), "broker_url": "memory://"}
    values.update(overrides)
    return Settings(_env_file=None, **values)


def mint_token(
    sub: str = "alice",
    scopes: tuple[str, ...] = ("subscribe", "publish"),
    topics: list[str] | None = None,
    ttl: float | None = 3600,
    secret: str = SECRET,
    **claims: Any,
) -> str:
    payload: dict[str, Any] = {"sub": sub, "scope": " ".join(scopes), **claims}
    if topics is not None:
        payload["topics"] = topics
    if ttl is not None:
        payload["exp"] = int(time.time() + ttl)
    return jwt.encode(payload, secret, algorithm="HS256")


@pytest.fixture
def mint() -> Mint:
    return mint_token


@pytest.fixture
def app() -> FastAPI:
    return create_app(make_settings())


@pytest.fixture
def client(app: FastAPI) -> Iterator[TestClient]:
    with TestClient(app) as test_client:
        yield test_client


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    server.start()
    yield server
    server.stop()
