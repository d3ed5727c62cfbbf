"""Configuration: the only module that reads the environment (prefix ``NOTIFIER_``, ``.env`` honoured)."""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import SplitResult, urlsplit

from pydantic import Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from notifier.auth import MIN_SECRET_BYTES

ENV_PREFIX = "NOTIFIER_"
BROKER_SCHEMES = ("memory://", "redis://", "rediss://", "redis+sentinel://", "redis+cluster://")


class ConfigError(Exception):
    """Configuration that cannot run; ``str()`` is one line naming the variable."""


def _host_and_port(url: str) -> SplitResult:
    """``url`` split; ValueError unless it names a host and a valid (or no) port."""
    parsed = urlsplit(url)
    try:
        parsed.port  # noqa: B018 - raises ValueError on a bad port
    except ValueError:
        raise ValueError("the port must be a number from 0 to 65535") from None
    if not parsed.hostname:
        raise ValueError("names no host")
    return parsed


class Settings(BaseSettings):
    """Everything an instance needs to run; built by :func:`load_settings`, never at import time."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_file=".env", extra="ignore")

    broker_url: str = "memory://"
    # HS256 secret. Unset with no JWKS URL either: `serve` generates one for development.
    jwt_secret: SecretStr | None = None
    # An identity provider's JSON Web Key Set: RS256, ES256 and EdDSA tokens verify with its keys.
    jwks_url: str | None = None
    # When set, every token's `iss` must equal it / its `aud` must be or contain it.
    jwt_issuer: str | None = None
    jwt_audience: str | None = None
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    max_connections: int = Field(10000, ge=1)
    # Sockets one user (token `sub`) may hold on one instance; beyond it the handshake gets 429.
    max_connections_per_user: int = Field(100, ge=1)
    # Topics one connection may hold, broadcast and user:<sub> included (hence at least 2);
    # beyond it the handshake gets 403 and a subscribe frame `limit_exceeded`.
    max_topics_per_connection: int = Field(128, ge=2)
    max_message_bytes: int = Field(65536, ge=64)
    history_size: int = Field(1000, ge=0)
    # Seconds a topic's history and bookkeeping live after its last publish (0: forever), so
    # that Redis holds only the topics published within it.
    history_ttl: int = Field(86400, ge=0)
    send_queue_bytes: int = Field(1048576, ge=1024)
    shutdown_timeout: float = Field(10, gt=0)
    # permessage-deflate costs one compression per socket per notification on a fan-out and
    # rules out writing one shared encoded frame to every socket: off unless asked for.
    ws_compression: bool = False
    # One log line per HTTP request. Off by default: the nginx in front logs every request, and
    # the line cost 14% of an instance's throughput at 100 subscribers per notification. Socket
    # handshakes and closes are logged either way.
    access_log: bool = False
    # Also listen on this Unix socket path, for a proxy on the same host (deploy/local-cluster):
    # a write to a Unix socket costs the instance about half what one to loopback TCP does.
    uds: str | None = None

    @field_validator("broker_url")
    @classmethod
    def _known_scheme(cls, value: str) -> str:
        if not value.startswith(BROKER_SCHEMES):
            raise ValueError(f"must start with one of {', '.join(BROKER_SCHEMES)}")
        if value.startswith("redis+sentinel://"):
            from notifier.redis_topology import parse_sentinel_url  # imports redis: only when used

            parse_sentinel_url(value)  # ValueError: one line saying what is wrong
        elif value.startswith("redis+cluster://"):
            from notifier.redis_cluster import parse_cluster_url

            parse_cluster_url(value)
        elif not value.startswith("memory://"):
            parsed = _host_and_port(value)
            db = parsed.path.lstrip("/")
            if db and not db.isdigit():
                raise ValueError("the path must be a database number, e.g. /0")
        return value

    @field_validator("jwks_url")
    @classmethod
    def _jwks_url(cls, value: str | None) -> str | None:
        if value is None:
            return value
        parsed = urlsplit(value)
        # Whoever can change the key set in transit can sign any token: plain http only on this host.
        loopback = parsed.scheme == "http" and parsed.hostname in ("localhost", "127.0.0.1", "::1")
        if parsed.scheme != "https" and not loopback:
            raise ValueError("must be an https:// URL (http:// only for a provider on this host)")
        _host_and_port(value)
        return value

    @field_validator("jwt_issuer", "jwt_audience")
    @classmethod
    def _not_empty(cls, value: str | None) -> str | None:
        if value is not None and not value.strip():
            raise ValueError("must not be empty (unset it to accept any)")
        return value

    @field_validator("jwt_secret")
    @classmethod
    def _strong_secret(cls, value: SecretStr | None) -> SecretStr | None:
        if value is None:
            return value
        try:
            size = len(value.get_secret_value().encode())
        except UnicodeEncodeError:  # undecodable bytes in the environment
            raise ValueError("must be valid UTF-8 text") from None
        if not size:
            raise ValueError("must not be empty (unset it to get a generated development secret)")
        if size < MIN_SECRET_BYTES:
            # HS256 with a shorter key is guessable offline from any token (RFC 7518 3.2).
            raise ValueError(
                f"must be at least {MIN_SECRET_BYTES} bytes, got {size} "
                "(e.g. python3 -c 'import secrets; print(secrets.token_urlsafe(32))')"
            )
        return value

    @property
    def secret(self) -> str:
        """The HS256 secret; :class:`ConfigError` when none is configured."""
        if self.jwt_secret is None:
            raise ConfigError(f"{ENV_PREFIX}JWT_SECRET: not set")
        return self.jwt_secret.get_secret_value()


def load_settings(**overrides: Any) -> Settings:
    """Build settings from the environment (and ``.env``), overrides winning.

    Raises :class:`ConfigError` with one line naming the first bad variable.
    """
    try:
        return Settings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise ConfigError(describe(exc)) from None


SECRET_FIELDS = ("jwt_secret", "token")  # never echoed in an error line
_CREDENTIALS = re.compile(r"(//)[^/@]*@")


def describe(exc: ValidationError) -> str:
    """One line naming the variable of the first error and saying what is wrong with it."""
    error = exc.errors()[0]
    field = str(error["loc"][0]) if error["loc"] else "?"
    message = error["msg"].removeprefix("Value error, ")
    given = error.get("input")
    if isinstance(given, str) and "@" in given:
        given = _CREDENTIALS.sub(r"\1***@", given)  # a URL's user and password are never shown
    shown = "" if given is None or field in SECRET_FIELDS else f" (got {given!r})"
    return f"{ENV_PREFIX}{field.upper()}: {message}{shown}"


class ClientSettings(BaseSettings):
    """What the command-line client reads: ``NOTIFIER_URL`` and ``NOTIFIER_TOKEN``."""

    model_config = SettingsConfigDict(env_prefix=ENV_PREFIX, env_file=".env", extra="ignore")

    url: str = "http://127.0.0.1:8000"
    token: str | None = None


def load_client_settings(**overrides: Any) -> ClientSettings:
    try:
        return ClientSettings(**{k: v for k, v in overrides.items() if v is not None})
    except ValidationError as exc:
        raise ConfigError(describe(exc)) from None
