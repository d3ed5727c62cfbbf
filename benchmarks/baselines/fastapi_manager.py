"""Baseline: the FastAPI documentation's textbook ``ConnectionManager``, plus a publish endpoint.

https://fastapi.tiangolo.com/advanced/websockets/#handling-disconnections-and-multiple-clients
A list of websockets and ``await websocket.send_text`` in a loop, run by uvicorn with its
defaults (as ``uvicorn main:app`` would). Two additions so the load generator can drive it
exactly like notifier, neither on the fan-out path:

- one ``{"type": "hello"}`` frame once a socket is in the list (notifier sends ``hello`` once
  a socket is subscribed; the load generator waits for the first frame before publishing);
- ``POST /v1/notifications`` ``{"topic", "data"}`` -> 202 ``{"id", "topic", "ts"}``, which
  builds the same notification frame as notifier (``ts`` = acceptance time in unix ms) once and
  broadcasts it to every socket. No auth, no topics, no queues, no metrics.

With ``--topics`` (the ``personal``, ``multi`` and ``handshake`` scenarios), a minimal topic
registry on top: a socket opened with ``?topics=a,b`` is also kept in ``topic -> set of sockets``,
a POST ``{"topic", "data"}`` goes to that topic's sockets only, and a POST ``{"topics": [...],
"data"}`` sends one notification (own id, same ``ts``) to each topic's sockets, answering
``{"notifications": [{"id", "topic", "ts"}, ...]}`` as notifier does. Still no auth, no queues.

    python benchmarks/baselines/fastapi_manager.py --port 8001 [--topics]
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import socket
import time
from typing import Any

import uvicorn
from fastapi import FastAPI, Request, WebSocket, WebSocketDisconnect
from fastapi.responses import JSONResponse


class ConnectionManager:
    def __init__(self) -> None:
        self.active_connections: list[WebSocket] = []

    async def connect(self, websocket: WebSocket) -> None:
        await websocket.accept()
        self.active_connections.append(websocket)

    def disconnect(self, websocket: WebSocket) -> None:
        self.active_connections.remove(websocket)

    async def broadcast(self, message: str) -> None:
        for connection in self.active_connections:
            await connection.send_text(message)


app = FastAPI()
manager = ConnectionManager()
ids = itertools.count(1)
# --topics: topic -> the sockets subscribed to it (without it: the textbook broadcast to every socket).
TOPICS: dict[str, set[WebSocket]] = {}
OPTIONS = {"topics": False}


@app.websocket("/v1/ws")
async def websocket_endpoint(websocket: WebSocket) -> None:
    await manager.connect(websocket)
    mine = [t for t in websocket.query_params.get("topics", "").split(",") if t] if OPTIONS["topics"] else []
    for topic in mine:
        TOPICS.setdefault(topic, set()).add(websocket)
    await websocket.send_text('{"type":"hello"}')
    try:
        while True:
            await websocket.receive_text()
    except WebSocketDisconnect:
        manager.disconnect(websocket)
    finally:
        for topic in mine:
            sockets = TOPICS.get(topic)
            if sockets is not None:
                sockets.discard(websocket)
                if not sockets:
                    del TOPICS[topic]


def _frame(topic: str, data: Any, ts: int) -> tuple[str, str]:
    id_ = str(next(ids))
    frame = json.dumps(
        {"type": "notification", "id": id_, "topic": topic, "data": data, "ts": ts}, separators=(",", ":")
    )
    return id_, frame


async def _to_topic(topic: str, frame: str) -> None:
    for connection in list(TOPICS.get(topic, ())):
        await connection.send_text(frame)


@app.post("/v1/notifications", status_code=202)
async def publish(request: Request) -> JSONResponse:
    body: dict[str, Any] = await request.json()
    ts = int(time.time() * 1000)
    if OPTIONS["topics"] and "topics" in body:
        answers = []
        for topic in body["topics"]:
            id_, frame = _frame(topic, body["data"], ts)
            await _to_topic(topic, frame)
            answers.append({"id": id_, "topic": topic, "ts": ts})
        return JSONResponse({"notifications": answers}, status_code=202)
    topic = body["topic"]
    id_, frame = _frame(topic, body["data"], ts)
    if OPTIONS["topics"]:
        await _to_topic(topic, frame)
    else:
        await manager.broadcast(frame)
    return JSONResponse({"id": id_, "topic": topic, "ts": ts}, status_code=202)


@app.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=8001)
    parser.add_argument("--uds", help="also listen on this Unix socket (for nginx on the same host)")
    parser.add_argument("--topics", action="store_true", help="the topic registry (see above)")
    args = parser.parse_args()
    OPTIONS["topics"] = args.topics
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level="warning")
    sockets = [config.bind_socket()]
    if args.uds:
        # As uvicorn --uds binds it, beside the TCP port: uvicorn serves every socket it is given.
        sockets.append(socket.socket(socket.AF_UNIX, socket.SOCK_STREAM))
        sockets[-1].bind(args.uds)
        os.chmod(args.uds, 0o666)
    uvicorn.Server(config).run(sockets=sockets)


if __name__ == "__main__":
    main()
