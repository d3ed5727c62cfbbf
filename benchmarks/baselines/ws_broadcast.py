"""Baseline: a featureless plain ``websockets`` server fanning out with ``websockets.broadcast()``.

Every socket, whatever its path, joins one set and gets one ``{"type": "hello"}`` frame (so the
load generator knows it is in the set); each publish builds the same notification frame as
notifier once (``ts`` = acceptance time in unix ms) and hands it to ``broadcast()``, which
frames it for each connection and writes it without awaiting (no backpressure, no auth, no
topics, no metrics). websockets' own defaults otherwise (permessage-deflate offered, pings),
on uvloop when it is installed (as uvicorn would pick it), else asyncio's default loop.

Publishing goes through a tiny HTTP/1.1 endpoint on a second port (``websockets`` only speaks
GET): ``POST /v1/notifications`` ``{"topic", "data"}`` -> 202 ``{"id", "topic", "ts"}``, with
keep-alive; ``GET /healthz`` -> 200.

With ``--topics`` (the ``personal``, ``multi`` and ``handshake`` scenarios), a minimal topic
registry instead of the one set: a socket opened with ``?topics=a,b`` is kept in
``topic -> set of sockets``, a POST ``{"topic", "data"}`` is ``broadcast()`` to that topic's
sockets only, and a POST ``{"topics": [...], "data"}`` sends one notification (own id, same
``ts``) to each topic's sockets, answering ``{"notifications": [{"id", "topic", "ts"}, ...]}``
as notifier does. Still no auth, no backpressure.

    python benchmarks/baselines/ws_broadcast.py --port 8002 --http-port 8003 [--no-uvloop] [--topics]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import itertools
import json
import os
import signal
import time
from typing import Any
from urllib.parse import parse_qs, urlsplit

from websockets.asyncio.server import ServerConnection, broadcast, serve, unix_serve

CLIENTS: set[ServerConnection] = set()
# --topics: topic -> the sockets subscribed to it, instead of CLIENTS.
TOPICS: dict[str, set[ServerConnection]] = {}
OPTIONS = {"topics": False}
ids = itertools.count(1)
REASONS = {200: "OK", 202: "Accepted", 404: "Not Found", 422: "Unprocessable Entity"}


async def handler(websocket: ServerConnection) -> None:
    if OPTIONS["topics"]:
        await topic_handler(websocket)
        return
    CLIENTS.add(websocket)
    try:
        await websocket.send('{"type":"hello"}')
        async for _ in websocket:
            pass
    finally:
        CLIENTS.discard(websocket)


async def topic_handler(websocket: ServerConnection) -> None:
    query = parse_qs(urlsplit(websocket.request.path if websocket.request else "").query)
    mine = [t for t in ",".join(query.get("topics", [])).split(",") if t]
    for topic in mine:
        TOPICS.setdefault(topic, set()).add(websocket)
    try:
        await websocket.send('{"type":"hello"}')
        async for _ in websocket:
            pass
    finally:
        for topic in mine:
            sockets = TOPICS.get(topic)
            if sockets is not None:
                sockets.discard(websocket)
                if not sockets:
                    del TOPICS[topic]


def notification(topic: str, data: Any, ts: int) -> dict[str, Any]:
    """Build one notification frame and hand it to ``broadcast()``: to the topic's sockets with
    --topics, else to every socket. Returns the publish answer's entry."""
    id_ = str(next(ids))
    frame = {"type": "notification", "id": id_, "topic": topic, "data": data, "ts": ts}
    sockets = TOPICS.get(topic, ()) if OPTIONS["topics"] else CLIENTS
    broadcast(sockets, json.dumps(frame, separators=(",", ":")))
    return {"id": id_, "topic": topic, "ts": ts}


def publish(body: bytes) -> tuple[int, bytes]:
    try:
        request = json.loads(body)
        data = request["data"]
        topics = request["topics"] if OPTIONS["topics"] and "topics" in request else [request["topic"]]
    except (ValueError, KeyError, TypeError):
        return 422, b'{"detail":"want an object with topic and data"}'
    ts = int(time.time() * 1000)
    if OPTIONS["topics"] and "topics" in request:
        answer: dict[str, Any] = {"notifications": [notification(t, data, ts) for t in topics]}
    else:
        answer = notification(topics[0], data, ts)
    return 202, json.dumps(answer, separators=(",", ":")).encode()


async def http_handler(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Minimal HTTP/1.1 with keep-alive: enough for the load generator's POSTs and a health check."""
    try:
        while True:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            method, path, _ = lines[0].split(" ", 2)
            headers = {}
            for line in lines[1:]:
                name, _, value = line.partition(":")
                headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
            if method == "POST" and path == "/v1/notifications":
                status, payload = publish(body)
            elif method == "GET" and path == "/healthz":
                status, payload = 200, b'{"status":"ok"}'
            else:
                status, payload = 404, b'{"detail":"not found"}'
            writer.write(
                f"HTTP/1.1 {status} {REASONS[status]}\r\ncontent-type: application/json\r\n"
                f"content-length: {len(payload)}\r\n\r\n".encode()
                + payload
            )
            await writer.drain()
            if headers.get("connection", "").lower() == "close":
                break
    except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, ValueError):
        pass
    finally:
        writer.close()


async def main(host: str, port: int, http_port: int, uds: str | None) -> None:
    stop = asyncio.Event()
    for signum in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(signum, stop.set)
    http = await asyncio.start_server(http_handler, host, http_port)
    async with contextlib.AsyncExitStack() as servers:
        await servers.enter_async_context(serve(handler, host, port))
        await servers.enter_async_context(http)
        if uds:
            await servers.enter_async_context(unix_serve(handler, uds))
            os.chmod(uds, 0o666)
        await stop.wait()


def run() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8002, help="WebSocket port")
    parser.add_argument("--http-port", type=int, default=8003, help="HTTP publish port")
    parser.add_argument("--uds", help="also serve WebSockets on this Unix socket (for nginx)")
    parser.add_argument("--no-uvloop", action="store_true", help="use asyncio's default event loop")
    parser.add_argument("--topics", action="store_true", help="the topic registry (see above)")
    args = parser.parse_args()
    OPTIONS["topics"] = args.topics
    if not args.no_uvloop:
        try:
            import uvloop
        except ImportError:
            pass
        else:
            uvloop.run(main(args.host, args.port, args.http_port, args.uds))
            return
    asyncio.run(main(args.host, args.port, args.http_port, args.uds))


if __name__ == "__main__":
    run()
