"""The Python client: publish over HTTP, subscribe over a WebSocket that reconnects and resumes.

::

    import asyncio
    from notifier.client import Client

    async def main() -> None:
        async with Client("http://127.0.0.1:8000", token) as client:
            await client.publish("news", {"title": "hello"})
            async for notification in client.subscribe(["news"]):
                print(notification["id"], notification["data"])

    asyncio.run(main())

:meth:`Client.subscribe` yields notification frames forever: when the connection drops (a
draining instance closes with 1001, a slow consumer gets 1013, the network fails...) it
reconnects with exponential backoff and jitter and passes its per-topic positions
(``since=<topic>:<last id seen of it>,...``), so nothing the deployment still retains is
missed. It stops with :class:`ClientError` only when going on cannot help: the server refused
the token or a topic (401/403), or the very first connection could not be made. With
``presence=True`` it also yields the ``join`` / ``leave`` frames of its topics, and
:meth:`Client.presence` says who is there now. The module-level :func:`publish`,
:func:`subscribe` and :func:`presence` are one-call shortcuts.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import random
import time
from collections.abc import AsyncGenerator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from types import TracebackType
from typing import Any
from urllib.parse import quote, urlencode, urlsplit

import httpx
import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

log = logging.getLogger("notifier.client")

DEFAULT_URL = "http://127.0.0.1:8000"
TOKEN_EXPIRED = 1008  # the server's close code for a token that expired during the session
UNAVAILABLE = 503  # draining or full instance, broker down: worth another try
Frame = dict[str, Any]
PRESENCE_FRAMES = ("join", "leave")
TokenSource = Callable[[], Awaitable[str]]
Since = str | int | Mapping[str, str | int]
"""Where a subscription resumes: one id (for every topic) or per-topic positions ``{topic: id}``."""


class ClientError(Exception):
    """A request the server refused, or a server that cannot be reached; ``str()`` says which.

    ``status`` is the HTTP status (of the POST, or of the refused WebSocket handshake) when
    there was one, ``detail`` the server's own reason (its JSON ``detail``) when it gave one.
    """

    def __init__(self, message: str, status: int | None = None, detail: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.detail = detail


@dataclass(frozen=True)
class PresentUser:
    """One user present on a topic, with how many of its connections are subscribed to it."""

    user: str
    connections: int


@dataclass(frozen=True)
class Presence:
    """Who is subscribed to ``topic`` on any instance of the deployment (:meth:`Client.presence`).

    ``users`` are sorted by user and hold at most 1000 of them; ``count`` is how many there are
    in all (more than ``len(users)`` when the list was cut short).
    """

    topic: str
    count: int
    users: tuple[PresentUser, ...]


# -- HTTP --------------------------------------------------------------------------------------


class Client:
    """One notifier deployment, reached at ``url`` with a bearer ``token``.

    ``get_token``, if given, is awaited for a fresh token whenever the current one is about to
    expire: the HTTP requests use the new one and open subscriptions send it as a ``refresh``
    frame, so they outlive the token they started with. Use it as an async context manager, or
    call :meth:`aclose`, to release the HTTP connection pool.
    """

    def __init__(
        self,
        url: str = DEFAULT_URL,
        token: str | None = None,
        *,
        get_token: TokenSource | None = None,
        timeout: float = 10.0,
    ) -> None:
        self.url = http_url(url)
        self.token = token
        self.get_token = get_token
        self.timeout = timeout
        self._http: httpx.AsyncClient | None = None

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the HTTP connection pool (subscriptions close on their own)."""
        if self._http is not None:
            await self._http.aclose()
            self._http = None

    async def publish(self, topic: str, data: Any, *, idempotency_key: str | None = None) -> Frame:
        """Publish one notification; the server's answer ``{"id", "topic", "ts"}``.

        ``data`` is any JSON value (``None`` too). With ``idempotency_key``, a retry that repeats
        the key within 5 minutes gets the first answer again and delivers nothing twice, so a
        publish that timed out can be retried safely. Raises :class:`ClientError`.
        """
        headers = {"content-type": "application/json"}
        if idempotency_key is not None:
            headers["idempotency-key"] = idempotency_key
        try:
            body = orjson.dumps({"topic": topic, "data": data})
        except orjson.JSONEncodeError as exc:  # too deeply nested, or not JSON at all
            raise ClientError(f"data cannot be sent as JSON: {exc}") from None
        response = await self._request("POST", "/v1/notifications", content=body, headers=headers)
        if response.status_code != 202:
            raise _refused(response)
        answer: Frame = response.json()
        return answer

    async def history(
        self, topic: str, *, since: str | int | None = None, limit: int | None = None
    ) -> list[Frame]:
        """Retained notifications of ``topic``, oldest first (needs the subscribe scope).

        With ``since``: the first ``limit`` after that id; without: the last ``limit``.
        """
        params = {k: str(v) for k, v in (("since", since), ("limit", limit)) if v is not None}
        response = await self._request("GET", f"/v1/topics/{topic}/notifications", params=params)
        if response.status_code != 200:
            raise _refused(response)
        notifications: list[Frame] = response.json()["notifications"]
        return notifications

    async def disconnect_user(self, sub: str, *, reject_tokens_issued_before: int | None = None) -> None:
        """Close every connection of user ``sub`` on every instance (they get 4403); with
        ``reject_tokens_issued_before`` (unix seconds), refuse that user's tokens issued before
        it for 24 h. Needs the ``admin`` scope. Raises :class:`ClientError`."""
        body = {} if reject_tokens_issued_before is None else {
            "reject_tokens_issued_before": reject_tokens_issued_before
        }
        path = f"/v1/users/{quote(sub, safe='')}/disconnect"
        response = await self._request("POST", path, json=body)
        if response.status_code != 202:
            raise _refused(response)

    async def presence(self, topic: str) -> Presence:
        """The users subscribed to ``topic`` now, on every instance, with their connection counts
        (needs the subscribe scope and the topic allowed; ``broadcast`` is refused with 422).
        Live changes come as ``join`` / ``leave`` frames of ``subscribe(..., presence=True)``.
        Raises :class:`ClientError`."""
        response = await self._request("GET", f"/v1/topics/{quote(topic, safe=':')}/presence")
        if response.status_code != 200:
            raise _refused(response)
        try:
            answer = response.json()
            users = tuple(PresentUser(str(u["user"]), int(u["connections"])) for u in answer["users"])
            return Presence(str(answer["topic"]), int(answer["count"]), users)
        except (ValueError, TypeError, KeyError, AttributeError) as exc:
            raise ClientError(f"unexpected answer from {self.url}: {_reason(exc)}", 200) from None

    def subscribe(
        self,
        topics: Iterable[str] = (),
        *,
        since: Since | None = None,
        presence: bool = False,
        min_delay: float = 0.5,
        max_delay: float = 30.0,
    ) -> Subscription:
        """Notifications of ``topics`` (plus ``broadcast`` and the token's own ``user:<sub>``).

        See :class:`Subscription`; ``since`` resumes after that id (every topic), or each topic
        after its own position (``{topic: id}``, e.g. a saved :attr:`Subscription.positions`);
        ``presence`` adds the ``join`` / ``leave`` frames of ``topics``.
        """
        return Subscription(
            self.url, self.token, topics, since, presence=presence,
            get_token=self.get_token, min_delay=min_delay, max_delay=max_delay, open_timeout=self.timeout,
        )  # fmt: skip

    async def _request(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        if self.get_token is not None and _expires_within(self.token, 5.0):
            self.token = await self.get_token()
        headers: dict[str, str] = kwargs.pop("headers", {})
        if self.token:
            headers["authorization"] = f"Bearer {self.token}"
        if self._http is None:
            self._http = httpx.AsyncClient(timeout=self.timeout)
        try:
            return await self._http.request(method, self.url + path, headers=headers, **kwargs)
        except (httpx.HTTPError, httpx.InvalidURL) as exc:
            raise ClientError(f"cannot reach {self.url}: {_reason(exc)}") from None


async def disconnect_user(url: str, token: str | None, sub: str, reject_before: int | None = None) -> None:
    """Shortcut for ``Client(url, token).disconnect_user(...)`` (admin scope)."""
    async with Client(url, token) as client:
        await client.disconnect_user(sub, reject_tokens_issued_before=reject_before)


async def publish(
    url: str, token: str | None, topic: str, data: Any, idempotency_key: str | None = None
) -> Frame:
    """POST one notification; the server's answer (``id``, ``topic``, ``ts``) or :class:`ClientError`."""
    async with Client(url, token) as client:
        return await client.publish(topic, data, idempotency_key=idempotency_key)


def subscribe(
    url: str, token: str | None, topics: Iterable[str], since: Since | None = None, *, presence: bool = False
) -> Subscription:
    """Shortcut for ``Client(url, token).subscribe(topics, since=since, presence=presence)``."""
    return Subscription(url, token, topics, since, presence=presence)


async def presence(url: str, token: str | None, topic: str) -> Presence:
    """Shortcut for ``Client(url, token).presence(topic)``."""
    async with Client(url, token) as client:
        return await client.presence(topic)


# -- WebSocket ---------------------------------------------------------------------------------


class Subscription:
    """An async iterator of notification frames that survives disconnections.

    Each frame is the server's ``{"type": "notification", "id", "topic", "data", "ts"}``; with
    ``presence``, also its ``{"type": "join" | "leave", "topic", "user"}`` frames: a user's first
    connection to one of ``topics`` anywhere in the deployment, its last one gone (never about
    the token's own user). Every connection asks for them (``presence=1``); what changed while
    disconnected is not replayed: after a reconnect, :meth:`Client.presence` tells the state.
    After a drop it reconnects (backoff from ``min_delay`` doubling to ``max_delay``, with
    jitter) with its per-topic :attr:`positions` as ``since=<topic>:<id>,...``, so the server
    replays what was missed of each topic, oldest first, before live notifications: no gap, no
    duplicate, as far as history reaches (:attr:`recovered` is False when it did not reach far
    enough).

    ``since`` starts the first connection after one id (every topic), or each topic after its
    own position (``{topic: id}``; a topic without one starts live, without recovery).

    Raises :class:`ClientError` when the server refuses the token or a topic (HTTP 401/403
    handshake, or a 1008 close for an expired token with no ``get_token``), or when the first
    connection cannot be made. A 503 (instance draining or full, broker down) is retried.
    Close it with :meth:`aclose` or ``async with``; breaking out of ``async for`` and
    cancellation close the socket too.
    """

    def __init__(
        self,
        url: str,
        token: str | None,
        topics: Iterable[str] = (),
        since: Since | None = None,
        *,
        presence: bool = False,
        get_token: TokenSource | None = None,
        min_delay: float = 0.5,
        max_delay: float = 30.0,
        open_timeout: float = 10.0,
    ) -> None:
        self.url = url
        self.token = token
        self.requested = list(topics)
        self.presence = presence
        self.get_token = get_token
        self.min_delay, self.max_delay, self.open_timeout = min_delay, max_delay, open_timeout
        self.positions: dict[str, str] = {}
        """Per topic, the id of the newest notification of it yielded (or the position it was
        last resumed from): where the next resume starts, sent as ``since=<topic>:<id>,...``."""
        self.last_id: str | None = None
        """The id of the newest notification yielded on any topic (or the one ``since`` given)."""
        self._first: str | None = None  # the one id of the first connection's ``since``
        if isinstance(since, str) and ":" in since:  # "<topic>:<id>,...", as the query has it
            since = dict(item.rpartition(":")[::2] for item in since.split(","))
        if isinstance(since, Mapping):
            self.positions = {str(topic): str(id_) for topic, id_ in since.items()}
        elif since is not None:
            self.last_id = self._first = str(since)
        self._sent: dict[str, str] = {}  # the positions the current connection resumed from
        self.recovered: bool | None = None
        """``hello.recovered`` of the last connection that resumed, None before any resume."""
        self.session: str | None = None
        self.topics: list[str] = []
        """Every topic of the current connection, automatic ones included (from ``hello``)."""
        self.connected = asyncio.Event()
        """Set while a connection is open and its ``hello`` has arrived."""
        self.connections = 0
        """How many connections reached ``hello`` so far."""
        self._attempt = 0  # failures since the last hello: the backoff exponent
        self._frames = self._run()

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> Frame:
        return await self._frames.__anext__()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close the connection and stop; iterating afterwards ends at once."""
        await self._frames.aclose()

    async def _run(self) -> AsyncGenerator[Frame, None]:
        while True:
            if self.get_token is not None and _expires_within(self.token, 1.0):
                await self._renew()
            since = self._resume()
            url = ws_url(self.url, self.token, self.requested, since, presence=self.presence)
            closed: tuple[int, str] | None = None
            why = ""
            try:
                async with connect(url, max_size=None, open_timeout=self.open_timeout) as ws:
                    refresher = asyncio.create_task(self._refresh(ws)) if self.get_token else None
                    try:
                        async for raw in ws:
                            frame: Frame = orjson.loads(raw)
                            kind = frame.get("type")
                            if kind == "notification":
                                id_, topic = frame["id"], frame["topic"]
                                if _after(id_, self.last_id):
                                    self.last_id = id_
                                if _after(id_, self.positions.get(topic)):
                                    self.positions[topic] = id_
                                yield frame
                            elif kind in PRESENCE_FRAMES:
                                yield frame
                            elif kind == "hello":
                                self._hello(frame)
                            elif kind == "error":
                                log.warning("server error: %s: %s", frame.get("code"), frame.get("message"))
                    finally:
                        self.connected.clear()
                        if refresher is not None:
                            refresher.cancel()
                            await asyncio.gather(refresher, return_exceptions=True)
                closed = (ws.close_code or 1006, ws.close_reason or "")
            except ConnectionClosed as exc:  # an abnormal close (1006, 1008, 1013...)
                closed = (exc.rcvd.code, exc.rcvd.reason) if exc.rcvd is not None else (1006, "")
            except InvalidStatus as exc:
                status, detail = exc.response.status_code, _detail(exc.response.body)
                why = f"handshake refused: HTTP {status}" + (f": {detail}" if detail else "")
                if status != UNAVAILABLE and (status < 500 or not self.connections):
                    raise ClientError(why, status, detail) from None
            except InvalidURI as exc:
                raise ClientError(f"invalid URL {self.url!r}: {exc}") from None
            except (OSError, TimeoutError, InvalidHandshake) as exc:
                if not self.connections:
                    raise ClientError(f"cannot reach {self.url}: {_reason(exc)}") from None
                why = f"cannot reach {self.url}: {_reason(exc)}"
            if closed is not None:
                why = await self._closed(*closed)
            await self._backoff(why)

    async def _closed(self, code: int, reason: str) -> str:
        """After a close: why, for the log; raises when reconnecting cannot help."""
        if code == TOKEN_EXPIRED:
            if self.get_token is None:
                raise ClientError(f"token expired: the server closed the connection ({code})")
            await self._renew()
        return f"connection closed ({code}{' ' + reason if reason else ''})"

    async def _backoff(self, why: str) -> None:
        delay = min(self.max_delay, self.min_delay * 2**self._attempt) * random.uniform(0.5, 1.0)
        self._attempt += 1
        if self.positions:
            after = f" (resuming from the positions of {len(self.positions)} topics)"
        else:
            after = f" (resuming after id {self.last_id})" if self.last_id else ""
        log.warning("%s; reconnecting in %.1f s%s", why, delay, after)
        await asyncio.sleep(delay)

    def _resume(self) -> str | dict[str, str] | None:
        """The ``since`` of the next handshake: the one id given, for the first connection;
        else a position for each topic of the connection. A topic with none of its own (nothing
        received on it yet, not even a replay) resumes from the newest id received on any topic,
        which is exact when ids increase across topics (one broker); with no id at all, it is
        subscribed live. Remembered in ``_sent``: :meth:`_hello` makes them the positions."""
        if self._first is not None and not self.connections:
            self._sent = {}
            return self._first
        if not self.connections:  # positions given, or none: as they are
            self._sent = dict(self.positions)
            return self._sent or None
        topics = dict.fromkeys([*self.topics, *self.requested])
        sent = {t: self.positions[t] for t in topics if t in self.positions}
        if self.last_id is not None:
            for topic in topics:
                sent.setdefault(topic, self.last_id)
        self._sent = sent
        return sent or None

    def _hello(self, frame: Frame) -> None:
        self.session = frame.get("session")
        self.topics = list(frame.get("topics", []))
        self.connections += 1
        self._attempt = 0
        # Every topic now resumes from where this connection started it (positions of topics
        # no longer held are dropped), until a notification of it moves it on.
        resumed = dict.fromkeys(self.topics, self._first) if self._first is not None else self._sent
        self.positions = {
            t: position
            for t in self.topics
            if (position := self.positions.get(t) or resumed.get(t)) is not None
        }
        self._first = None
        if "recovered" in frame:
            self.recovered = bool(frame["recovered"])
            if not self.recovered:
                log.warning("some notifications after the positions resumed from were no longer "
                            "retained: not all recovered")  # fmt: skip
        self.connected.set()

    async def _renew(self) -> None:
        if self.get_token is None:
            return
        try:
            self.token = await self.get_token()
        except Exception as exc:  # noqa: BLE001 - the caller's callback: report, never crash the loop
            raise ClientError(f"get_token failed: {_reason(exc)}") from exc

    async def _refresh(self, ws: ClientConnection) -> None:
        """Send a fresh token shortly before the current one expires, again and again."""
        while True:
            exp = _token_exp(self.token)
            if exp is None:
                return
            left = exp - time.time()
            await asyncio.sleep(max(0.0, left - min(60.0, max(1.0, left / 5))))
            old = self.token
            try:
                await self._renew()
            except ClientError as exc:
                log.warning("%s; retrying in 5 s", exc)
            if self.token == old:
                await asyncio.sleep(5)  # nothing new: the server closes with 1008 at exp if it stays so
                continue
            await ws.send(orjson.dumps({"type": "refresh", "token": self.token}).decode())


def http_url(url: str) -> str:
    """The base URL of a deployment for HTTP requests: ``url`` (http(s):// or ws(s)://) as http(s)://."""
    base = url.strip().rstrip("/")
    parts = urlsplit(base)
    scheme = parts.scheme.lower()
    if scheme not in ("http", "https", "ws", "wss") or not parts.netloc:
        raise ClientError(f"invalid URL {url!r}: must be http://HOST[:PORT] (https://, ws://, wss:// too)")
    return {"ws": "http", "wss": "https"}.get(scheme, scheme) + base[len(scheme) :]


def ws_url(
    url: str, token: str | None, topics: Iterable[str], since: Since | None, *, presence: bool = False
) -> str:
    """The WebSocket URL of a deployment at ``url`` (http(s):// or ws(s)://) with the query:
    ``since`` one id, or per-topic positions sent as ``<topic>:<id>,<topic>:<id>``; ``presence=1``
    when asked."""
    base = "ws" + http_url(url)[len("http") :]
    query: dict[str, str] = {}
    if token:
        query["token"] = token
    topics = list(topics)
    if topics:
        query["topics"] = ",".join(topics)
    if isinstance(since, Mapping):
        if since:
            query["since"] = ",".join(f"{topic}:{id_}" for topic, id_ in since.items())
    elif since is not None:
        query["since"] = str(since)
    if presence:
        query["presence"] = "1"
    return f"{base}/v1/ws?{urlencode(query)}"


# -- helpers -----------------------------------------------------------------------------------


def _after(new: str, last: str | None) -> bool:
    """Ids are decimal strings: compare them as integers, never as strings."""
    return last is None or int(new) > int(last)


def _token_exp(token: str | None) -> float | None:
    """The ``exp`` claim of a JWT, read without checking the signature (that is the server's job)."""
    if not token:
        return None
    try:
        payload = token.split(".")[1]
        claims = orjson.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
        exp = claims.get("exp")
    except (IndexError, ValueError, AttributeError):
        return None
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None


def _expires_within(token: str | None, seconds: float) -> bool:
    exp = _token_exp(token)
    return exp is not None and exp - time.time() < seconds


def _refused(response: httpx.Response) -> ClientError:
    """A refused request as an error carrying the server's own reason."""
    detail = _detail(response.content)
    status = f"{response.status_code} {response.reason_phrase}"
    return ClientError(status + (f": {detail}" if detail else ""), response.status_code, detail)


def _detail(body: bytes | bytearray | None) -> str | None:
    """The ``detail`` of a JSON error body (ours; FastAPI's validation errors are a list)."""
    try:
        detail = orjson.loads(body or b"").get("detail")
    except (orjson.JSONDecodeError, AttributeError):
        return None
    if not detail:
        return None
    return detail if isinstance(detail, str) else orjson.dumps(detail).decode()


def _reason(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
