"""The HTTP edge: publishing, health, readiness, metrics and the demo page."""

from __future__ import annotations

from importlib import resources
from typing import Annotated, Any, Literal

import orjson
from fastapi import APIRouter, HTTPException, Path, Query, Request, Security
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from notifier.auth import ADMIN, REVOKED, Principal, bearer
from notifier.errors import AuthError, BrokerUnavailable, Forbidden
from notifier.protocol import Accepted, BadFrame, encode_data, parse_since, positive_int, valid_topic
from notifier.services import Services

router = APIRouter()

PUBLISH_PATH = "/v1/notifications"
# An ASGI extension notifier.http_edge offers on the publish route: the whole answer in one write,
# ``respond(status, headers, body) -> bool`` (False: answer with ``send`` as usual).
RESPOND_EXTENSION = "notifier.respond"
RawHeader = tuple[bytes, bytes]

MAX_IDEMPOTENCY_KEY = 256
MAX_PUBLISH_TOPICS = 1000  # topics of one POST (``"topics": [...]``)
MAX_HISTORY_LIMIT = 1000
MAX_HISTORY_BYTES = 4 << 20  # frames in one history answer; beyond, it is cut short with "more"

# -- the OpenAPI description of the routes (what /docs and /openapi.json show) -------------------

TOPIC_PATTERN = r"^[A-Za-z0-9_.:-]{1,128}$"
_EXAMPLE_ID = "1764460800123456"
_EXAMPLE_TS = 1764460800123
_ID_MEANING = (
    "The notification's id: a string of decimal digits. Ids of one topic increase strictly in "
    "publish order; compare them as integers, never as strings."
)

# Declares the bearer token for the schema (the Authorize button of /docs). Routes check the token
# themselves (``authenticate``), so this never refuses anything on its own.
_BEARER = Security(
    HTTPBearer(
        auto_error=False,
        scheme_name="bearer",
        bearerFormat="JWT",
        description="A JWT with `sub`, `exp` and a `scope` of `publish` and/or `subscribe`.",
    )
)


class PublishAnswer(BaseModel):
    """The notification as accepted: it is on its way to every subscriber of its topic."""

    model_config = ConfigDict(
        json_schema_extra={"examples": [{"id": _EXAMPLE_ID, "topic": "news", "ts": _EXAMPLE_TS}]}
    )
    id: str = Field(description=_ID_MEANING)
    topic: str
    ts: int = Field(description="Acceptance time, unix milliseconds.")


class NotificationFrame(BaseModel):
    """One notification, exactly as a WebSocket subscriber receives it."""

    type: Literal["notification"]
    id: str = Field(description=_ID_MEANING)
    topic: str
    data: Any = Field(description="The published data: any JSON value, null included.")
    ts: int = Field(description="Acceptance time, unix milliseconds.")


