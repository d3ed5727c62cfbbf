"""``create_app(settings)``: the one composition root. The lifespan builds broker, node and metrics."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles
from starlette.routing import WebSocketRoute

from notifier import __version__, api, ws
from notifier.auth import TokenAuthority
from notifier.broker import Broker, create_broker
from notifier.metrics import Metrics
from notifier.node import Node
from notifier.services import Services
from notifier.settings import Settings

STATIC = Path(__file__).parent / "static"


def create_app(settings: Settings, broker: Broker | None = None) -> FastAPI:
    """An instance's ASGI app; ``broker`` overrides the one ``settings.broker_url`` names (tests)."""
    metrics = Metrics()
    node = Node(
        broker if broker is not None else create_broker(settings.broker_url, settings.history_size), metrics
    )
    services = Services(settings, TokenAuthority(settings.secret), node, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await node.start()
        try:
            yield
        finally:
            await node.close()

    app = FastAPI(
        title="notifier",
        version=__version__,
        summary="Real-time notifications over WebSocket, fanned out across instances through Redis",
        lifespan=lifespan,
    )
    app.state.services = services
    app.include_router(api.router)
    # A plain Starlette route: FastAPI's WebSocket route adds dependency solving and an
    # AsyncExitStack that every open socket keeps alive (about 4 KiB each), for nothing here.
    app.router.routes.append(WebSocketRoute("/v1/ws", ws.websocket_endpoint))
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app
