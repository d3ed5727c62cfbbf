"""A Python client: ``publish()`` over HTTP and ``subscribe()``, an async iterator that reconnects
and resumes with ``since`` so a blip loses nothing the server still holds."""

from __future__ import annotations

import asyncio
import random
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlencode

import httpx
import orjson
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus, InvalidURI


class ClientError(Exception):
    """A request the server refused, or a server that cannot be reached; ``str()`` says which."""


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail")
    except ValueError:
        detail = None
    return f"{response.status_code} {response.reason_phrase}" + (f": {detail}" if detail else "")


async def publish(
    url: str, token: str | None, topic: str, data: Any, idempotency_key: str | None = None
) -> dict[str, Any]:
    """POST one notification; the server's answer (``id``, ``topic``, ``ts``) or :class:`ClientError`."""
    headers = {"content-type": "application/json"}
    if token:
        headers["authorization"] = f"Bearer {token}"
    if idempotency_key:
        headers["idempotency-key"] = idempotency_key
    body = orjson.dumps({"topic": topic, "data": data})
    try:
        async with httpx.AsyncClient(timeout=10) as http:
            response = await http.post(url.rstrip("/") + "/v1/notifications", content=body, headers=headers)
    except httpx.HTTPError as exc:
        raise ClientError(f"cannot reach {url}: {exc or type(exc).__name__}") from None
    if response.status_code != 202:
        raise ClientError(_detail(response))
    answer: dict[str, Any] = response.json()
    return answer


def ws_url(url: str, token: str | None, topics: list[str], since: str | None) -> str:
    base = url.rstrip("/")
    if base.startswith("http"):
        base = "ws" + base[4:]
    query: dict[str, str] = {}
    if token:
        query["token"] = token
    if topics:
        query["topics"] = ",".join(topics)
    if since is not None:
        query["since"] = since
    return f"{base}/v1/ws?{urlencode(query)}"


async def subscribe(
    url: str, token: str | None, topics: list[str], since: str | None = None
) -> AsyncIterator[dict[str, Any]]:
    """Yield each notification frame of ``topics`` (plus ``broadcast`` and the user's own topic).

    Reconnects with exponential backoff and jitter, resuming after the last id seen. A refused
    handshake (403) or a server unreachable on the first attempt raises :class:`ClientError`.
    """
    connected_once, attempt = False, 0
    while True:
        try:
            async with connect(ws_url(url, token, topics, since), max_size=None) as ws:
                connected_once, attempt = True, 0
                async for raw in ws:
                    frame = orjson.loads(raw)
                    if frame.get("type") == "notification":
                        since = frame["id"]
                        yield frame
        except InvalidStatus as exc:
            status = exc.response.status_code
            if status != 503 or not connected_once:
                raise ClientError(f"handshake refused: HTTP {status}") from None
        except InvalidURI as exc:
            raise ClientError(str(exc)) from None
        except (TimeoutError, OSError, ConnectionClosed) as exc:
            if not connected_once:
                raise ClientError(f"cannot reach {url}: {exc or type(exc).__name__}") from None
        await asyncio.sleep(min(30.0, 0.5 * 2**attempt) * random.uniform(0.5, 1.0))
        attempt += 1