class HistoryAnswer(BaseModel):
    """Retained notifications of one topic."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {
                    "notifications": [
                        {
                            "type": "notification",
                            "id": _EXAMPLE_ID,
                            "topic": "news",
                            "data": {"title": "hello"},
                            "ts": _EXAMPLE_TS,
                        }
                    ],
                    "more": False,
                }
            ]
        }
    )
    notifications: list[NotificationFrame] = Field(description="Oldest first.")
    more: bool = Field(
        description="True when the answer was cut short at 4 MiB of frames: with `since`, ask again "
        "with `since` set to the last id received; without it, older ones exist."
    )


class ErrorAnswer(BaseModel):
    """Every error answer of the HTTP API."""

    detail: str = Field(description="What is wrong, in one sentence.")


class Health(BaseModel):
    status: Literal["ok"]


class Readiness(BaseModel):
    broker_connected: bool = Field(description="The broker is connected and this instance subscribed.")
    draining: bool = Field(description="The instance is shutting down (SIGTERM): it takes no new sockets.")


def _error(description: str, example: str) -> dict[str, Any]:
    return {
        "model": ErrorAnswer,
        "description": description,
        "content": {"application/json": {"example": {"detail": example}}},
    }


_UNAUTHORIZED = _error("No token, or an invalid or expired one.", "token expired") | {
    "headers": {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}}
}

_PUBLISH_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "oneOf": [
                    {
                        "type": "object",
                        "title": "one topic",
                        "required": ["topic", "data"],
                        "properties": {
                            "topic": {
                                "type": "string",
                                "pattern": TOPIC_PATTERN,
                                "description": "The topic to publish to (letters, digits, `_ . : -`; "
                                "1 to 128). Answered `{\"id\", \"topic\", \"ts\"}`.",
                            },
                            "data": {"description": "Any JSON value, null allowed: delivered as is."},
                        },
                    },
                    {
                        "type": "object",
                        "title": "many topics",
                        "required": ["topics", "data"],
                        "properties": {
                            "topics": {
                                "type": "array",
                                "items": {"type": "string", "pattern": TOPIC_PATTERN},
                                "minItems": 1,
                                "maxItems": MAX_PUBLISH_TOPICS,
                                "uniqueItems": True,
                                "description": "1 to 1000 distinct topics, each receiving the same data. "
                                "Answered `{\"notifications\": [{\"id\", \"topic\", \"ts\"}, ...]}` in "
                                "this order (with one broker the ids increase in it too).",
                            },
                            "data": {"description": "Any JSON value, null allowed: delivered as is."},
                        },
                    },
                ]
            },
            "examples": {
                "object": {
                    "summary": "a notification to a topic",
                    "value": {"topic": "news", "data": {"title": "hello"}},
                },
                "personal": {
                    "summary": "to every connection of user alice",
                    "value": {"topic": "user:alice", "data": {"text": "your export is ready"}},
                },
            },
        }
    },
}

_PUBLISH_PARAMETERS = [
    {
        "name": "Idempotency-Key",
        "in": "header",
        "required": False,
        "description": "1 to 256 characters. Repeated by the same user (`sub`) within 5 minutes, "
        "through any instance, it gets the first answer again (same id) and publishes nothing twice: "
        "retry a POST with the same key.",
        "schema": {"type": "string", "minLength": 1, "maxLength": MAX_IDEMPOTENCY_KEY},
    }
]

# ``since`` and ``limit`` are read as text and checked by hand, so that a malformed value gets the
# API's usual 422 ``{"detail": "..."}``; the schema says what they really are.
_HISTORY_PARAMETERS = [
    {
        "name": "since",
        "in": "query",
        "required": False,
        "description": "A notification id (decimal digits; `0`: everything retained). The answer "
        "holds the first `limit` retained notifications with an id greater than it. Without it: "
        "the last `limit` retained.",
        "schema": {
            "anyOf": [{"type": "integer", "minimum": 0}, {"type": "string", "pattern": "^[0-9]{1,20}$"}]
        },
        "example": _EXAMPLE_ID,
    },
    {
        "name": "limit",
        "in": "query",
        "required": False,
        "description": f"At most this many notifications (larger values count as {MAX_HISTORY_LIMIT}).",
        "schema": {"type": "integer", "minimum": 1, "maximum": MAX_HISTORY_LIMIT, "default": 100},
    },
]


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


async def authenticate(services: Services, authorization: str | None) -> Principal:
    """The principal of a bearer token header; 401 with ``WWW-Authenticate`` otherwise."""
    try:
        principal = await services.authority.authenticate(bearer(authorization))
    except AuthError as exc:
        raise HTTPException(401, str(exc), headers={"WWW-Authenticate": "Bearer"}) from None
    if services.node.rejected(principal):
        raise HTTPException(401, REVOKED, headers={"WWW-Authenticate": "Bearer"})
    return principal


async def _receive_body(receive: Receive, declared: str | None, limit: int) -> bytes:
    """The request body from the ASGI channel; 413 as soon as it is known to exceed ``limit``."""
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise HTTPException(413, f"body over {limit} bytes")
    body = bytearray()
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            raise ClientDisconnect()
        body += message.get("body", b"")
        if len(body) > limit:
            raise HTTPException(413, f"body over {limit} bytes")
        if not message.get("more_body", False):
            return bytes(body)


def _parse_notification(body: bytes) -> tuple[str | list[str], bytes]:
    """``(topic, data as JSON)`` of a publish body, or ``(topics, data as JSON)`` for the form
    ``{"topics": [...], "data": ...}``; 422 saying what is wrong otherwise."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise HTTPException(422, f"invalid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise HTTPException(422, "the body must be a JSON object with 'topic' and 'data'")
    topic: str | list[str]
    if "topics" in obj:
        topic = _topic_list(obj)
    elif "topic" not in obj or "data" not in obj:
        raise HTTPException(422, "'topic' and 'data' are required ('data' may be null)")
    else:
        topic = obj["topic"]
        if not valid_topic(topic):
            raise HTTPException(422, "invalid topic name: must match ^[A-Za-z0-9_.:-]{1,128}$")
    try:
        return topic, encode_data(obj["data"])
    except BadFrame as exc:
        raise HTTPException(422, str(exc)) from None


