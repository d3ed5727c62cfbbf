"""Running one instance under uvicorn, with a graceful drain on SIGTERM / SIGINT.

uvicorn's own shutdown stops listening at once (so readiness probes and new handshakes get
connection refused instead of 503), closes every socket in the same instant (a reconnect storm
on the other instances) and re-raises the signal afterwards (exit status 143, not 0). The
drain here, in named steps:

1. turn draining on: ``/readyz`` answers 503, new handshakes get 503, the listener stays open;
2. close the sockets with 1001 in paced batches over at most half of the shutdown timeout;
3. hand over to uvicorn's shutdown for in-flight HTTP requests, with what is left of the
   timeout; tasks still running then are cancelled;
4. exit with status 0.

The protocols keep an instance safe to reach without nginx in front (notifier.http_edge:
request heads within 10 s and 16 KiB, bodies that stall given up after 30 s) and bound what
one socket can make it hold, pong answers included (notifier.ws_edge).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import logging
import os
import re
import socket
import stat
import time
from types import FrameType

import uvicorn

from notifier.http_edge import HttpProtocol
from notifier.node import Node
from notifier.uvicorn_internals import require as _require
from notifier.ws_edge import QUIET_HANDSHAKES, websocket_protocol

__all__ = ["DrainingServer", "HttpProtocol", "_require", "bind_unix_socket", "install_log_filters",
           "remove_unix_socket", "websocket_protocol"]  # fmt: skip

log = logging.getLogger("notifier.server")

_TOKEN_IN_QUERY = re.compile(r"(token=)[^&\s\"]+")


class RedactTokens(logging.Filter):
    """Keep bearer tokens passed as ``?token=`` out of the access log."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.args and isinstance(record.args, tuple):
            record.args = tuple(
                _TOKEN_IN_QUERY.sub(r"\1[redacted]", a) if isinstance(a, str) else a for a in record.args
            )
        # uvicorn's websockets-sansio protocol logs this after every refused handshake, although
        # the denial response (our 403 / 503) was sent; our endpoint never returns otherwise.
        return record.msg != "ASGI callable returned without completing handshake."


def install_log_filters() -> None:
    for name in ("uvicorn.access", "uvicorn.error", QUIET_HANDSHAKES.name):
        logging.getLogger(name).addFilter(RedactTokens())
    QUIET_HANDSHAKES.setLevel(logging.WARNING)


def bind_unix_socket(path: str) -> socket.socket:
    """A listening-ready Unix socket at ``path``, readable and writable by every local user (a
    proxy's workers often run as another user). A socket file left by a process that died is
    replaced; one that still answers is not. ``OSError`` says why it cannot be had."""
    if os.path.exists(path):
        if not stat.S_ISSOCK(os.stat(path).st_mode):
            raise OSError(errno.EEXIST, "it exists and is not a socket")
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            try:
                probe.connect(path)
            except ConnectionRefusedError:
                os.unlink(path)
            else:
                raise OSError(errno.EADDRINUSE, "a running server listens there")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o666)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


def remove_unix_socket(path: str, sock: socket.socket) -> None:
    """Close ``sock`` and remove its file ``path``, if that is still a socket."""
    sock.close()
    with contextlib.suppress(OSError):
        if stat.S_ISSOCK(os.stat(path).st_mode):
            os.unlink(path)


class DrainingServer(uvicorn.Server):
    """A uvicorn server whose first SIGTERM / SIGINT drains the node; a second one hurries it."""

    def __init__(
        self,
        config: uvicorn.Config,
        node: Node,
        shutdown_timeout: float,
        unix_socket: socket.socket | None = None,
    ) -> None:
        super().__init__(config)
        self.node = node
        self.shutdown_timeout = shutdown_timeout
        self.unix_socket = unix_socket
        self.unix_path: str = unix_socket.getsockname() if unix_socket is not None else ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain: asyncio.Task[None] | None = None

    async def serve(self, sockets: list[socket.socket] | None = None) -> None:
        self._loop = asyncio.get_running_loop()
        install_log_filters()
        try:
            await super().serve(sockets)
        finally:
            if self.unix_socket is not None:
                remove_unix_socket(self.unix_path, self.unix_socket)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.unix_socket is None or self.should_exit:
            return
        # The TCP listener is up; the Unix one serves the same app with the same protocols, and
        # uvicorn closes it with the others (self.servers) at shutdown.
        config, loop = self.config, asyncio.get_running_loop()

        def protocol() -> asyncio.Protocol:
            return config.http_protocol_class(  # type: ignore[call-arg]
                config=config, server_state=self.server_state, app_state=self.lifespan.state
            )

        server = await loop.create_server(protocol, sock=self.unix_socket, backlog=config.backlog)
        self.servers.append(server)
        log.info("also listening on unix:%s", self.unix_path)

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        # Runs in the signal handler: never record the signal (uvicorn would re-raise it after
        # shutdown and the exit status would be 143), and only schedule work on the loop.
        if self._loop is None or self._drain is not None or not self.started:
            self.should_exit = True
            return
        self._loop.call_soon_threadsafe(self._start_drain)

    def _start_drain(self) -> None:
        if self._drain is None:
            self._drain = self._loop.create_task(self._run_drain()) if self._loop else None
        else:
            self.should_exit = True

    async def _run_drain(self) -> None:
        started = time.monotonic()
        try:
            await self.node.drain(self.shutdown_timeout / 2)
        except Exception:  # noqa: BLE001 - a failed drain must still end in a shutdown
            log.exception("drain failed; shutting down")
        left = self.shutdown_timeout - (time.monotonic() - started)
        self.config.timeout_graceful_shutdown = max(1, int(left))
        self.should_exit = True
