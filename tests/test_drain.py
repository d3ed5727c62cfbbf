"""Graceful drain of a real instance on SIGTERM, as its clients and a load balancer see it."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import pytest
from conftest import SECRET, mint_token
from support import Instance
from websockets.asyncio.client import connect
from websockets.exceptions import ConnectionClosed, InvalidStatus

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

CLIENTS = 40
SHUTDOWN_TIMEOUT = 4.0


async def test_sigterm_drains_readiness_first_then_paced_1001_closes_then_exit_0() -> None:
    instance = Instance({"NOTIFIER_JWT_SECRET": SECRET, "NOTIFIER_SHUTDOWN_TIMEOUT": str(SHUTDOWN_TIMEOUT)})
    instance.start()
    token = mint_token()
    url = f"{instance.ws_url}?token={token}"
    try:
        sockets = [await connect(url, compression=None) for _ in range(CLIENTS)]
        for ws in sockets:
            assert '"hello"' in str(await asyncio.wait_for(ws.recv(), 10))
        closed_at: list[float] = []
        codes: list[int] = []

        async def wait_close(ws: object) -> None:
            try:
                await asyncio.wait_for(ws.recv(), SHUTDOWN_TIMEOUT + 5)  # type: ignore[attr-defined]
            except ConnectionClosed as closed:
                closed_at.append(time.monotonic())
                codes.append(closed.rcvd.code if closed.rcvd else -1)

        waiters = [asyncio.create_task(wait_close(ws)) for ws in sockets]
        assert instance.proc is not None
        sent = time.monotonic()
        instance.proc.send_signal(signal.SIGTERM)

        async with httpx.AsyncClient(timeout=2) as http:
            # Readiness turns 503 first while the listener keeps answering; new sockets get 503.
            deadline = time.monotonic() + 2
            while (await http.get(instance.url + "/readyz")).status_code != 503:
                assert time.monotonic() < deadline, "/readyz never turned 503"
            with pytest.raises(InvalidStatus) as refused:
                await connect(url, compression=None)
            assert refused.value.response.status_code == 503

        await asyncio.gather(*waiters)
        exit_code = await asyncio.to_thread(instance.proc.wait, SHUTDOWN_TIMEOUT + 5)
        exited = time.monotonic()

        assert codes == [1001] * CLIENTS
        spread = max(closed_at) - min(closed_at)
        assert spread > 0.05, "all sockets were closed in the same instant"  # paced, not at once
        assert max(closed_at) - sent <= SHUTDOWN_TIMEOUT / 2 + 1.0  # within half the timeout (+ slack)
        assert exit_code == 0
        assert exited - sent <= SHUTDOWN_TIMEOUT + 5
    finally:
        instance.stop()