def _topic_list(obj: dict[str, Any]) -> list[str]:
    """The ``topics`` of a publish body to many topics; 422 saying what is wrong otherwise."""
    if "topic" in obj:
        raise HTTPException(422, "give either 'topic' or 'topics', not both")
    if "data" not in obj:
        raise HTTPException(422, "'topics' and 'data' are required ('data' may be null)")
    topics = obj["topics"]
    if not isinstance(topics, list) or not 0 < len(topics) <= MAX_PUBLISH_TOPICS:
        raise HTTPException(422, f"'topics' must be a list of 1 to {MAX_PUBLISH_TOPICS} topic names")
    for topic in topics:
        if not valid_topic(topic):
            raise HTTPException(
                422, f"invalid topic name {str(topic)[:140]!r}: must match ^[A-Za-z0-9_.:-]{{1,128}}$"
            )
    if len(set(topics)) != len(topics):
        raise HTTPException(422, "'topics' names a topic more than once")
    return topics


async def _publish(services: Services, scope: Scope, receive: Receive) -> Accepted | list[Accepted]:
    authorization = key = length = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            authorization = value.decode("latin-1")
        elif name == b"idempotency-key":
            key = value.decode("latin-1")
        elif name == b"content-length":
            length = value.decode("latin-1")
    principal = await authenticate(services, authorization)
    if "publish" not in principal.scopes:
        raise HTTPException(403, "token lacks the 'publish' scope")
    if key is not None and not (0 < len(key) <= MAX_IDEMPOTENCY_KEY):
        raise HTTPException(422, f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters")
    topic, data_json = _parse_notification(
        await _receive_body(receive, length, services.settings.max_message_bytes)
    )
    if isinstance(topic, list):
        return await _publish_many(services, principal, topic, data_json, key)
    try:
        principal.check_publish(topic)
    except Forbidden as exc:
        raise HTTPException(403, str(exc)) from None
    try:
        return await services.node.publish(principal, topic, data_json, key)
    except BrokerUnavailable as exc:
        raise HTTPException(503, f"broker unavailable, nothing accepted: {exc}") from None


async def _publish_many(
    services: Services, principal: Principal, topics: list[str], data_json: bytes, key: str | None
) -> list[Accepted]:
    try:
        for topic in topics:  # every one allowed, or nothing published
            principal.check_publish(topic)
    except Forbidden as exc:
        raise HTTPException(403, f"{exc}; nothing published") from None
    try:
        return await services.node.publish_many(principal, topics, data_json, key)
    except BrokerUnavailable as exc:
        retry = "some may have been accepted: retry with the same Idempotency-Key"
        raise HTTPException(503, f"broker unavailable, {retry}: {exc}") from None


async def publish_answer(
    services: Services, scope: Scope, receive: Receive
) -> tuple[int, bytes, list[RawHeader]]:
    """``POST /v1/notifications`` as (status, JSON body, extra headers): 202 and the accepted
    notification, or the error and ``{"detail": ...}`` as FastAPI would answer it."""
    try:
        accepted = await _publish(services, scope, receive)
    except HTTPException as exc:
        headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in (exc.headers or {}).items()]
        return exc.status_code, orjson.dumps({"detail": exc.detail}), headers
    if isinstance(accepted, list):
        return 202, orjson.dumps({"notifications": [a.as_json() for a in accepted]}), []
    return 202, orjson.dumps(accepted.as_json()), []


