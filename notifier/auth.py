"""Bearer tokens (JWT) -> :class:`Principal`, and what a principal may subscribe and publish.

Tokens are verified with an HS256 secret, with an identity provider's key set (RS256, ES256,
EdDSA; see :mod:`notifier.jwks`), or both. The token's ``alg`` header only chooses between the
two: HS256 goes to the secret and nowhere else, an asymmetric algorithm to the key its ``kid``
names, which must be a key for that very algorithm. So a token "signed" with a public key as an
HMAC secret, or with ``alg: none``, never verifies.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING

import jwt

from notifier.errors import AuthError, Forbidden
from notifier.jwks import ALGORITHMS, Key, KeySet
from notifier.protocol import BROADCAST, USER_PREFIX, user_topic, valid_topic

if TYPE_CHECKING:
    from jwt.algorithms import AllowedPublicKeys

log = logging.getLogger("notifier.auth")

ALGORITHM = "HS256"
ASYMMETRIC = frozenset(ALGORITHMS.values())
LEEWAY = 5  # seconds of clock skew allowed on exp, nbf and iat; no more
MIN_SECRET_BYTES = 32  # HS256 keys shorter than the hash are guessable (and PyJWT warns about them)
# The largest `exp` taken: beyond it a number no longer fits every JSON reader (2**53, JavaScript's
# safe integers), while it is still 285 million years away.
MAX_EXP = 2**53
SUBSCRIBE = "subscribe"
PUBLISH = "publish"
ADMIN = "admin"  # the admin API: disconnect a user, refuse their older tokens
REVOKED = "token revoked: an administrator refused this user's tokens issued before a given time"


@dataclass(frozen=True, slots=True)
class Principal:
    """Who a token speaks for: user id, scopes, topic patterns (None: any topic), expiry (every
    token has one), and when it was issued (``iat``, None when the token does not say)."""

    sub: str
    scopes: frozenset[str]
    topics: tuple[str, ...] | None
    exp: int
    iat: int | None = None

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


class UnknownKey(AuthError):
    """The token names a key the cached key set lacks: :meth:`TokenAuthority.authenticate` may
    refetch the set and try again."""


DEV_SECRET_HINT = (
    "this server generated its secret at start: tokens from an earlier run are not valid; "
    "mint a new one or set NOTIFIER_JWT_SECRET"
)


class TokenAuthority:
    """Verifies tokens with an HS256 ``secret``, the ``keys`` of an identity provider, or both;
    mints HS256 tokens when it has the secret.

    ``issuer`` / ``audience``: when given, every token's ``iss`` must equal it / its ``aud``
    (string or list) must contain it, and minted tokens carry them. ``dev_secret``: the secret
    was generated at start, which a token with a bad signature is told.
    """

    CACHE_SIZE = 16384  # tokens: a token and its principal, ~0.5 KiB each at most

    def __init__(
        self,
        secret: str | None,
        keys: KeySet | None = None,
        *,
        issuer: str | None = None,
        audience: str | None = None,
        dev_secret: bool = False,
    ) -> None:
        if secret is None and keys is None:
            raise ValueError("an authority needs an HS256 secret, a key set, or both")
        if secret is not None and len(secret.encode()) < MIN_SECRET_BYTES:
            raise ValueError(f"an HS256 secret must be at least {MIN_SECRET_BYTES} bytes")
        self._secret = secret
        self.keys = keys
        self.issuer, self.audience, self.dev_secret = issuer, audience, dev_secret
        required = ["sub", "exp"] + ["iss"] * (issuer is not None) + ["aud"] * (audience is not None)
        # Without an expected audience PyJWT would refuse every token that has one.
        self._options: jwt.types.Options = {"require": required, "verify_aud": audience is not None}
        # A backend POSTs with the same token again and again: an HMAC check and a JSON decode
        # per request (a tenth of a publish's CPU) are spared for a token already verified,
        # whose expiry is still checked on every use. With it, the key that verified it (None:
        # the secret): a token whose key left the set is verified again, and so refused.
        self._verified: dict[str, tuple[Principal, Key | None]] = {}

    async def start(self) -> None:
        """Fetch the key set, if any, and keep it fresh until :meth:`close`."""
        if self.keys is not None:
            if self.audience is None:
                log.warning(
                    "NOTIFIER_JWT_AUDIENCE is not set: any token signed by the key set's keys is "
                    "taken, whatever application it was issued for"
                )
            await self.keys.start()

    async def close(self) -> None:
        if self.keys is not None:
            await self.keys.close()

    async def authenticate(self, token: str | None) -> Principal:
        """:meth:`verify`, refetching the key set first if the token names a key not yet in it
        (at most once per the set's ``refetch_interval``)."""
        try:
            return self.verify(token)
        except UnknownKey:
            if self.keys is None:
                raise
            await self.keys.refetch()
        return self.verify(token)

    def verify(self, token: str | None) -> Principal:
        """The principal of a valid token, with the keys at hand (no I/O); :class:`AuthError`
        saying why otherwise (:class:`UnknownKey` when the cached key set lacks its key)."""
        if not token:
            raise AuthError("missing bearer token")
        known = self._verified.get(token)
        if known is not None:
            principal, key = known
            if key is None or (self.keys is not None and self.keys.get(key.kid) is key):
                if principal.exp > time.time() - LEEWAY:
                    return principal
                del self._verified[token]
                raise AuthError("token expired")
            del self._verified[token]  # its key was withdrawn: decode again
        principal, key = self._decode(token)
        if len(self._verified) >= self.CACHE_SIZE:
            # The oldest goes (dicts keep insertion order): a reconnect storm of more clients
            # than this still finds the most recent tokens here, not an emptied cache.
            del self._verified[next(iter(self._verified))]
        self._verified[token] = (principal, key)
        return principal

    def _decode(self, token: str) -> tuple[Principal, Key | None]:
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError as exc:
            raise AuthError(f"invalid token: {exc}") from None
        alg = header.get("alg")
        key: Key | None = None
        verifier: AllowedPublicKeys | str
        if alg == ALGORITHM and self._secret is not None:
            verifier = self._secret
        elif isinstance(alg, str) and alg in ASYMMETRIC and self.keys is not None:
            key = self._key(self.keys, header, alg)
            verifier = key.jwk.key
        else:
            taken = ([ALGORITHM] if self._secret is not None else []) + (
                sorted(ASYMMETRIC) if self.keys is not None else []
            )
            raise AuthError(
                f"invalid token: algorithm {_shown(alg)} is not accepted (only {', '.join(taken)})"
            )
        try:
            claims = jwt.decode(
                token,
                verifier,
                # One algorithm, chosen by the key: never a list the token's header could pick from.
                algorithms=[key.algorithm if key is not None else ALGORITHM],
                issuer=self.issuer,
                audience=self.audience,
                leeway=LEEWAY,
                options=self._options,
            )
        except jwt.ExpiredSignatureError:
            raise AuthError("token expired") from None
        except jwt.MissingRequiredClaimError as exc:
            raise AuthError(f"invalid token: the '{exc.claim}' claim is required") from None
        except jwt.InvalidIssuerError:
            raise AuthError(f"invalid token: 'iss' must be {self.issuer!r}") from None
        except jwt.InvalidAudienceError:
            raise AuthError(f"invalid token: 'aud' must be or contain {self.audience!r}") from None
        except jwt.InvalidSignatureError as exc:
            hint = f"; {DEV_SECRET_HINT}" if self.dev_secret and key is None else ""
            raise AuthError(f"invalid token: {exc}{hint}") from None
        except jwt.PyJWTError as exc:
            raise AuthError(f"invalid token: {exc}") from None
        return _principal(claims), key

    @staticmethod
    def _key(keys: KeySet, header: dict[str, object], alg: str) -> Key:
        kid = header.get("kid")
        if not isinstance(kid, str) or not kid:
            raise AuthError(f"invalid token: an {alg} token must name its key in a 'kid' header")
        key = keys.get(kid)
        if key is None:
            if not keys.fetched:
                raise UnknownKey(f"cannot verify the token: the key set {keys.url} could not be fetched yet")
            raise UnknownKey(f"invalid token: no key {_shown(kid)} in the key set {keys.url}")
        if key.algorithm != alg:
            raise AuthError(f"invalid token: its key {_shown(kid)} verifies {key.algorithm}, not {alg}")
        return key

    def mint(self, sub: str, scopes: list[str], topics: list[str] | None = None, *, ttl: int) -> str:
        """An HS256 token for ``sub`` that expires ``ttl`` seconds from now (there are no tokens
        without expiry), with ``iss`` / ``aud`` when the authority has them."""
        if self._secret is None:
            raise ValueError("no HS256 secret to sign with (NOTIFIER_JWT_SECRET)")
        if isinstance(ttl, bool) or not isinstance(ttl, int) or ttl < 1:
            raise ValueError(f"ttl must be a positive number of seconds (every token expires), got {ttl!r}")
        now = int(time.time())
        if now + ttl > MAX_EXP:
            raise ValueError(f"ttl must be at most {MAX_EXP - now} seconds, got {ttl}")
        claims: dict[str, object] = {"sub": sub, "scope": " ".join(scopes), "iat": now, "exp": now + ttl}
        if topics is not None:
            claims["topics"] = topics
        if self.issuer is not None:
            claims["iss"] = self.issuer
        if self.audience is not None:
            claims["aud"] = self.audience
        return jwt.encode(claims, self._secret, algorithm=ALGORITHM)


def _shown(value: object) -> str:
    """A header value an attacker chose, safe to echo: quoted and cut short."""
    return repr(str(value)[:64])


def _principal(claims: dict[str, object]) -> Principal:
    sub, topics, exp, iat = (claims.get(k) for k in ("sub", "topics", "exp", "iat"))
    if not isinstance(sub, str) or not sub:
        raise AuthError("invalid token: 'sub' must be a non-empty string")
    if not sub.isascii():
        try:
            sub.encode()  # echoed in `hello`: a lone surrogate (JSON "\ud800") cannot be sent back
        except UnicodeEncodeError:
            raise AuthError("invalid token: 'sub' must be valid Unicode text") from None
    if topics is not None and not (isinstance(topics, list) and all(isinstance(t, str) for t in topics)):
        raise AuthError("invalid token: 'topics' must be a list of glob patterns")
    if isinstance(exp, bool) or not isinstance(exp, int | float):
        raise AuthError("invalid token: 'exp' must be a number")
    if not exp <= MAX_EXP:  # echoed in `refreshed`; also catches NaN
        raise AuthError(f"invalid token: 'exp' must be at most {MAX_EXP}")
    if iat is not None and (isinstance(iat, bool) or not isinstance(iat, int | float) or not iat <= MAX_EXP):
        raise AuthError("invalid token: 'iat' must be a number")
    if iat is not None and iat > time.time() + LEEWAY:
        # PyJWT 2 refuses it too; checked here as well, for PyJWT may stop doing so (its issue #939).
        raise AuthError("invalid token: issued in the future (iat)")
    return Principal(
        sub=sub,
        scopes=_scopes(claims),
        topics=tuple(topics) if topics is not None else None,
        exp=int(exp),
        iat=int(iat) if iat is not None else None,
    )


def _scopes(claims: dict[str, object]) -> frozenset[str]:
    """``scope`` (a space-separated string) and ``scp`` (Entra ID: such a string, or a list)."""
    scope, scp = claims.get("scope"), claims.get("scp")
    if scope is not None and not isinstance(scope, str):
        raise AuthError("invalid token: 'scope' must be a space-separated string")
    words = (scope or "").split()
    if isinstance(scp, str):
        words += scp.split()
    elif isinstance(scp, list) and all(isinstance(s, str) for s in scp):
        words += scp
    elif scp is not None:
        raise AuthError("invalid token: 'scp' must be a list of strings or a space-separated string")
    return frozenset(words)


def bearer(authorization: str | None) -> str | None:
    """The token of an ``Authorization: Bearer <token>`` header, if that is what it holds."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    return token.strip() or None if scheme.lower() == "bearer" else None
