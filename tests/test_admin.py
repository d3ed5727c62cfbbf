"""The admin API, ``POST /v1/users/{sub}/disconnect``, on real processes: two ``notifier serve``
instances sharing a real redis-server, and the ``notifier disconnect`` command.

What a user sees: every connection of that user, on every instance, closed with 4403 within
2 s; with ``reject_tokens_issued_before``, that user's older tokens refused everywhere (handshake
403, requests 401) while newer ones work; other users untouched; only the ``admin`` scope may
ask, and a malformed body is a 422.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
import time
from typing import Any

import httpx
import pytest
from conftest import SECRET, mint_token
from support import ROOT
from test_faults import fresh, handshake_status, hello, next_frame, post, ws_connect, ws_url
from test_hardening import deployment
from websockets.exceptions import ConnectionClosed

pytestmark = [pytest.mark.anyio, pytest.mark.redis, pytest.mark.slow]

ADMIN_CLOSE = 4403


async def disconnect(
    http: httpx.AsyncClient, url: str, sub: str, token: str | None, body: Any = None
) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return await http.post(f"{url}/v1/users/{sub}/disconnect", json=body, headers=headers)


async def test_an_admin_disconnect_closes_the_user_everywhere_and_refuses_older_tokens() -> None:
    alice, bob = fresh("alice"), fresh("bob")
    now = int(time.time())
    old = mint_token(alice, iat=now - 10)
    admin = mint_token("ops", ("admin",), iat=now)
    async with deployment(2) as (_redis, [a, b], http, _admin):
        async with (
            ws_connect(ws_url(b.url, old)) as alice_on_b,
            ws_connect(ws_url(a.url, old)) as alice_on_a,
            ws_connect(ws_url(b.url, mint_token(bob))) as bob_on_b,
        ):
            for ws in (alice_on_a, alice_on_b, bob_on_b):
                await hello(ws)
            started = time.monotonic()
            answer = await disconnect(http, a.url, alice, admin, {"reject_tokens_issued_before": now})
            codes = []
            for ws in (alice_on_a, alice_on_b):
                with pytest.raises(ConnectionClosed) as closed:
                    while True:
                        await next_frame(ws, 5)
                assert closed.value.rcvd is not None
                codes.append(closed.value.rcvd.code)
            took = time.monotonic() - started
            sent = await post(http, a.url, mint_token("backend", ("publish",)), f"user:{bob}", "still here")
            assert (await next_frame(bob_on_b))["id"] == sent["id"]
        refused = [await handshake_status(ws_url(i.url, old)) for i in (a, b)]
        publish_with_old = await http.post(
            a.url + "/v1/notifications",
            json={"topic": "news", "data": 1},
            headers={"authorization": f"Bearer {old}"},
        )
        fresh_token = mint_token(alice, iat=now + 1)
        accepted = [await handshake_status(ws_url(i.url, fresh_token)) for i in (a, b)]
    print(f"\n[admin] both of alice's sockets closed {took:.2f} s after the 202")
    assert (answer.status_code, answer.json()) == (202, {})
    assert codes == [ADMIN_CLOSE, ADMIN_CLOSE] and took < 2
    assert refused == [403, 403]
    assert publish_with_old.status_code == 401 and "revoked" in publish_with_old.json()["detail"]
    assert accepted == [101, 101]


async def test_only_the_admin_scope_may_disconnect_and_a_bad_body_is_422() -> None:
    async with deployment() as (_redis, [instance], http, _admin):
        target = fresh("alice")
        admin = mint_token("ops", ("admin",))
        async with ws_connect(ws_url(instance.url, mint_token(target))) as ws:
            await hello(ws)
            statuses = [
                (await disconnect(http, instance.url, target, None)).status_code,
                (await disconnect(http, instance.url, target, mint_token("user"))).status_code,
                (
                    await disconnect(http, instance.url, target, admin, {"reject_tokens_issued_before": "x"})
                ).status_code,
                (await disconnect(http, instance.url, target, admin, {"unknown": 1})).status_code,
                (await disconnect(http, instance.url, target, admin, [1])).status_code,
            ]
            # None of those closed the socket: a ping still gets its pong.
            await ws.send('{"type": "ping", "ref": 1}')
            assert await next_frame(ws) == {"type": "pong", "ref": 1}
    assert statuses == [401, 403, 422, 422, 422]


async def test_notifier_disconnect_calls_the_admin_api_and_says_what_it_did() -> None:
    async with deployment() as (_redis, [instance], _http, _admin):
        target = fresh("carol")
        env = {"NOTIFIER_URL": instance.url, "NOTIFIER_JWT_SECRET": SECRET, "PATH": "/usr/bin:/bin"}

        def run(*args: str, token: str) -> subprocess.CompletedProcess[str]:
            return subprocess.run(
                [sys.executable, "-m", "notifier", "disconnect", *args, "--token", token],
                cwd=ROOT,
                env=env,
                capture_output=True,
                text=True,
                timeout=30,
            )

        async with ws_connect(ws_url(instance.url, mint_token(target))) as ws:
            await hello(ws)
            done = await asyncio.to_thread(run, target, "--reject-now", token=mint_token("ops", ("admin",)))
            with pytest.raises(ConnectionClosed) as closed:
                while True:
                    await next_frame(ws, 5)
        denied = await asyncio.to_thread(run, target, token=mint_token("ops", ("publish",)))
    assert done.returncode == 0, done.stderr
    assert target in done.stdout and "refused for 24 h" in done.stdout
    assert closed.value.rcvd is not None and closed.value.rcvd.code == ADMIN_CLOSE
    assert denied.returncode != 0 and denied.stdout == ""
    assert denied.stderr.count("\n") == 1 and "lacks the 'admin' scope" in denied.stderr
