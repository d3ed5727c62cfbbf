"""The HTTP edge: publishing, health, readiness, metrics and the demo page."""

from __future__ import annotations

from importlib import resources
from typing import Any

import orjson
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import HTMLResponse, JSONResponse, Response
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from notifier.auth import Principal, bearer
from notifier.errors import AuthError, BrokerUnavailable, Forbidden
from notifier.protocol import Accepted, BadFrame, encode_data, parse_since, positive_int, valid_topic
from notifier.services import Services

router = APIRouter()

PUBLISH_PATH = "/v1/notifications"
RawHeader = tuple[bytes, bytes]

MAX_IDEMPOTENCY_KEY = 256
MAX_HISTORY_LIMIT = 1000
MAX_HISTORY_BYTES = 4 << 20  # frames in one history answer; beyond, it is cut short with "more"

_PUBLISH_BODY = {
    "required": True,
    "content": {
        "application/json": {
            "schema": {
                "type": "object",
                "required": ["topic", "data"],
                "properties": {
                    "topic": {"type": "string", "pattern": r"^[A-Za-z0-9_.:-]{1,128}$"},
                    "data": {"description": "any JSON value, null allowed"},
                },
            },
            "example": {"topic": "news", "data": {"title": "hello"}},
        }
    },
}


def _services(request: Request) -> Services:
    services: Services = request.app.state.services
    return services


def authenticate(services: Services, authorization: str | None) -> Principal:
    """The principal of a bearer token header; 401 with ``WWW-Authenticate`` otherwise."""
    try:
        return services.authority.verify(bearer(authorization))
    except AuthError as exc:
        raise HTTPException(401, str(exc), headers={"WWW-Authenticate": "Bearer"}) from None


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


def _parse_notification(body: bytes) -> tuple[str, bytes]:
    """``(topic, data as JSON)`` of a publish body; 422 saying what is wrong otherwise."""
    try:
        obj = orjson.loads(body)
    except orjson.JSONDecodeError as exc:
        raise HTTPException(422, f"invalid JSON: {exc}") from None
    if not isinstance(obj, dict):
        raise HTTPException(422, "the body must be a JSON object with 'topic' and 'data'")
    if "topic" not in obj or "data" not in obj:
        raise HTTPException(422, "'topic' and 'data' are required ('data' may be null)")
    topic = obj["topic"]
    if not valid_topic(topic):
        raise HTTPException(422, "invalid topic name: must match ^[A-Za-z0-9_.:-]{1,128}$")
    try:
        return topic, encode_data(obj["data"])
    except BadFrame as exc:
        raise HTTPException(422, str(exc)) from None


async def _publish(services: Services, scope: Scope, receive: Receive) -> Accepted:
    authorization = key = length = None
    for name, value in scope["headers"]:
        if name == b"authorization":
            authorization = value.decode("latin-1")
        elif name == b"idempotency-key":
            key = value.decode("latin-1")
        elif name == b"content-length":
            length = value.decode("latin-1")
    principal = authenticate(services, authorization)
    if "publish" not in principal.scopes:
        raise HTTPException(403, "token lacks the 'publish' scope")
    if key is not None and not (0 < len(key) <= MAX_IDEMPOTENCY_KEY):
        raise HTTPException(422, f"Idempotency-Key must be 1 to {MAX_IDEMPOTENCY_KEY} characters")
    topic, data_json = _parse_notification(
        await _receive_body(receive, length, services.settings.max_message_bytes)
    )
    try:
        principal.check_publish(topic)
    except Forbidden as exc:
        raise HTTPException(403, str(exc)) from None
    try:
        return await services.node.publish(principal, topic, data_json, key)
    except BrokerUnavailable as exc:
        raise HTTPException(503, f"broker unavailable, nothing accepted: {exc}") from None


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
    return 202, orjson.dumps(accepted.as_json()), []


async def publish_endpoint(services: Services, scope: Scope, receive: Receive, send: Send) -> None:
    """The publish route as a bare ASGI endpoint: the hot path of every notification skips
    FastAPI's middleware, routing and dependency machinery (see ``NotifierApp``)."""
    try:
        status, body, headers = await publish_answer(services, scope, receive)
    except ClientDisconnect:
        return
    headers += [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body))]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


@router.post(
    PUBLISH_PATH,
    status_code=202,
    openapi_extra={"requestBody": _PUBLISH_BODY},
    responses={
        401: {"description": "no, invalid or expired token"},
        403: {"description": "scope or topic not allowed"},
        413: {"description": "body over NOTIFIER_MAX_MESSAGE_BYTES"},
        422: {"description": "invalid JSON, missing topic or data, bad topic name"},
        503: {"description": "broker unavailable; nothing accepted"},
    },
    summary="Publish a notification to every subscriber of a topic, on every instance",
)
async def publish(request: Request) -> Response:
    """Declares the route for the OpenAPI schema; ``NotifierApp`` serves it by ``publish_endpoint``."""
    status, body, headers = await publish_answer(_services(request), request.scope, request.receive)
    answer = Response(body, status, media_type="application/json")
    answer.raw_headers.extend(headers)
    return answer


@router.get(
    "/v1/topics/{topic}/notifications",
    responses={
        401: {"description": "no, invalid or expired token"},
        403: {"description": "no subscribe scope, or topic not allowed"},
        422: {"description": "bad topic name, malformed since or limit"},
        503: {"description": "broker unavailable"},
    },
    summary="Retained notifications of a topic, oldest first",
)
async def topic_history(
    request: Request, topic: str, since: str | None = None, limit: str = "100"
) -> Response:
    """The first ``limit`` retained with id > ``since``; without ``since``, the last ``limit`` retained."""
    services = _services(request)
    principal = authenticate(services, request.headers.get("authorization"))
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


@router.get("/healthz", summary="200 while the process serves")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="200 when the broker is connected and the instance is not draining")
async def readyz(request: Request) -> JSONResponse:
    node = _services(request).node
    body: dict[str, Any] = {"broker_connected": node.broker.connected, "draining": node.draining}
    return JSONResponse(body, status_code=200 if node.ready else 503)


@router.get("/metrics", summary="Prometheus metrics of this instance", include_in_schema=True)
async def metrics(request: Request) -> Response:
    m = _services(request).metrics
    return Response(m.render(), media_type=m.content_type)


@router.get("/", include_in_schema=False)
async def demo() -> HTMLResponse:
    return HTMLResponse(resources.files("notifier").joinpath("static/index.html").read_text())
