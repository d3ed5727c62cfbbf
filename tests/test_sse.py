"""GET /v1/sse on real processes: the WebSocket's stream as Server-Sent Events (hello, events
with ids, Last-Event-ID and since recovery, refusals before the stream, pings), through nginx
too, and bounded: a client that never reads is cut off, a drain ends every stream."""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any
from urllib.parse import urlencode

import httpx
import pytest
from conftest import SECRET, mint_token
from support import Instance, memory_instance
from test_faults import Nginx, eventually, metric, post, running

pytestmark = [pytest.mark.anyio, pytest.mark.slow]

Event = dict[str, Any]  # "event", "id" (or None), "data" (parsed JSON), or "comment"


@pytest.fixture(scope="module")
def instance() -> Iterator[Instance]:
    yield from memory_instance(SECRET)


@pytest.fixture
async def http() -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(timeout=10, trust_env=False) as client:
        yield client


class Stream:
    """A raw HTTP/1.1 GET of an event stream on its own socket (its chunked body decoded), its
    events read one at a time."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.status = 0
        self.headers: dict[str, str] = {}
        self.body = b""
        self.buffer = b""
        self.ended = False

    async def _chunk(self) -> None:
        size = int((await self.reader.readuntil(b"\r\n")).strip(), 16)
        data = await self.reader.readexactly(size + 2)
        if size == 0:
            self.ended = True
            raise EOFError("the stream ended")
        self.buffer += data[:-2]

    async def end(self, timeout: float) -> None:
        """Wait for the response to end (its last chunk, or the connection closed)."""
        async with asyncio.timeout(timeout):
            try:
                while True:
                    await self._chunk()
            except (EOFError, asyncio.IncompleteReadError):
                return

    async def next(self, timeout: float = 10) -> Event:
        async with asyncio.timeout(timeout):
            while b"\n\n" not in self.buffer:
                await self._chunk()
        raw, self.buffer = self.buffer.split(b"\n\n", 1)
        event: Event = {"id": None}
        for line in raw.decode().split("\n"):
            if line.startswith(":"):
                return {"comment": line[1:].strip()}
            name, _, value = line.partition(": ")
            assert name in ("id", "event", "data"), raw
            event[name] = json.loads(value) if name == "data" else value
        return event

    async def notification(self, timeout: float = 10) -> Event:
        """The next notification event (pings skipped)."""
        while True:
            event = await self.next(timeout)
            if event.get("event") == "notification":
                return event


@asynccontextmanager
async def stream(base: str, token: str | None, topics: list[str], **headers: str) -> AsyncIterator[Stream]:
    host, port = base.removeprefix("http://").split(":")
    query = {"topics": ",".join(topics), **({"token": token} if token else {})}
    reader, writer = await asyncio.open_connection(host, int(port))
    lines = [f"GET /v1/sse?{urlencode(query)} HTTP/1.1", f"Host: {host}", "Accept: text/event-stream"]
    lines += [f"{name.replace('_', '-')}: {value}" for name, value in headers.items()]
    writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
    s = Stream(reader, writer)
    async with asyncio.timeout(10):
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
    status_line, *rest = head.strip().split("\r\n")
    s.status = int(status_line.split()[1])
    s.headers = {k.lower(): v.strip() for k, _, v in (line.partition(":") for line in rest)}
    if s.status != 200:
        s.body = await reader.readexactly(int(s.headers["content-length"]))
    else:
        assert s.headers.get("transfer-encoding") == "chunked", s.headers
    try:
        yield s
    finally:
        writer.close()


async def test_a_stream_opens_with_hello_then_each_notification_as_an_event_with_its_id(
    instance: Instance, http: httpx.AsyncClient
) -> None:
    token = mint_token("sse-alice", ("subscribe", "publish"))
    async with stream(instance.url, token, ["sse.news"]) as s:
        assert s.status == 200 and s.headers["content-type"].startswith("text/event-stream")
        hello = await s.next()
        assert hello["event"] == "hello" and hello["id"] is None
        assert hello["data"]["type"] == "hello" and "sse.news" in hello["data"]["topics"]
        answers = [await post(http, instance.url, token, "sse.news", {"n": n}) for n in range(3)]
        events = [await s.notification() for _ in range(3)]
    assert [e["id"] for e in events] == [a["id"] for a in answers]
    assert [e["data"]["data"] for e in events] == [{"n": n} for n in range(3)]
    assert all(e["data"]["id"] == e["id"] and e["data"]["topic"] == "sse.news" for e in events)


async def test_last_event_id_resumes_with_everything_missed_and_says_recovered(
    instance: Instance, http: httpx.AsyncClient
) -> None:
    token = mint_token("sse-bob", ("subscribe", "publish"))
    async with stream(instance.url, token, ["sse.resume"]) as s:
        await s.next()
        first = await post(http, instance.url, token, "sse.resume", 1)
        seen = await s.notification()
    assert seen["id"] == first["id"]
    missed = [await post(http, instance.url, token, "sse.resume", n) for n in (2, 3)]
    async with stream(instance.url, token, ["sse.resume"], Last_Event_ID=seen["id"]) as s:
        hello = await s.next()
        again = [await s.notification() for _ in missed]
    assert hello["data"]["recovered"] is True
    assert [e["id"] for e in again] == [m["id"] for m in missed]


async def test_refusals_come_before_the_stream_with_a_status_and_a_reason(instance: Instance) -> None:
    async with stream(instance.url, None, ["sse.x"]) as s:
        assert s.status == 403 and "missing bearer token" in json.loads(s.body)["detail"]
    token = mint_token("sse-carol", ("subscribe",))
    async with stream(instance.url, token, ["sse.x"], Last_Event_ID="not-an-id") as s:
        assert s.status == 403 and "Last-Event-ID" in json.loads(s.body)["detail"]
    async with stream(instance.url, token, ["user:someone-else"]) as s:
        assert s.status == 403


async def test_a_users_streams_beyond_the_per_user_limit_get_429() -> None:
    limited = Instance({"NOTIFIER_BROKER_URL": "memory://", "NOTIFIER_JWT_SECRET": SECRET,
                        "NOTIFIER_MAX_CONNECTIONS_PER_USER": "2"})  # fmt: skip
    token = mint_token("sse-dave", ("subscribe",))
    async with running(limited):
        async with stream(limited.url, token, []) as one, stream(limited.url, token, []) as two:
            assert (one.status, two.status) == (200, 200)
            async with stream(limited.url, token, []) as three:
                assert three.status == 429


async def test_a_quiet_stream_gets_a_ping_comment_within_15_s(instance: Instance) -> None:
    token = mint_token("sse-erin", ("subscribe",))
    async with stream(instance.url, token, ["sse.quiet"]) as s:
        await s.next()
        started = time.monotonic()
        ping = await s.next(timeout=20)
    assert ping == {"comment": "ping"}
    assert time.monotonic() - started < 20


async def test_through_nginx_each_event_arrives_at_once_and_a_resume_misses_nothing(
    instance: Instance, http: httpx.AsyncClient
) -> None:
    proxy = Nginx([instance])
    proxy.start()
    try:
        token = mint_token("sse-frank", ("subscribe", "publish"))
        async with stream(proxy.url, token, ["sse.proxied"]) as s:
            await s.next()
            first = await post(http, proxy.url, token, "sse.proxied", 1)
            # Not buffered by nginx: the one event comes on its own, well before any ping.
            seen = await s.notification(timeout=5)
        assert seen["id"] == first["id"]
        later = await post(http, proxy.url, token, "sse.proxied", 2)
        async with stream(proxy.url, token, ["sse.proxied"], Last_Event_ID=seen["id"]) as s:
            assert (await s.next())["data"]["recovered"] is True
            assert (await s.notification(timeout=5))["id"] == later["id"]
    finally:
        proxy.stop()


async def test_a_client_that_never_reads_is_cut_off_and_its_slot_freed(http: httpx.AsyncClient) -> None:
    """Bound: NOTIFIER_SEND_QUEUE_BYTES (here 256 KiB) of events queued for a stream, plus the
    socket buffers; beyond it the stream is ended, and dropped after the close grace if the
    client still takes nothing. The instance keeps serving."""
    server = Instance({"NOTIFIER_BROKER_URL": "memory://", "NOTIFIER_JWT_SECRET": SECRET,
                       "NOTIFIER_SEND_QUEUE_BYTES": "262144"})  # fmt: skip
    token = mint_token("sse-grace", ("subscribe", "publish"))
    async with running(server):
        async with stream(server.url, token, ["sse.flood"]) as s:
            await s.next()
            s.reader._transport.pause_reading()  # type: ignore[attr-defined]  # a client that stops reading
            pad = "x" * 60_000
            for _ in range(80):  # 4.8 MB: far past the bound and what socket buffers take
                await post(http, server.url, token, "sse.flood", pad)

            async def gone() -> bool:
                return await metric(http, server, "notifier_connections") == 0

            await eventually(gone, "the stream that never reads dropped", 30)
        async with stream(server.url, token, ["sse.after"]) as s:
            assert (await s.next())["event"] == "hello"


async def test_a_drain_ends_every_stream() -> None:
    server = Instance({"NOTIFIER_BROKER_URL": "memory://", "NOTIFIER_JWT_SECRET": SECRET,
                       "NOTIFIER_SHUTDOWN_TIMEOUT": "4"})  # fmt: skip
    token = mint_token("sse-heidi", ("subscribe",))
    async with running(server):
        async with stream(server.url, token, ["sse.drain"]) as s:
            await s.next()
            assert server.proc is not None
            server.proc.send_signal(signal.SIGTERM)
            await s.end(timeout=10)  # the response ends within the drain, not when the client leaves
            assert s.ended  # with its last chunk: ended by the instance, not cut by its exit
