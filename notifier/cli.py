"""The ``notifier`` command: ``serve``, ``token``, ``publish``, ``subscribe``.

Every failure is one clear line on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import secrets
import sys
from collections.abc import Sequence
from typing import NoReturn

import orjson
from pydantic import SecretStr

from notifier.auth import PUBLISH, SUBSCRIBE, TokenAuthority
from notifier.client import ClientError
from notifier.settings import ConfigError, Settings, load_client_settings, load_settings

DEV_SUB = "dev"
DEV_TOKEN_TTL = 7 * 24 * 3600  # seconds: the dev token expires too, if long after the process


class _Parser(argparse.ArgumentParser):
    """Bad arguments: one line on stderr (not the usage block), exit status 2."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="notifier", description="Real-time notification service")
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run one instance")
    serve.add_argument("--host", help="listen address (NOTIFIER_HOST)")
    serve.add_argument("--port", type=int, help="listen port (NOTIFIER_PORT)")

    token = commands.add_parser("token", help="print a signed token (secret: NOTIFIER_JWT_SECRET)")
    token.add_argument("--sub", required=True, help="user id")
    token.add_argument("--scope", action="append", choices=[SUBSCRIBE, PUBLISH], default=[])
    token.add_argument("--topic", action="append", help="glob pattern of allowed topics (repeatable)")
    token.add_argument(
        "--ttl", type=int, default=3600, help="seconds until it expires (default 3600; every token expires)"
    )

    publish = commands.add_parser("publish", help="publish one notification, print the answer")
    publish.add_argument("topic", metavar="TOPIC")
    publish.add_argument("data", metavar="DATA_JSON", help="the notification's data, as JSON")
    publish.add_argument("--url", help="server URL (NOTIFIER_URL, default http://127.0.0.1:8000)")
    publish.add_argument("--token", help="bearer token (NOTIFIER_TOKEN)")

    subscribe = commands.add_parser("subscribe", help="print notifications as JSON lines")
    subscribe.add_argument("topics", nargs="+", metavar="TOPIC")
    subscribe.add_argument("--url", help="server URL (NOTIFIER_URL, default http://127.0.0.1:8000)")
    subscribe.add_argument("--token", help="bearer token (NOTIFIER_TOKEN)")
    subscribe.add_argument("--since", metavar="ID", help="resume after this notification id")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "token":
            return _token(args)
        if args.command == "publish":
            return _publish(args)
        return _subscribe(args)
    except (ConfigError, ClientError) as exc:
        print(f"notifier: error: {exc}", file=sys.stderr)
        return 2 if isinstance(exc, ConfigError) else 1
    except KeyboardInterrupt:
        return 130


def _dev_secret(settings: Settings) -> Settings:
    """With no secret configured: generate one, warn, and print a ready token and the demo URL."""
    secret = secrets.token_urlsafe(32)
    token = TokenAuthority(secret).mint(DEV_SUB, [SUBSCRIBE, PUBLISH], ttl=DEV_TOKEN_TTL)
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    print(
        "notifier: warning: NOTIFIER_JWT_SECRET is not set; using a generated secret "
        "for development only (tokens die with this process)",
        file=sys.stderr,
    )
    print(f"dev token: {token}\ndemo: http://{host}:{settings.port}/#token={token}", flush=True)
    return settings.model_copy(update={"jwt_secret": SecretStr(secret)})


def _serve(args: argparse.Namespace) -> int:
    import uvicorn

    from notifier.app import create_app
    from notifier.server import DrainingServer, HttpProtocol, bind_unix_socket, websocket_protocol

    settings = load_settings(host=args.host, port=args.port)
    unix_socket = None
    if settings.uds:
        try:
            unix_socket = bind_unix_socket(settings.uds)
        except OSError as exc:
            reason = exc.strerror or exc
            raise ConfigError(f"NOTIFIER_UDS: cannot listen on {settings.uds}: {reason}") from None
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    if settings.jwt_secret is None:
        settings = _dev_secret(settings)
    app = create_app(settings)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        # Not uvicorn's defaults: ours bound what a slow or hostile client can hold (request heads,
        # stalled bodies, pong answers; see notifier.server), also when no nginx is in front.
        http=HttpProtocol,
        ws=websocket_protocol(settings.send_queue_bytes),
        ws_max_size=settings.max_message_bytes,
        ws_per_message_deflate=settings.ws_compression,
        timeout_graceful_shutdown=int(settings.shutdown_timeout),
        proxy_headers=True,
        log_level="info",
        access_log=settings.access_log,
    )
    server = DrainingServer(config, app.state.services.node, settings.shutdown_timeout, unix_socket)
    server.run()
    return 0 if server.started else 1


def _token(args: argparse.Namespace) -> int:
    if args.ttl <= 0:
        raise ConfigError("--ttl: must be a positive number of seconds (every token expires)")
    if not args.sub:
        raise ConfigError("--sub: must not be empty")
    secret = load_settings().secret
    try:
        token = TokenAuthority(secret).mint(args.sub, args.scope, args.topic, ttl=args.ttl)
    except ValueError as exc:
        raise ConfigError(f"--ttl: {exc}") from None
    print(token)
    return 0


def _publish(args: argparse.Namespace) -> int:
    from notifier.client import publish
    from notifier.protocol import valid_topic

    client = load_client_settings(url=args.url, token=args.token)
    _check_url(client.url)
    if not valid_topic(args.topic):
        raise ConfigError(f"TOPIC: invalid topic name {args.topic!r} (letters, digits, _ . : -; at most 128)")
    try:
        data = orjson.loads(args.data)
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"DATA_JSON: not valid JSON: {exc}") from None
    answer = asyncio.run(publish(client.url, client.token, args.topic, data))
    print(orjson.dumps(answer).decode(), flush=True)
    return 0


def _subscribe(args: argparse.Namespace) -> int:
    from notifier.client import subscribe
    from notifier.protocol import parse_since, valid_topic

    client = load_client_settings(url=args.url, token=args.token)
    for topic in args.topics:
        if not valid_topic(topic):
            raise ConfigError(f"TOPIC: invalid topic name {topic!r} (letters, digits, _ . : -; at most 128)")
    try:
        parse_since(args.since)
    except ValueError as exc:
        raise ConfigError(f"--since: {exc}") from None
    _check_url(client.url)
    # Reconnections are worth a line on stderr; stdout stays pure JSON lines.
    reports = logging.StreamHandler(sys.stderr)
    reports.setFormatter(logging.Formatter("notifier: %(message)s"))
    client_log = logging.getLogger("notifier.client")
    client_log.addHandler(reports)
    client_log.setLevel(logging.INFO)
    client_log.propagate = False

    async def run() -> None:
        async with subscribe(client.url, client.token, args.topics, args.since) as notifications:
            async for frame in notifications:
                sys.stdout.write(orjson.dumps(frame).decode() + "\n")
                sys.stdout.flush()

    try:
        asyncio.run(run())
    except BrokenPipeError:  # `notifier subscribe news | head -1`: the reader left, so do we
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    return 0


def _check_url(url: str) -> None:
    from notifier.client import http_url

    try:
        http_url(url)
    except ClientError as exc:
        raise ConfigError(f"--url / NOTIFIER_URL: {exc}") from None
