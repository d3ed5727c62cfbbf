"""The HTTP side of ``notifier bench``: POSTs over keep-alive HTTP/1.1 connections.

A minimal client on asyncio streams, for one thing only: ``POST /v1/notifications`` with a
prepared body, answer status kept, body discarded. It costs the load generator about 60 µs of
CPU per request where ``httpx.AsyncClient`` costs over 800 µs (measured on the same machine),
so the generator, not the server, would otherwise be the limit.
"""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

TIMEOUT = 10.0  # one request, connecting included
IDLE = 4.0  # a keep-alive connection idle longer is reopened (uvicorn drops them after 5 s)


class HttpConnection:
    """One keep-alive HTTP/1.1 connection POSTing notifications, one request at a time: a
    minimal client on asyncio streams, several times cheaper per request than a general one."""

    def __init__(self, url: str, token: str | None) -> None:
        parts = urlsplit(url)
        self.tls = parts.scheme == "https"
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.tls else 80)
        auth = f"authorization: Bearer {token}\r\n" if token else ""
        host = parts.netloc.rpartition("@")[2]  # never credentials of the URL in a header
        self.head = (
            f"POST {parts.path.rstrip('/')}/v1/notifications HTTP/1.1\r\nhost: {host}\r\n"
            f"{auth}content-type: application/json\r\ncontent-length: "
        ).encode()
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None
        self.used = 0.0

    async def post(self, body: bytes) -> int:
        """POST ``body``; the answer's status. OSError / IncompleteReadError / TimeoutError when
        the connection failed (it is then closed, and reopened by the next call)."""
        try:
            async with asyncio.timeout(TIMEOUT):
                return await self._post(body)
        except BaseException:
            self.close()
            raise

    async def _post(self, body: bytes) -> int:
        if self.writer is None or time.monotonic() - self.used > IDLE:
            self.close()
            self.reader, self.writer = await asyncio.open_connection(
                self.host, self.port, ssl=True if self.tls else None
            )
        reader, writer = self.reader, self.writer
        assert reader is not None
        writer.write(b"%s%d\r\n\r\n%s" % (self.head, len(body), body))
        head = await reader.readuntil(b"\r\n\r\n")
        status = int(head[9:12])
        length, chunked, keep = 0, False, True
        for line in head.lower().split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                chunked = b"chunked" in value
            elif name == b"connection":
                keep = b"close" not in value
        if chunked:
            while size := int((await reader.readuntil(b"\r\n")).split(b";")[0], 16):
                await reader.readexactly(size + 2)
            await reader.readuntil(b"\r\n")  # the end of the (empty) trailer
        elif length:
            await reader.readexactly(length)
        self.used = time.monotonic()
        if not keep:
            self.close()
        return status

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
        self.reader = self.writer = None
