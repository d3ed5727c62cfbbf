"""Wire formats: client frames in, server frames out, and the broker envelope. orjson only here."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import orjson

TOPIC_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")  # always fullmatch: "$" would let "a\n" through
BROADCAST = "broadcast"
USER_PREFIX = "user:"

# A notification frame is built once per notification from these pieces (the Redis broker
# concatenates them inside its Lua script, where the id is assigned) and then handed, as the
# very same string, to every subscriber.
NOTIFICATION_HEAD = '{"type":"notification","id":"'

Json = Any


class BadFrame(ValueError):
    """A client frame that is not valid JSON, not an object, or of an unknown shape."""


def valid_topic(topic: object) -> TypeGuard[str]:
    return isinstance(topic, str) and TOPIC_RE.fullmatch(topic) is not None


def user_topic(sub: str) -> str:
    return USER_PREFIX + sub


def dumps(obj: Json) -> str:
    """Encode a server frame (or any JSON value) to text."""
    return orjson.dumps(obj).decode()


def loads(raw: str | bytes) -> Json:
    """Decode JSON; :class:`BadFrame` on anything that is not JSON."""
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadFrame(f"invalid JSON: {exc}") from None


def notification_tail(topic: str, data_json: bytes, ts: int) -> str:
    """Everything of a notification frame after its id: ``NOTIFICATION_HEAD + id + tail``."""
    return '","topic":' + dumps(topic) + ',"data":' + data_json.decode() + ',"ts":' + str(ts) + "}"


def ws_text_frame(payload: bytes) -> bytes:
    """``payload`` as one final, unmasked WebSocket text frame (RFC 6455 5.2), as a server sends it
    without extensions: identical for every connection, so a fan-out encodes it once."""
    n = len(payload)
    if n < 126:
        header = bytes((0x81, n))
    elif n < 65536:
        header = bytes((0x81, 126)) + n.to_bytes(2, "big")
    else:
        header = bytes((0x81, 127)) + n.to_bytes(8, "big")
    return header + payload


def sse_event(event: str, data: str, id_: str | None = None) -> bytes:
    """One Server-Sent Events event. ``data`` is a JSON text: never a line break in it."""
    head = f"id: {id_}\nevent: {event}\ndata: " if id_ is not None else f"event: {event}\ndata: "
    return (head + data + "\n\n").encode()


@dataclass(frozen=True, slots=True)
class Notification:
    """One published notification as it travels from the broker to the hub: the frame is final."""

    topic: str
    id: int
    ts: int
    frame: str
    size: int  # the frame's length in UTF-8 bytes
    wire: bytes  # the frame as one unmasked WebSocket text frame, the same bytes for every socket
    sse_bytes: bytes = field(default=b"", compare=False, repr=False)  # see ``sse``: made on first use
    sse_chunk_bytes: bytes = field(default=b"", compare=False, repr=False)  # see ``sse_chunk``

    @property
    def sse(self) -> bytes:
        """The notification as one Server-Sent Events event (``id:``, ``event:``, ``data:``), the
        same bytes for every stream: encoded once, on first use, then kept with it."""
        if not self.sse_bytes:
            object.__setattr__(self, "sse_bytes", sse_event("notification", self.frame, str(self.id)))
        return self.sse_bytes

    @property
    def sse_chunk(self) -> bytes:
        """:attr:`sse` as one chunk of a chunked HTTP/1.1 response (what a stream's direct sink
        writes, see notifier.http_edge): framed once, on first use, then kept with it."""
        if not self.sse_chunk_bytes:
            event = self.sse
            object.__setattr__(self, "sse_chunk_bytes", b"%x\r\n" % len(event) + event + b"\r\n")
        return self.sse_chunk_bytes

    def envelope(self) -> bytes:
        """The broker message: ``"<id> <ts> <frame>"``, so a node never parses the frame."""
        return f"{self.id} {self.ts} {self.frame}".encode()

    @classmethod
    def from_envelope(cls, topic: str, raw: bytes) -> Notification:
        id_, ts, frame = raw.split(b" ", 2)
        return cls(topic, int(id_), int(ts), frame.decode(), len(frame), ws_text_frame(frame))

    @classmethod
    def build(cls, id_: int, topic: str, data_json: bytes, ts: int) -> Notification:
        frame = NOTIFICATION_HEAD + str(id_) + notification_tail(topic, data_json, ts)
        payload = frame.encode()
        return cls(topic, id_, ts, frame, len(payload), ws_text_frame(payload))


@dataclass(frozen=True, slots=True)
class Accepted:
    """The answer to a publish: the id and acceptance time the broker assigned."""

    id: int
    topic: str
    ts: int
    repeated: bool = False  # the first answer again, for a repeated idempotency key

    def as_json(self) -> dict[str, Json]:
        return {"id": str(self.id), "topic": self.topic, "ts": self.ts}


@dataclass(frozen=True, slots=True)
class ClientFrame:
    """A decoded client frame: its type, its fields, and the ``ref`` to echo (if any)."""

    type: str
    body: dict[str, Json]
    ref: str | int | float | None

    def reply(self, frame: dict[str, Json]) -> dict[str, Json]:
        if self.ref is not None:
            frame["ref"] = self.ref
        return frame


def parse_client_frame(raw: str) -> ClientFrame:
    """Decode one client text frame; :class:`BadFrame` says what is wrong with it."""
    obj = loads(raw)
    if not isinstance(obj, dict):
        raise BadFrame("a frame must be a JSON object")
    ref = obj.get("ref")
    if isinstance(ref, bool) or not isinstance(ref, str | int | float):
        ref = None
    kind = obj.get("type")
    if not isinstance(kind, str):
        return ClientFrame("", obj, ref)
    return ClientFrame(kind, obj, ref)


def topic_list(value: Json, field: str = "topics") -> list[str]:
    """A list of valid, distinct topic names (order kept); :class:`BadFrame` otherwise."""
    if not isinstance(value, list) or not value:
        raise BadFrame(f"'{field}' must be a non-empty list of topic names")
    for topic in value:
        if not valid_topic(topic):
            raise BadFrame(f"invalid topic name: {str(topic)[:140]!r}")
    return list(dict.fromkeys(value))


def parse_since(value: str | None) -> int | None:
    """A notification id given by a client: a non-negative integer in decimal digits (0 asks for
    everything retained); ValueError otherwise."""
    if value is None:
        return None
    return _decimal(value, "a notification id", 0)


Positions = dict[str, int]
"""Per-topic positions: topic -> the id of the last notification of it a client received."""
Since = int | Positions
"""A recovery's ``since``: one id for every topic of the request, or per-topic positions."""
MAX_ID_DIGITS = 20


