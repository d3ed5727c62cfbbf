"""Domain errors and the catalogue of close codes; the edges map these to HTTP and WebSocket codes."""

from __future__ import annotations

from enum import IntEnum


class CloseCode(IntEnum):
    """Every WebSocket close code the server sends, with the contract's meaning."""

    NORMAL = 1000
    GOING_AWAY = 1001  # instance shutting down: reconnect elsewhere
    UNSUPPORTED_DATA = 1003  # binary frame
    POLICY_VIOLATION = 1008  # token expired during the session
    MESSAGE_TOO_BIG = 1009  # frame over NOTIFIER_MAX_MESSAGE_BYTES
    SERVICE_RESTART = 1012  # no gapless stream could be guaranteed: reconnect with positions
    TRY_AGAIN_LATER = 1013  # client too slow: outbound queue overflowed
    DISCONNECTED_BY_ADMIN = 4403  # an administrator disconnected this user: do not reconnect as is


class ErrorCode:
    """The ``code`` of an ``error`` frame."""

    BAD_REQUEST = "bad_request"
    FORBIDDEN = "forbidden"
    LIMIT_EXCEEDED = "limit_exceeded"
    RATE_LIMITED = "rate_limited"
    UNAVAILABLE = "unavailable"


class NotifierError(Exception):
    """Base of the domain errors."""


class AuthError(NotifierError):
    """No token, or a token that is invalid or expired (HTTP 401 / handshake 403)."""


class Forbidden(NotifierError):
    """A valid principal asking for something its scopes or topics do not allow (HTTP 403)."""


class LimitExceeded(NotifierError):
    """A per-client limit would be passed (topics per connection): ``limit_exceeded``, nothing done."""


class BrokerUnavailable(NotifierError):
    """The broker cannot take the operation now (HTTP 503 / ``unavailable``); nothing was accepted."""