async def publish_endpoint(services: Services, scope: Scope, receive: Receive, send: Send) -> None:
    """The publish route as a bare ASGI endpoint: the hot path of every notification skips
    FastAPI's middleware, routing and dependency machinery (see ``NotifierApp``)."""
    try:
        status, body, headers = await publish_answer(services, scope, receive)
    except ClientDisconnect:
        return
    headers.append((b"content-type", b"application/json"))
    respond = scope.get("extensions", {}).get(RESPOND_EXTENSION)
    if respond is not None and respond(status, headers, body):
        return
    headers.append((b"content-length", b"%d" % len(body)))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@router.post(
    PUBLISH_PATH,
    status_code=202,
    response_model=PublishAnswer,
    response_description="Accepted: on its way to every subscriber of the topic, on every instance.",
    dependencies=[_BEARER],
    openapi_extra={"requestBody": _PUBLISH_BODY, "parameters": _PUBLISH_PARAMETERS},
    responses={
        401: _UNAUTHORIZED,
        403: _error(
            "The token lacks the `publish` scope, or its `topics` claim does not match the topic.",
            "not allowed to publish to 'news'",
        ),
        413: _error(
            "The body is over `NOTIFIER_MAX_MESSAGE_BYTES` (65536 by default).", "body over 65536 bytes"
        ),
        422: _error(
            "Invalid JSON, not an object, `topic` or `data` missing, a bad topic name, an "
            "`Idempotency-Key` over 256 characters, or `data` nested too deeply (about 250 levels).",
            "'topic' and 'data' are required ('data' may be null)",
        ),
        503: _error(
            "The broker is unavailable (answered within about 3 s). Nothing was accepted (for a "
            "`topics` list: some may have been; retry with the same `Idempotency-Key`).",
            "broker unavailable, nothing accepted: redis connection lost",
        ),
    },
    summary="Publish a notification",
    description="Publishes `data` to `topic`: every connection subscribed to the topic, on every "
    "instance, receives it as a `notification` frame, and it is kept in the topic's history for "
    "recovery. Needs a token with the `publish` scope whose `topics` claim (if any) matches the "
    "topic. Publishing to `user:<sub>` reaches every connection of that user; to `broadcast`, "
    "every connection.",
)
async def publish(request: Request) -> Response:
    # Declared here for the OpenAPI schema; NotifierApp serves POSTs by publish_endpoint.
    status, body, headers = await publish_answer(_services(request), request.scope, request.receive)
    answer = Response(body, status, media_type="application/json")
    answer.raw_headers.extend(headers)
    return answer


class Disconnect(BaseModel):
    """The optional body of ``POST /v1/users/{sub}/disconnect``."""

    model_config = ConfigDict(extra="forbid")

    reject_tokens_issued_before: int | None = Field(
        None,
        ge=0,
        strict=True,
        description="Unix seconds: for 24 h, every instance refuses this user's tokens issued "
        "before it (or without `iat`): handshakes get 403, requests 401.",
        examples=[1767225600],
    )


@router.post(
    "/v1/users/{sub}/disconnect",
    status_code=202,
    dependencies=[_BEARER],
    responses={
        401: _UNAUTHORIZED,
        403: _error("The token lacks the `admin` scope.", "token lacks the 'admin' scope"),
        422: _error("The body is not a JSON object as described.", "reject_tokens_issued_before: ..."),
        503: _error("The broker is unavailable: nothing was done.", "broker unavailable: ..."),
    },
    summary="Disconnect a user everywhere",
    description="Within 2 s, every connection of user `sub` on every instance is closed with "
    "WebSocket close code 4403 (do not reconnect with the same token). With "
    "`reject_tokens_issued_before`, that user's older tokens are refused for 24 h, cluster-wide. "
    "Needs the `admin` scope.",
)
async def disconnect_user(
    request: Request,
    sub: Annotated[str, Path(description="The user id: the `sub` of that user's tokens.", max_length=256)],
) -> JSONResponse:
    services = _services(request)
    principal = await authenticate(services, request.headers.get("authorization"))
    if ADMIN not in principal.scopes:
        raise HTTPException(403, "token lacks the 'admin' scope")
    raw = await _receive_body(request.receive, request.headers.get("content-length"), 1024)
    try:
        body = Disconnect.model_validate_json(raw if raw.strip() else b"{}")
    except ValidationError as exc:
        error = exc.errors()[0]
        where = ".".join(str(part) for part in error["loc"]) or "body"
        raise HTTPException(422, f"{where}: {error['msg']}") from None
    try:
        await services.node.disconnect_user(sub, body.reject_tokens_issued_before)
    except BrokerUnavailable as exc:
        raise HTTPException(503, f"broker unavailable, nothing done: {exc}") from None
    return JSONResponse({}, status_code=202)


