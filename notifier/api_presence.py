"""``GET /v1/topics/{topic}/presence``: who is on a topic across the deployment (see
:mod:`notifier.presence`)."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, HTTPException, Path, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from notifier.api import authenticate, services_of
from notifier.api_schema import BEARER, TOPIC_PATTERN, UNAUTHORIZED, error_answer
from notifier.errors import BrokerUnavailable, Forbidden
from notifier.presence import MAX_LISTED
from notifier.protocol import BROADCAST, valid_topic

router = APIRouter()


class PresentUser(BaseModel):
    user: str = Field(description="The user's `sub`.")
    connections: int = Field(
        description="Its connections (WebSocket or event stream) on the topic, on every instance."
    )


class PresenceAnswer(BaseModel):
    """The users with at least one connection subscribed to the topic, on any instance."""

    model_config = ConfigDict(
        json_schema_extra={
            "examples": [
                {"topic": "room:1", "count": 2, "users": [{"user": "alice", "connections": 2},
                                                          {"user": "bob", "connections": 1}]}
            ]
        }
    )
    topic: str
    count: int = Field(description="How many users are on the topic (all of them, listed or not).")
    users: list[PresentUser] = Field(description=f"Sorted by `user`; at most the first {MAX_LISTED}.")


@router.get(
    "/v1/topics/{topic}/presence",
    response_model=PresenceAnswer,
    response_description="Who is on the topic now.",
    dependencies=[BEARER],
    responses={
        401: UNAUTHORIZED,
        403: error_answer(
            "The token lacks the `subscribe` scope or may not subscribe to the topic.",
            "not allowed to subscribe to 'room:2'",
        ),
        422: error_answer("A bad topic name, or `broadcast` (every connection holds it).",
                    "broadcast has no presence: every connection holds it"),
        503: error_answer("The broker is unavailable.", "broker unavailable: redis connection lost"),
    },
    summary="Who is on a topic",
    description="The users holding at least one connection (WebSocket or event stream) subscribed "
    "to the topic on any instance, with their connection counts: right within 2 s of any "
    "subscribe, unsubscribe or disconnect; the users of an instance that died without a goodbye "
    f"are gone within 60 s. At most {MAX_LISTED} users are listed (sorted by `user`); `count` "
    "counts them all. Needs the `subscribe` scope and a topic the token may subscribe to.",
)
async def topic_presence(
    request: Request,
    topic: Annotated[
        str, Path(description="The topic's name.", json_schema_extra={"pattern": TOPIC_PATTERN})
    ],
) -> JSONResponse:
    services = services_of(request)
    principal = await authenticate(services, request.headers.get("authorization"))
    if not valid_topic(topic):
        raise HTTPException(422, "invalid topic name: must match ^[A-Za-z0-9_.:-]{1,128}$")
    if topic == BROADCAST:
        raise HTTPException(422, "broadcast has no presence: every connection holds it")
    try:
        principal.check_subscribe([topic])
    except Forbidden as exc:
        raise HTTPException(403, str(exc)) from None
    try:
        state = await services.node.presence.query(topic)
    except BrokerUnavailable as exc:
        raise HTTPException(503, f"broker unavailable: {exc}") from None
    users = [{"user": user, "connections": count} for user, count in state.users]
    return JSONResponse({"topic": topic, "count": state.count, "users": users})
