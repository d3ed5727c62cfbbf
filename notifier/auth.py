"""Bearer tokens (JWT, HS256) -> :class:`Principal`, and what a principal may subscribe and publish."""

from __future__ import annotations

import time
from dataclasses import dataclass
from fnmatch import fnmatchcase

import jwt

from notifier.errors import AuthError, Forbidden
from notifier.protocol import BROADCAST, USER_PREFIX, user_topic, valid_topic

ALGORITHM = "HS256"
MIN_SECRET_BYTES = 32  # HS256 keys shorter than the hash are guessable (and PyJWT warns about them)
# The largest `exp` taken: beyond it a number no longer fits every JSON reader (2**53, JavaScript's
# safe integers), while it is still 285 million years away.
MAX_EXP = 2**53
SUBSCRIBE = "subscribe"
PUBLISH = "publish"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a token speaks for: user id, scopes, topic patterns (None: any topic), expiry (every
    token has one)."""

    sub: str
    scopes: frozenset[str]
    topics: tuple[str, ...] | None
    exp: int

    @property
    def own_topic(self) -> str:
        return user_topic(self.sub)

    def auto_topics(self) -> list[str]:
        """The topics every connection of this principal is subscribed to, whatever its claim says."""
        own = self.own_topic
        return [BROADCAST, own] if valid_topic(own) else [BROADCAST]

    def _claim_allows(self, topic: str) -> bool:
        return self.topics is None or any(fnmatchcase(topic, p) for p in self.topics)

    def may_subscribe(self, topic: str) -> bool:
        if topic in (BROADCAST, self.own_topic):
            return True
        if topic.startswith(USER_PREFIX):
            return False  # another user's personal topic, whatever the claim says
        return self._claim_allows(topic)

    def may_publish(self, topic: str) -> bool:
        return PUBLISH in self.scopes and self._claim_allows(topic)

    def check_subscribe(self, topics: list[str]) -> None:
        if SUBSCRIBE not in self.scopes:
            raise Forbidden("token lacks the 'subscribe' scope")
        for topic in topics:
            if not self.may_subscribe(topic):
                raise Forbidden(f"not allowed to subscribe to {topic!r}")

    def check_publish(self, topic: str) -> None:
        if PUBLISH not in self.scopes:
            raise Forbidden("token lacks the 'publish' scope")
        if not self._claim_allows(topic):
            raise Forbidden(f"not allowed to publish to {topic!r}")


class TokenAuthority:
    """Verifies and mints tokens with one HS256 secret."""

    CACHE_SIZE = 4096

    def __init__(self, secret: str) -> None:
        if len(secret.encode()) < MIN_SECRET_BYTES:
            raise ValueError(f"an HS256 secret must be at least {MIN_SECRET_BYTES} bytes")
        self._secret = secret
        # A backend POSTs with the same token again and again: an HMAC check and a JSON decode
        # per request (a tenth of a publish's CPU) are spared for a token already verified,
        # whose expiry is still checked on every use.
        self._verified: dict[str, Principal] = {}

    def verify(self, token: str | None) -> Principal:
        """The principal of a valid token; :class:`AuthError` saying why otherwise."""
        if not token:
            raise AuthError("missing bearer token")
        known = self._verified.get(token)
        if known is not None:
            if known.exp > time.time():
                return known
            del self._verified[token]
            raise AuthError("token expired")
        principal = self._decode(token)
        if len(self._verified) >= self.CACHE_SIZE:
            self._verified.clear()
        self._verified[token] = principal
        return principal

    def _decode(self, token: str) -> Principal:
        try:
            claims = jwt.decode(
                token, self._secret, algorithms=[ALGORITHM], options={"require": ["sub", "exp"]}
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"invalid token: the '{exc.claim}' claim is required") from None
        except jwt.PyJWTError as exc:
            raise AuthError(f"invalid token: {exc}") from None
        return _principal(claims)

    def mint(self, sub: str, scopes: list[str], topics: list[str] | None = None, *, ttl: int) -> str:
        """A token for ``sub`` that expires ``ttl`` seconds from now: there are no tokens without expiry."""
        if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < 1:
            raise ValueError(f"ttl must be a positive number of seconds (every token expires), got {ttl!r}")
        now = int(time.time())
        if now + ttl > MAX_EXP:
            raise ValueError(f"ttl must be at most {MAX_EXP - now} seconds, got {ttl}")
        claims: dict[str, object] = {"sub": sub, "scope": " ".join(scopes), "iat": now, "exp": now + ttl}
        if topics is not None:
            claims["topics"] = topics
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM)


def _principal(claims: dict[str, object]) -> Principal:
    sub, scope, topics, exp = (claims.get(k) for k in ("sub", "scope", "topics", "exp"))
    if not isinstance(sub, str) or not sub:
        raise AuthError("invalid token: 'sub' must be a non-empty string")
    if not sub.isascii():
        try:
            sub.encode()  # echoed in `hello`: a lone surrogate (JSON "\ud800") cannot be sent back
        except UnicodeEncodeError:
            raise AuthError("invalid token: 'sub' must be valid Unicode text") from None
    if scope is not None and not isinstance(scope, str):
        raise AuthError("invalid token: 'scope' must be a space-separated string")
    if topics is not None and not (isinstance(topics, list) and all(isinstance(t, str) for t in topics)):
        raise AuthError("invalid token: 'topics' must be a list of glob patterns")
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        raise AuthError("invalid token: 'exp' must be a number")
    if not exp <= MAX_EXP:  # echoed in `refreshed`; also catches NaN
        raise AuthError(f"invalid token: 'exp' must be at most {MAX_EXP}")
    return Principal(
        sub=sub,
        scopes=frozenset((scope or "").split()),
        topics=tuple(topics) if topics is not None else None,
        exp=int(exp),
    )


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, if that is what it holds."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None