@router.get(
    "/v1/topics/{topic}/notifications",
    response_model=HistoryAnswer,
    response_description="The retained notifications asked for, oldest first.",
    dependencies=[_BEARER],
    openapi_extra={"parameters": _HISTORY_PARAMETERS},
    responses={
        401: _UNAUTHORIZED,
        403: _error(
            "The token lacks the `subscribe` scope or may not subscribe to the topic.",
            "not allowed to subscribe to 'user:bob'",
        ),
        422: _error(
            "A bad topic name, `since` not a non-negative integer, or `limit` not a positive one.",
            "since must be a non-negative integer, limit a positive one: not a positive integer: 'x'",
        ),
        503: _error("The broker is unavailable.", "broker unavailable: redis connection lost"),
    },
    summary="Read a topic's history",
    description="The notifications the deployment still retains for a topic (the last "
    "`NOTIFIER_HISTORY_SIZE`, published within `NOTIFIER_HISTORY_TTL`), oldest first, as the "
    "frames a subscriber receives. With `since`: the first `limit` after that id; without: the "
    "last `limit`. One answer holds at most 4 MiB of frames (`more` says when it was cut short). "
    "Needs the `subscribe` scope and a topic the token may subscribe to.",
)
async def topic_history(
    request: Request,
    topic: Annotated[
        str,
        Path(description="The topic's name.", json_schema_extra={"pattern": TOPIC_PATTERN}),
    ],
    since: Annotated[str | None, Query(include_in_schema=False)] = None,
    limit: Annotated[str, Query(include_in_schema=False)] = "100",
) -> Response:
    services = _services(request)
    principal = await authenticate(services, request.headers.get("authorization"))
    if not valid_topic(topic):
        raise HTTPException(422, "invalid topic name: must match ^[A-Za-z0-9_.:-]{1,128}$")
    try:
        after = parse_since(since)
        count = min(positive_int(limit, "a positive integer"), MAX_HISTORY_LIMIT)
    except ValueError as exc:
        detail = f"since must be a non-negative integer, limit a positive one: {exc}"
        raise HTTPException(422, detail) from None
    try:
        principal.check_subscribe([topic])
    except Forbidden as exc:
        raise HTTPException(403, str(exc)) from None
    node = services.node
    # A few answers are built at once (each at most MAX_HISTORY_BYTES of frames, read from the
    # broker in chunks); the others wait their turn, so the instance holds a bounded amount.
    async with node.history_gate:
        try:
            history = await node.history(topic, after, count, MAX_HISTORY_BYTES)
        except BrokerUnavailable as exc:
            raise HTTPException(503, f"broker unavailable: {exc}") from None
        # The frames are final JSON already: join them rather than decode and encode again.
        frames = ",".join(n.frame for n in history.notifications)
        more = b"true" if history.more else b"false"
        del history
        body = b'{"notifications":[' + frames.encode() + b'],"more":' + more + b"}"
    return Response(body, media_type="application/json")


@router.get(
    "/healthz",
    response_model=Health,
    summary="Liveness",
    description="200 as long as the process serves requests (also while draining or without a broker).",
)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Readiness,
    response_description="Ready: the broker is connected and the instance is not draining.",
    responses={
        503: {
            "model": Readiness,
            "description": "Not ready: the broker is unreachable, or the instance is draining.",
            "content": {"application/json": {"example": {"broker_connected": False, "draining": False}}},
        }
    },
    summary="Readiness",
    description="Whether this instance should get traffic: 200 when its broker is connected and "
    "subscribed and it is not draining, else 503 (a load balancer takes it out of rotation).",
)
async def readyz(request: Request) -> JSONResponse:
    node = _services(request).node
    body: dict[str, Any] = {"broker_connected": node.broker.connected, "draining": node.draining}
    return JSONResponse(body, status_code=200 if node.ready else 503)


@router.get(
    "/metrics",
    response_class=PlainTextResponse,
    responses={200: {"description": "Prometheus text exposition format."}},
    summary="Prometheus metrics",
    description="The metrics of this instance only (scrape every instance): connections, "
    "notifications published, delivered and dropped, delivery latency, broker state, handshakes.",
)
async def metrics(request: Request) -> Response:
    m = _services(request).metrics
    return Response(m.render(), media_type=m.content_type)


@router.get("/", include_in_schema=False)
async def demo() -> HTMLResponse:
    return HTMLResponse(resources.files("notifier").joinpath("static/index.html").read_text())
