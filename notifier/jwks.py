"""An identity provider's JSON Web Key Set: its signing keys by ``kid``, fetched over HTTP and kept fresh.

The keys are cached. A token naming an unknown ``kid`` may refetch the set (the provider rotated
its keys), at most once per ``refetch_interval``, so a flood of made-up ``kid`` values costs the
provider one request per interval. The whole set is refetched every ``refresh_interval`` (keys the
provider withdrew stop verifying then), and retried with backoff while it cannot be fetched.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
import orjson

log = logging.getLogger("notifier.jwks")

REFRESH_INTERVAL = 300.0  # seconds between two fetches of the whole set
REFETCH_INTERVAL = 10.0  # seconds: at most one fetch per interval for tokens naming an unknown kid
FETCH_TIMEOUT = 5.0  # seconds for a whole fetch, connection to last byte
MAX_BYTES = 1 << 20  # a key set is a few KiB; more is a wrong URL or a hostile server
MAX_BACKOFF = 60.0  # seconds between retries of a set that cannot be fetched
MIN_RSA_BITS = 2048  # RFC 7518 3.3; shorter RSA keys are factorable
# kty -> the one algorithm a key of that type verifies here, and the curves taken.
ALGORITHMS = {"RSA": "RS256", "EC": "ES256", "OKP": "EdDSA"}
CURVES = {"EC": ("P-256",), "OKP": ("Ed25519", "Ed448")}


class KeySetError(Exception):
    """The set could not be fetched or read; ``str()`` says why, for the log."""


@dataclass(frozen=True, slots=True, eq=False)
class Key:
    """One verification key: its ``kid``, the one algorithm it verifies, and the JWK it came from."""

    kid: str
    algorithm: str
    jwk: jwt.PyJWK
    source: dict[str, Any] = field(repr=False)


class KeySet:
    """The keys of the JWKS at ``url``; :meth:`start` fetches it, :meth:`close` stops refreshing.

    Not thread-safe: every method runs on the event loop that called :meth:`start`.
    """

    def __init__(
        self,
        url: str,
        *,
        refresh_interval: float = REFRESH_INTERVAL,
        refetch_interval: float = REFETCH_INTERVAL,
        timeout: float = FETCH_TIMEOUT,
        max_bytes: int = MAX_BYTES,
    ) -> None:
        self.url = url
        self.refresh_interval = refresh_interval
        self.refetch_interval = refetch_interval
        self.timeout = timeout
        self.max_bytes = max_bytes
        self.fetched = False  # a fetch succeeded once: tokens with an unknown kid are then just invalid
        self._keys: dict[str, Key] = {}
        self._listed: list[Any] | None = None  # the `keys` last read, to log a change only once
        self._problem: str | None = None  # why the last fetch failed (None: it succeeded)
        self._last_refetch = -math.inf
        self._fetching: asyncio.Task[bool] | None = None
        self._refresher: asyncio.Task[None] | None = None

    def get(self, kid: str) -> Key | None:
        """The cached key named ``kid``; no I/O."""
        return self._keys.get(kid)

    async def start(self) -> None:
        """Fetch the set once (failure is logged, not raised), then refresh it in the background."""
        await self._fetch()
        self._refresher = asyncio.get_running_loop().create_task(self._refresh())

    async def close(self) -> None:
        """Stop refreshing; a fetch under way is cancelled."""
        tasks = [t for t in (self._refresher, self._fetching) if t is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._refresher = self._fetching = None

    async def refetch(self) -> None:
        """A token names a key not in the cache: fetch the set again, unless that was done for
        this reason less than ``refetch_interval`` ago. Joins a fetch already under way."""
        if self._fetching is None or self._fetching.done():
            now = time.monotonic()
            if now - self._last_refetch < self.refetch_interval:
                return
            self._last_refetch = now
        await self._fetch()

    async def _fetch(self) -> bool:
        # One fetch at a time, shared by whoever asks meanwhile; shielded so that a request that
        # gives up (its client left) does not cancel the fetch the others wait for.
        if self._fetching is None or self._fetching.done():
            self._fetching = asyncio.get_running_loop().create_task(self._fetch_once())
        return await asyncio.shield(self._fetching)

    async def _refresh(self) -> None:
        backoff = 1.0
        while True:
            if self._problem is None:
                await asyncio.sleep(self.refresh_interval)
            else:
                await asyncio.sleep(min(backoff, self.refresh_interval))
                backoff = min(backoff * 2, MAX_BACKOFF)
            try:
                if await self._fetch():
                    backoff = 1.0
            except asyncio.CancelledError:
                raise
            except Exception:  # noqa: BLE001 - a bug in a fetch must not end the refreshing
                log.exception("refreshing the key set %s failed", self.url)

    async def _fetch_once(self) -> bool:
        try:
            async with asyncio.timeout(self.timeout):
                listed = _key_list(await self._download())
        except TimeoutError:
            return self._failed(f"no complete answer within {self.timeout:g} s")
        except KeySetError as exc:
            return self._failed(str(exc))
        except (httpx.HTTPError, OSError) as exc:
            return self._failed(f"{type(exc).__name__}: {exc}".removesuffix(": "))
        except Exception as exc:  # noqa: BLE001 - whoever waits on this fetch gets a 401, not a 500
            log.exception("fetching the key set %s failed", self.url)
            return self._failed(repr(exc))
        changed, self._listed = listed != self._listed, listed
        keys = self._read(listed, log_skipped=changed)
        if not keys:  # the keys cached before are kept: better than refusing every token
            kinds = ", ".join(sorted(ALGORITHMS.values()))
            return self._failed(f"no usable key (taken: {kinds} signing keys with a kid)")
        if changed or self._problem is not None:
            log.info("key set %s: %d key(s): %s", self.url, len(keys), ", ".join(map(repr, keys)))
        self._keys, self._problem, self.fetched = keys, None, True
        return True

    def _failed(self, problem: str) -> bool:
        # One line per new problem, not one per retry: an unreachable provider would flood the log.
        level = logging.DEBUG if problem == self._problem else logging.WARNING
        log.log(
            level,
            "cannot fetch the key set %s: %s (retrying; tokens needing its keys get 401)",
            self.url,
            problem,
        )
        self._problem = problem
        return False

    async def _download(self) -> bytes:
        # identity: a compressed answer would be inflated past max_bytes before it could be counted
        headers = {"accept": "application/json", "accept-encoding": "identity"}
        async with (
            httpx.AsyncClient(timeout=self.timeout, follow_redirects=False) as client,
            client.stream("GET", self.url, headers=headers) as response,
        ):
            if response.status_code != 200:
                hint = " (redirects are not followed: give the final URL)" if response.is_redirect else ""
                raise KeySetError(f"answered HTTP {response.status_code}{hint}")
            body = bytearray()
            async for chunk in response.aiter_bytes():
                body += chunk
                if len(body) > self.max_bytes:
                    raise KeySetError(f"answer over {self.max_bytes} bytes")
            return bytes(body)

    def _read(self, listed: list[Any], log_skipped: bool) -> dict[str, Key]:
        """The usable keys of a ``keys`` list; the others are skipped (and logged once)."""
        keys: dict[str, Key] = {}
        for entry in listed:
            try:
                key = self._reuse(entry) or _key(entry)
            except KeySetError as exc:
                if log_skipped:
                    log.warning("key set %s: skipping a key: %s", self.url, exc)
                continue
            if key is None:
                continue  # not a signing key of a kind taken here (an encryption key, RS512...)
            if key.kid in keys:
                if log_skipped:
                    log.warning("key set %s: skipping a second key with kid %r", self.url, key.kid)
                continue
            keys[key.kid] = key
        return keys

    def _reuse(self, entry: Any) -> Key | None:
        # The same JWK keeps the same Key, so that tokens verified with it stay remembered.
        kid = entry.get("kid") if isinstance(entry, dict) else None
        old = self._keys.get(kid) if isinstance(kid, str) else None
        return old if old is not None and old.source == entry else None


def _key_list(document: bytes) -> list[Any]:
    try:
        parsed = orjson.loads(document)
    except orjson.JSONDecodeError as exc:
        raise KeySetError(f"not JSON: {exc}") from None
    listed = parsed.get("keys") if isinstance(parsed, dict) else None
    if not isinstance(listed, list):
        raise KeySetError("not a JSON Web Key Set: no 'keys' list")
    return listed


def _key(entry: Any) -> Key | None:
    """The key of one JWK; None for a kind of key not taken here; :class:`KeySetError` if broken."""
    if not isinstance(entry, dict):
        raise KeySetError(f"not a JSON object: {str(entry)[:60]}")
    kid, kty, alg = entry.get("kid"), entry.get("kty"), entry.get("alg")
    if not isinstance(kid, str) or not kid:
        return None  # no kid: no token could name it
    algorithm = ALGORITHMS.get(kty) if isinstance(kty, str) else None
    if algorithm is None or alg not in (None, algorithm) or entry.get("use", "sig") != "sig":
        return None
    if kty in CURVES and entry.get("crv") not in CURVES[kty]:
        return None  # e.g. P-384 (ES384) or X25519 (key agreement)
    try:
        jwk = jwt.PyJWK(entry, algorithm)
    except (jwt.PyJWTError, ValueError, TypeError, KeyError) as exc:
        raise KeySetError(f"kid {kid!r}: {exc}") from None
    size = getattr(jwk.key, "key_size", None)
    if kty == "RSA" and isinstance(size, int) and size < MIN_RSA_BITS:
        raise KeySetError(f"kid {kid!r}: RSA key of {size} bits, under {MIN_RSA_BITS}")
    return Key(kid, algorithm, jwk, entry)
