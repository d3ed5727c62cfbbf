"""``POST /v1/notifications``: publishing, served by :func:`publish_endpoint` straight from
:class:`notifier.app.NotifierApp` (and declared as a route for the OpenAPI schema)."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi import APIRouter, HTTPException, Request
from fastapi.responses import Response
from starlette.requests import ClientDisconnect
from starlette.types import Receive, Scope, Send

from notifier.api import authenticate, receive_body, services_of
from notifier.api_schema import (
    BEARER,
    MAX_IDEMPOTENCY_KEY,
    MAX_PUBLISH_TOPICS,
    PUBLISH_BODY,
    PUBLISH_PARAMETERS,
    UNAUTHORIZED,
    PublishAnswer,
    error_answer,
)
from notifier.auth import Principal
from notifier.errors import BrokerUnavailable, Forbidden
from notifier.protocol import Accepted, BadFrame, encode_data, valid_topic
from notifier.services import Services

router = APIRouter()

PUBLISH_PATH = "/v1/notifications"
# An ASGI extension notifier.http_edge offers on the publish route: the whole answer in one write,
# ``respond(status, headers, body) -> bool`` (False: answer with ``send`` as usual).
RESPOND_EXTENSION = "notifier.respond"
RawHeader = tuple[bytes, bytes]



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
        await receive_body(receive, length, services.settings.max_message_bytes)
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
    dependencies=[BEARER],
    openapi_extra={"requestBody": PUBLISH_BODY, "parameters": PUBLISH_PARAMETERS},
    responses={
        401: UNAUTHORIZED,
        403: error_answer(
            "The token lacks the `publish` scope, or its `topics` claim does not match the topic.",
            "not allowed to publish to 'news'",
        ),
        413: error_answer(
            "The body is over `NOTIFIER_MAX_MESSAGE_BYTES` (65536 by default).", "body over 65536 bytes"
        ),
        422: error_answer(
            "Invalid JSON, not an object, `topic` or `data` missing, a bad topic name, an "
            "`Idempotency-Key` over 256 characters, or `data` nested too deeply (about 250 levels).",
            "'topic' and 'data' are required ('data' may be null)",
        ),
        503: error_answer(
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
    status, body, headers = await publish_answer(services_of(request), request.scope, request.receive)
    answer = Response(body, status, media_type="application/json")
    answer.raw_headers.extend(headers)
    return answer