def parse_positions(value: str | None, most: int) -> Since | None:
    """``since`` of a query string: one id (applied to every topic of the request), or per-topic
    positions ``<topic>:<id>,<topic>:<id>`` (the id is what follows the *last* ``:``, as topic
    names hold ``:`` too). ValueError when malformed: one id mixed with positions, a bad topic
    name or id, a topic given twice, or more than ``most`` positions."""
    if value is None:
        return None
    if ":" not in value:
        return parse_since(value)
    items = value.split(",")
    if len(items) > most:
        raise ValueError(f"since lists {len(items)} positions; at most {most} (one a topic)")
    positions: Positions = {}
    for item in items:
        topic, colon, id_ = item.rpartition(":")
        if not colon:
            raise ValueError(
                f"not <topic>:<id>: {item[:40]!r} (one id and per-topic positions cannot be mixed)"
            )
        if not valid_topic(topic):
            raise ValueError(f"invalid topic name in since: {topic[:140]!r}")
        if topic in positions:
            raise ValueError(f"since gives {topic!r} twice")
        positions[topic] = _decimal(id_, "a notification id", 0)
    return positions


def since_from_json(value: Json, most: int) -> Since | None:
    """``since`` of a frame: absent (None), one id (a non-negative integer, or a string of its
    digits), or an object of per-topic positions ``{"<topic>": "<id>", ...}`` with at most
    ``most`` entries. :class:`BadFrame` otherwise."""
    if value is None:
        return None
    if not isinstance(value, dict):
        return _json_id(value)
    if len(value) > most:
        raise BadFrame(f"'since' lists {len(value)} positions; at most {most} (one a topic)")
    positions: Positions = {}
    for topic, id_ in value.items():
        if not valid_topic(topic):
            raise BadFrame(f"invalid topic name in 'since': {str(topic)[:140]!r}")
        positions[topic] = _json_id(id_)
    return positions


def _json_id(value: Json) -> int:
    if isinstance(value, int) and not isinstance(value, bool) and 0 <= value < 10**MAX_ID_DIGITS:
        return value
    if isinstance(value, str):
        try:
            return _decimal(value, "a notification id", 0)
        except ValueError:
            pass
    raise BadFrame("'since' must be a notification id or an object of per-topic positions")


def positive_int(value: str, what: str) -> int:
    return _decimal(value, what, 1)


def _decimal(value: str, what: str, minimum: int) -> int:
    if not value.isascii() or not value.isdigit() or len(value) > MAX_ID_DIGITS or int(value) < minimum:
        raise ValueError(f"not {what}: {value[:40]!r}")
    return int(value)


def encode_data(data: Json) -> bytes:
    """The ``data`` of a notification, decoded from a client, encoded again for its frame.

    :class:`BadFrame` when it cannot be: orjson reads 1,024 levels of nesting but writes only
    255, and the data must still encode one level down, inside its frame (a subscriber that
    decodes a frame and encodes it again, as ``notifier subscribe`` does, must not fail on it).
    """
    try:
        return orjson.dumps([data])[1:-1]
    except orjson.JSONEncodeError as exc:
        raise BadFrame(f"'data' is nested too deeply and cannot be re-encoded ({exc})") from None
