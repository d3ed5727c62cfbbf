"""The OpenAPI description of the HTTP routes (what ``/docs`` and ``/openapi.json`` show): models,
examples, error answers and parameters."""

from __future__ import annotations

from typing import Any, Literal

from fastapi import Security
from fastapi.security import HTTPBearer
from pydantic import BaseModel, ConfigDict, Field

MAX_HISTORY_LIMIT = 1000
MAX_IDEMPOTENCY_KEY = 256
MAX_PUBLISH_TOPICS = 1000  # topics of one POST (``"topics": [...]``)

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
BEARER = Security(
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


def error_answer(description: str, example: str) -> dict[str, Any]:
    return {
        "model": ErrorAnswer,
        "description": description,
        "content": {"application/json": {"example": {"detail": example}}},
    }


UNAUTHORIZED = error_answer("No token, or an invalid or expired one.", "token expired") | {
    "headers": {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}}
}

PUBLISH_BODY = {
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

PUBLISH_PARAMETERS = [
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
HISTORY_PARAMETERS = [
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

