"""``GET /v1/sse`` in the OpenAPI schema (``/docs``).

:class:`notifier.app.NotifierApp` hands the stream straight to :func:`notifier.sse.sse_endpoint`;
this route declares it for the schema and serves it the same way when reached through FastAPI's
router (an app mounted under another one, say).
"""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from starlette.types import Receive, Scope, Send

from notifier.api import services_of
from notifier.api_schema import error_answer
from notifier.services import Services
from notifier.sse import SSE_PATH, sse_endpoint

router = APIRouter()

_EXAMPLE = (
    'event: hello\ndata: {"type":"hello","session":"s1","user":"alice","topics":["broadcast","news",'
    '"user:alice"]}\n\nid: 1796019041112458\nevent: notification\ndata: {"type":"notification",'
    '"id":"1796019041112458","topic":"news","data":{"n":1},"ts":1796019041112}\n\n: ping\n\n'
)
_PARAMETERS = [
    {
        "name": "topics",
        "in": "query",
        "required": False,
        "description": "Comma-separated topic names, besides the automatic `broadcast` and `user:<sub>`.",
        "schema": {"type": "string"},
        "example": "news,room:lobby",
    },
    {
        "name": "since",
        "in": "query",
        "required": False,
        "description": "Recover what was missed: one notification id for every topic, or per-topic "
        "positions `<topic>:<id>,...`. A `Last-Event-ID` header wins over it.",
        "schema": {"type": "string"},
    },
    {
        "name": "token",
        "in": "query",
        "required": False,
        "description": "The JWT, for clients that cannot set `Authorization` (`EventSource`).",
        "schema": {"type": "string"},
    },
    {
        "name": "presence",
        "in": "query",
        "required": False,
        "description": "`1`: also `join` / `leave` events of the requested topics.",
        "schema": {"type": "string", "enum": ["0", "1"]},
    },
    {
        "name": "Last-Event-ID",
        "in": "header",
        "required": False,
        "description": "The id of the last notification received (`EventSource` sends it when it "
        "reconnects): read as `since`.",
        "schema": {"type": "string", "pattern": "^[0-9]{1,20}$"},
    },
]


class _EventStream(Response):
    """The stream, answered by :func:`notifier.sse.sse_endpoint` itself."""

    media_type = "text/event-stream"

    def __init__(self, services: Services) -> None:
        super().__init__()
        self.services = services

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await sse_endpoint(self.services, scope, receive, send)


@router.get(
    SSE_PATH,
    response_class=_EventStream,
    status_code=200,
    openapi_extra={"parameters": _PARAMETERS},
    responses={
        200: {
            "description": "The stream: `hello`, then one event per notification, a `: ping` "
            "comment every 15 s.",
            "content": {"text/event-stream": {"schema": {"type": "string"}, "example": _EXAMPLE}},
        },
        403: error_answer("A bad token, scope, topic, `since` or `Last-Event-ID`.", "token expired"),
        429: error_answer(
            "The user already holds `NOTIFIER_MAX_CONNECTIONS_PER_USER` connections here.",
            "this user already holds 100 connections on this instance",
        ),
        503: error_answer("The instance is full, draining, busy, or its broker is unavailable.",
                    "instance is draining"),
    },
    summary="Receive notifications as Server-Sent Events",
    description="The WebSocket's stream for clients and proxies without WebSockets "
    "(`EventSource`, `curl -N`): the same topics, recovery, limits and refusals. Each "
    "notification is an event with `id:` (its id), `event: notification` and the notification "
    "frame as `data`. A stream is read-only; where a WebSocket would be closed, the response ends.",
)
async def event_stream(request: Request) -> Response:
    return _EventStream(services_of(request))
