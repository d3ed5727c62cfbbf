"""The ``notifier`` command: ``serve``, ``token``, ``publish``, ``subscribe``, ``presence``,
``disconnect``, ``bench``.

Every failure is one clear line on stderr and a non-zero exit status, never a traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import os
import secrets
import socket
import sys
import time
from collections.abc import Sequence
from typing import NoReturn

import orjson
from pydantic import SecretStr

from notifier.auth import ADMIN, PUBLISH, SUBSCRIBE, TokenAuthority
from notifier.client import ClientError
from notifier.settings import ClientSettings, ConfigError, Settings, load_client_settings, load_settings

DEV_SUB = "dev"
DEV_TOKEN_TTL = 7 * 24 * 3600  # seconds: the dev token expires too, if long after the process
BACKLOG = 2048  # uvicorn's default listen backlog
MAX_SINCE_POSITIONS = 10_000  # a sanity bound for --since TOPIC:ID,...; the server has its own


class CannotStart(Exception):
    """``serve`` cannot run with what is installed (uvicorn's internals changed, a module missing)."""


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
    token.add_argument("--scope", action="append", choices=[SUBSCRIBE, PUBLISH, ADMIN], default=[])
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
    subscribe.add_argument(
        "--since",
        metavar="ID",
        help="resume after this notification id (every topic), or each topic after its own: TOPIC:ID,...",
    )

    presence = commands.add_parser(
        "presence", help="print who is subscribed to a topic now, on every instance, as JSON"
    )
    presence.add_argument("topic", metavar="TOPIC")
    presence.add_argument("--url", help="server URL (NOTIFIER_URL, default http://127.0.0.1:8000)")
    presence.add_argument("--token", help="bearer token with the subscribe scope (NOTIFIER_TOKEN)")

    disconnect = commands.add_parser(
        "disconnect", help="close every connection of a user on every instance (admin scope)"
    )
    disconnect.add_argument("sub", metavar="SUB", help="the user id (the tokens' sub)")
    reject = disconnect.add_mutually_exclusive_group()
    reject.add_argument(
        "--reject-before", type=int, metavar="UNIX_S", help="also refuse their tokens issued before it, 24 h"
    )
    reject.add_argument("--reject-now", action="store_true", help="also refuse older tokens")
    disconnect.add_argument("--url", help="server URL (NOTIFIER_URL, default http://127.0.0.1:8000)")
    disconnect.add_argument("--token", help="bearer token with the admin scope (NOTIFIER_TOKEN)")

    bench = commands.add_parser(
        "bench", help="load-test a running deployment, bounded in time; print throughput, latency, lost"
    )
    bench.add_argument("--scenario", required=True, choices=["fanout", "personal", "handshake"])
    bench.add_argument("--url", help="server URL (NOTIFIER_URL, default http://127.0.0.1:8000)")
    bench.add_argument("--token", help="bearer token with both scopes and no topics claim (NOTIFIER_TOKEN)")
    bench.add_argument(
        "--duration", type=float, metavar="S", help="measured seconds (default 10, at most 300)"
    )
    bench.add_argument(
        "--subscribers",
        type=int,
        metavar="N",
        help="sockets (fanout: on one topic, default 100; personal: each on its own, default 50)",
    )
    bench.add_argument(
        "--rate", type=float, metavar="R", help="notifications/s, open loop (fanout default 20, personal 500)"
    )
    bench.add_argument(
        "--concurrency", type=int, metavar="C", help="handshake: connections opened in parallel (default 20)"
    )
    bench.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
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
        if args.command == "presence":
            return _presence(args)
        if args.command == "disconnect":
            return _disconnect(args)
        if args.command == "bench":
            return _bench(args)
        return _subscribe(args)
    except ConfigError as exc:
        return _fail(str(exc), 2)
    except ClientError as exc:
        return _fail(str(exc), 1)
    except CannotStart as exc:
        return _fail(f"cannot start: {exc}", 1)
    except KeyboardInterrupt:
        return 130


def _fail(line: str, status: int) -> int:
    print(f"notifier: error: {line}", file=sys.stderr)
    return status


def _dev_secret(settings: Settings) -> Settings:
    """With no secret configured: generate one, warn, and print a ready token and the demo URL."""
    secret = secrets.token_urlsafe(32)
    authority = TokenAuthority(secret, issuer=settings.jwt_issuer, audience=settings.jwt_audience)
    token = authority.mint(DEV_SUB, [SUBSCRIBE, PUBLISH], ttl=DEV_TOKEN_TTL)
    host = "127.0.0.1" if settings.host in ("0.0.0.0", "::", "") else settings.host
    print(
        "notifier: warning: NOTIFIER_JWT_SECRET is not set; using a generated secret "
        "for development only (tokens die with this process)",
        file=sys.stderr,
    )
    print(f"dev token: {token}\ndemo: http://{host}:{settings.port}/#token={token}", flush=True)
    return settings.model_copy(update={"jwt_secret": SecretStr(secret)})


def _serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn

        from notifier.app import create_app
        from notifier.server import DrainingServer, HttpProtocol, bind_unix_socket, websocket_protocol
    except ImportError as exc:  # notifier.server checks uvicorn's internals at import (_require)
        hint = " (install the tested versions: pip install -c constraints.txt .)" if exc.name else ""
        raise CannotStart(f"{exc}{hint}") from None

    settings = load_settings(host=args.host, port=args.port)
    # Listen before anything is printed: a port in use is one line, not a dev token and a demo
    # URL for another server's port followed by uvicorn's bind error.
    sockets = _listen_tcp(settings.host, settings.port)
    if settings.port == 0:  # the port the system chose: the demo URL must name it
        settings = settings.model_copy(update={"port": sockets[0].getsockname()[1]})
    unix_socket = None
    if settings.uds:
        try:
            unix_socket = bind_unix_socket(settings.uds)
        except OSError as exc:
            reason = exc.strerror or exc
            raise ConfigError(f"NOTIFIER_UDS: cannot listen on {settings.uds}: {reason}") from None
    logging.basicConfig(level=logging.INFO, format="%(levelname)s:     %(name)s: %(message)s")
    # No secret and no key set: nothing could verify a token, so one is made up for development.
    generated = settings.jwt_secret is None and settings.jwks_url is None
    if generated:
        settings = _dev_secret(settings)
    app = create_app(settings, dev_secret=generated)
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        # Not uvicorn's defaults: ours bound what a slow or hostile client can hold (request heads,
        # stalled bodies, pong answers; see notifier.http_edge and notifier.ws_edge), also when
        # no nginx is in front.
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
    # uvicorn logs where it listens only for sockets it bound itself: say it for ours.
    host = f"[{settings.host}]" if ":" in settings.host else settings.host or "0.0.0.0"
    logging.getLogger("uvicorn.error").info(
        "Uvicorn running on http://%s:%d (Press CTRL+C to quit)", host, settings.port
    )
    server.run(sockets=sockets)
    return 0 if server.started else 1


def _listen_tcp(host: str, port: int) -> list[socket.socket]:
    """Listening sockets on ``host``:``port``, bound as uvicorn would bind them (asyncio's
    ``create_server``: every address of the host, SO_REUSEADDR, IPv6 sockets IPv6 only), for
    uvicorn to serve. :class:`ConfigError` naming the setting when that cannot be done."""
    try:
        found = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise ConfigError(f"NOTIFIER_HOST / --host: cannot listen on {host!r}: {exc.strerror}") from None
    sockets: list[socket.socket] = []
    try:
        for family, kind, proto, _, address in dict.fromkeys(found):
            sock = socket.socket(family, kind, proto)
            sockets.append(sock)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            if port == 0 and len(sockets) > 1:  # one port chosen by the system, for every address
                address = (address[0], sockets[0].getsockname()[1], *address[2:])
            sock.bind(address)
            sock.listen(BACKLOG)  # from here on connections wait for the server, never refused
    except OSError as exc:
        for sock in sockets:
            sock.close()
        where = f"{host or '*'}:{port}"
        if exc.errno == errno.EADDRINUSE:
            raise ConfigError(
                f"NOTIFIER_PORT / --port: cannot listen on {where}: the port is already in use "
                "(another server listens there); choose another port"
            ) from None
        reason = exc.strerror or exc
        raise ConfigError(f"NOTIFIER_HOST / NOTIFIER_PORT: cannot listen on {where}: {reason}") from None
    return sockets


def _token(args: argparse.Namespace) -> int:
    if args.ttl <= 0:
        raise ConfigError("--ttl: must be a positive number of seconds (every token expires)")
    if not args.sub:
        raise ConfigError("--sub: must not be empty")
    settings = load_settings()
    if settings.jwt_secret is None and settings.jwks_url is not None:
        raise ConfigError(
            "NOTIFIER_JWT_SECRET: not set, and `notifier token` signs with it: with only "
            "NOTIFIER_JWKS_URL, tokens come from the identity provider"
        )
    authority = TokenAuthority(settings.secret, issuer=settings.jwt_issuer, audience=settings.jwt_audience)
    try:
        token = authority.mint(args.sub, args.scope, args.topic, ttl=args.ttl)
    except ValueError as exc:
        raise ConfigError(f"--ttl: {exc}") from None
    print(token)
    return 0


def _topic_client(args: argparse.Namespace) -> ClientSettings:
    """The client settings of a command on one TOPIC (``--url``, ``--token``), the topic checked."""
    from notifier.protocol import valid_topic

    client = load_client_settings(url=args.url, token=args.token)
    _check_url(client.url)
    if not valid_topic(args.topic):
        raise ConfigError(f"TOPIC: invalid topic name {args.topic!r} (letters, digits, _ . : -; at most 128)")
    return client


def _publish(args: argparse.Namespace) -> int:
    from notifier.client import publish

    client = _topic_client(args)
    try:
        data = orjson.loads(args.data)
    except orjson.JSONDecodeError as exc:
        raise ConfigError(f"DATA_JSON: not valid JSON: {exc}") from None
    try:
        answer = asyncio.run(publish(client.url, client.token, args.topic, data))
    except ClientError as exc:
        raise _with_token_hint(exc, client.token) from None
    print(orjson.dumps(answer).decode(), flush=True)
    return 0


def _presence(args: argparse.Namespace) -> int:
    from notifier.client import presence

    client = _topic_client(args)
    try:
        answer = asyncio.run(presence(client.url, client.token, args.topic))
    except ClientError as exc:
        raise _with_token_hint(exc, client.token) from None
    # The server's answer as it came: {"topic", "count", "users": [{"user", "connections"}, ...]}.
    print(orjson.dumps(answer).decode(), flush=True)
    if answer.count > len(answer.users):
        listed = f"{len(answer.users):,} of {answer.count:,} users listed (the first ones by user)"
        print(f"notifier: warning: {listed}", file=sys.stderr)
    return 0


def _disconnect(args: argparse.Namespace) -> int:
    from notifier.client import disconnect_user

    client = load_client_settings(url=args.url, token=args.token)
    _check_url(client.url)
    before = int(time.time()) if args.reject_now else args.reject_before
    if before is not None and before < 0:
        raise ConfigError("--reject-before: must be a unix time in seconds")
    try:
        asyncio.run(disconnect_user(client.url, client.token, args.sub, before))
    except ClientError as exc:
        raise _with_token_hint(exc, client.token) from None
    refused = f"; their tokens issued before {before} are refused for 24 h" if before is not None else ""
    print(f"disconnected {args.sub!r} on every instance{refused}", flush=True)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from notifier.bench import BenchError, make_options, run
    from notifier.bench_report import Progress, render_json, render_table
    from notifier.client import http_url

    client = load_client_settings(url=args.url, token=args.token)
    _check_url(client.url)
    # With the deployment's secret at hand each socket gets a token of its own user, so that the
    # per-user limit (NOTIFIER_MAX_CONNECTIONS_PER_USER) does not cap the run.
    settings = load_settings()
    authority = None
    if settings.jwt_secret is not None:
        issuer, audience = settings.jwt_issuer, settings.jwt_audience
        authority = TokenAuthority(settings.secret, issuer=issuer, audience=audience)
    try:
        options = make_options(
            http_url(client.url), client.token, args.scenario, duration=args.duration,
            subscribers=args.subscribers, rate=args.rate, concurrency=args.concurrency, authority=authority,
        )  # fmt: skip
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    try:
        result = run(options, Progress(lambda: ""))
    except ClientError as exc:
        raise _with_token_hint(exc, client.token) from None
    except BenchError as exc:
        return _fail(str(exc), 1)
    try:
        print(render_json(result) if args.json else render_table(result), flush=True)
    except BrokenPipeError:  # `notifier bench ... | head -1`: the reader left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    if args.json:  # stdout is the one object: what matters most goes to stderr too
        for warning in result["warnings"]:
            print(f"notifier: warning: {warning}", file=sys.stderr)
    if result.get("lost"):
        print(f"notifier: warning: {result['lost']:,} of {result['expected']:,} deliveries were lost",
              file=sys.stderr)  # fmt: skip
    return 0


def _subscribe(args: argparse.Namespace) -> int:
    from notifier.client import subscribe
    from notifier.protocol import parse_positions, valid_topic

    client = load_client_settings(url=args.url, token=args.token)
    for topic in args.topics:
        if not valid_topic(topic):
            raise ConfigError(f"TOPIC: invalid topic name {topic!r} (letters, digits, _ . : -; at most 128)")
    try:
        # One id, or per-topic positions TOPIC:ID,... (the server bounds how many it takes).
        parsed = parse_positions(args.since, most=MAX_SINCE_POSITIONS)
    except ValueError as exc:
        raise ConfigError(f"--since: {exc}") from None
    since = {t: str(i) for t, i in parsed.items()} if isinstance(parsed, dict) else args.since
    _check_url(client.url)
    # Reconnections are worth a line on stderr; stdout stays pure JSON lines.
    reports = logging.StreamHandler(sys.stderr)
    reports.setFormatter(logging.Formatter("notifier: %(message)s"))
    client_log = logging.getLogger("notifier.client")
    client_log.addHandler(reports)
    client_log.setLevel(logging.INFO)
    client_log.propagate = False

    async def run() -> None:
        async with subscribe(client.url, client.token, args.topics, since) as notifications:
            async for frame in notifications:
                sys.stdout.write(orjson.dumps(frame).decode() + "\n")
                sys.stdout.flush()

    try:
        asyncio.run(run())
    except BrokenPipeError:  # `notifier subscribe news | head -1`: the reader left, so do we
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
    except ClientError as exc:
        raise _with_token_hint(exc, client.token) from None
    return 0


# What the server says when it refused the token itself (a WebSocket handshake answers 403
# for it, where the HTTP API answers 401): see notifier.auth.
_TOKEN_REFUSED = ("missing bearer token", "invalid token", "token expired")


def _with_token_hint(exc: ClientError, token: str | None) -> ClientError:
    """A refused token: the server's reason, plus how to pass a token."""
    about_token = exc.status == 403 and (not token or (exc.detail or "").startswith(_TOKEN_REFUSED))
    if exc.status != 401 and not about_token:
        return exc
    if not token:
        hint = "no token was given: set NOTIFIER_TOKEN or pass --token"
    else:
        hint = "set NOTIFIER_TOKEN or pass --token with a valid one (notifier token mints one)"
    return ClientError(f"{exc}; {hint}", exc.status, exc.detail)


def _check_url(url: str) -> None:
    from notifier.client import http_url

    try:
        http_url(url)
    except ClientError as exc:
        raise ConfigError(f"--url / NOTIFIER_URL: {exc}") from None
