"""``create_app(settings)``: the one composition root. The lifespan builds broker, node and metrics."""

from __future__ import annotations

import gc
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.openapi.docs import get_swagger_ui_html
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles
from starlette.types import Receive, Scope, Send
from starlette.websockets import WebSocket

from notifier import __version__, api, api_presence, api_publish, api_sse, sse, ws
from notifier.api_publish import PUBLISH_PATH
from notifier.auth import TokenAuthority
from notifier.broker import Broker, create_broker
from notifier.jwks import KeySet
from notifier.metrics import Metrics
from notifier.node import Node
from notifier.services import Services
from notifier.settings import Settings

STATIC = Path(__file__).parent / "static"
# The cyclic garbage collector's thresholds while serving (CPython's default: 700, 10, 10). Every
# request allocates a few dozen objects that reference counting frees at once, yet each 700
# allocations ran a collection: 9% of an instance's CPU under POSTs (py-spy). Cycles are rare
# here; they are still collected, every 20,000 allocations (a few MiB of garbage at most).
GC_THRESHOLDS = (20_000, 20, 20)
WS_PATH = "/v1/ws"
SWAGGER_ASSETS = "/static/swagger"  # Swagger UI, bundled: /docs needs no internet access

API_DESCRIPTION = """\
A backend publishes a notification with `POST /v1/notifications`; every client subscribed to its
topic receives it over the WebSocket `GET /v1/ws`, whichever instance it is connected to.

Clients that cannot use WebSockets receive the same stream as Server-Sent Events from `GET /v1/sse`;
`GET /v1/topics/{topic}/presence` tells who is on a topic.

Requests carry a bearer token (JWT) in `Authorization: Bearer <token>`: use **Authorize** below to
try them. The WebSocket protocol (frames, close codes, recovery with `since`), the configuration
and the metrics are described in the project's `docs/` directory (start with `docs/api.md`).
"""


class NotifierApp(FastAPI):
    """FastAPI, with ``/v1/ws`` and ``POST /v1/notifications`` handed straight to their endpoints.

    Every open socket keeps its whole call stack alive for as long as it lives: through
    FastAPI's middleware, router and WebSocket route that is a dozen frames and an
    AsyncExitStack, several KiB per idle connection for nothing this endpoint uses (it maps its
    own errors to close codes). So the socket route skips them. So does publishing, the one
    request on the hot path: skipping FastAPI's stack there gave 15% more deliveries per CPU-second
    at 100 subscribers per notification. Both stay declared in FastAPI for the OpenAPI schema.
    """

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and scope["path"] == WS_PATH:
            scope["app"] = self
            await ws.websocket_endpoint(WebSocket(scope, receive, send))
            return
        if scope["type"] == "http" and scope["path"] == PUBLISH_PATH and scope["method"] == "POST":
            await api_publish.publish_endpoint(self.state.services, scope, receive, send)
            return
        if scope["type"] == "http" and scope["path"] == sse.SSE_PATH and scope["method"] == "GET":
            await sse.sse_endpoint(self.state.services, scope, receive, send)
            return
        await super().__call__(scope, receive, send)


def create_app(settings: Settings, broker: Broker | None = None, *, dev_secret: bool = False) -> NotifierApp:
    """An instance's ASGI app; ``broker`` overrides the one ``settings.broker_url`` names (tests).
    ``dev_secret``: the settings' secret was generated at start (``serve`` without one), which a
    token with a bad signature is told."""
    metrics = Metrics()
    if broker is None:
        broker = create_broker(settings.broker_url, settings.history_size, settings.history_ttl)
    node = Node(broker, metrics, settings.history_size)
    keys = KeySet(settings.jwks_url) if settings.jwks_url is not None else None
    # Without a key set the secret is required: settings.secret raises ConfigError naming it.
    secret = settings.secret if keys is None or settings.jwt_secret is not None else None
    authority = TokenAuthority(
        secret, keys, issuer=settings.jwt_issuer, audience=settings.jwt_audience, dev_secret=dev_secret
    )
    services = Services(settings, authority, node, metrics)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await node.start()
        # What exists now lives as long as the instance: out of every later collection.
        gc.collect()
        gc.freeze()
        thresholds = gc.get_threshold()
        gc.set_threshold(*GC_THRESHOLDS)
        try:
            # The key set's first fetch (a failure is logged, not raised) and its refresh loop.
            await authority.start()
            yield
        finally:
            gc.set_threshold(*thresholds)
            gc.unfreeze()
            await authority.close()
            await node.close()

    app = NotifierApp(
        title="notifier",
        version=__version__,
        summary="Real-time notifications over WebSocket, fanned out across instances through Redis",
        description=API_DESCRIPTION,
        docs_url=None,  # served by swagger_ui() below, from bundled assets
        redoc_url=None,
        lifespan=lifespan,
    )
    app.state.services = services
    app.include_router(api_publish.router)
    app.include_router(api.router)
    app.include_router(api_presence.router)
    app.include_router(api_sse.router)
    app.add_api_route("/docs", swagger_ui, include_in_schema=False, response_class=HTMLResponse)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


async def swagger_ui(request: Request) -> HTMLResponse:
    """The OpenAPI UI, with Swagger UI's script, style and icon served by this instance (no CDN)."""
    root = request.scope.get("root_path", "").rstrip("/")
    return get_swagger_ui_html(
        openapi_url=root + "/openapi.json",
        title="notifier API",
        swagger_js_url=f"{root}{SWAGGER_ASSETS}/swagger-ui-bundle.js",
        swagger_css_url=f"{root}{SWAGGER_ASSETS}/swagger-ui.css",
        swagger_favicon_url=f"{root}{SWAGGER_ASSETS}/favicon-32x32.png",
        # No validator badge: it would fetch from validator.swagger.io.
        swagger_ui_parameters={"validatorUrl": None},
    )
