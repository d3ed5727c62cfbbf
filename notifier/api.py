"""The HTTP edge: history, administrators' disconnects, health, readiness, metrics and the demo page
(publishing: :mod:`notifier.api_publish`; the OpenAPI descriptions: :mod:`notifier.api_schema`)."""

from __future__ import annotations

from importlib import resources
from typing import Annotated, Any

from fastapi import APIRouter, HTTPException, Path, Query, Request
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, Response
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from starlette.requests import ClientDisconnect
from starlette.types import Receive

from notifier.api_schema import (
    BEARER,
    HISTORY_PARAMETERS,
    MAX_HISTORY_LIMIT,
    TOPIC_PATTERN,
    UNAUTHORIZED,
    Health,
    HistoryAnswer,
    Readiness,
    error_answer,
)
from notifier.auth import ADMIN, REVOKED, Principal, bearer
from notifier.errors import AuthError, BrokerUnavailable, Forbidden
from notifier.protocol import parse_since, positive_int, valid_topic
from notifier.services import Services

router = APIRouter()

MAX_HISTORY_BYTES = 4 << 20  # frames in one history answer; beyond, it is cut short with "more"


def services_of(request: Request) -> Services:
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


async def receive_body(receive: Receive, declared: str | None, limit: int) -> bytes:
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
    dependencies=[BEARER],
    responses={
        401: UNAUTHORIZED,
        403: error_answer("The token lacks the `admin` scope.", "token lacks the 'admin' scope"),
        422: error_answer("The body is not a JSON object as described.", "reject_tokens_issued_before: ..."),
        503: error_answer("The broker is unavailable: nothing was done.", "broker unavailable: ..."),
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
    services = services_of(request)
    principal = await authenticate(services, request.headers.get("authorization"))
    if ADMIN not in principal.scopes:
        raise HTTPException(403, "token lacks the 'admin' scope")
    raw = await receive_body(request.receive, request.headers.get("content-length"), 1024)
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
    dependencies=[BEARER],
    openapi_extra={"parameters": HISTORY_PARAMETERS},
    responses={
        401: UNAUTHORIZED,
        403: error_answer(
            "The token lacks the `subscribe` scope or may not subscribe to the topic.",
            "not allowed to subscribe to 'user:bob'",
        ),
        422: error_answer(
            "A bad topic name, `since` not a non-negative integer, or `limit` not a positive one.",
            "since must be a non-negative integer, limit a positive one: not a positive integer: 'x'",
        ),
        503: error_answer("The broker is unavailable.", "broker unavailable: redis connection lost"),
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
    services = services_of(request)
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
    node = services_of(request).node
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
    m = services_of(request).metrics
    return Response(m.render(), media_type=m.content_type)


@router.get("/", include_in_schema=False)
async def demo() -> HTMLResponse:
    return HTMLResponse(resources.files("notifier").joinpath("static/index.html").read_text())
