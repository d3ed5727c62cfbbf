"""Redis time per publish: the publishing script's ``usec_per_call`` (INFO commandstats).

Starts its own redis-server on a free loopback port, publishes ``--count`` notifications of
about 250 bytes over ``--topics`` topics through notifier's Redis broker, ``--concurrency`` at a
time (1: one after the other; more: as concurrent POSTs would, so that the broker can put the
publishes of one loop iteration in one script call), and prints Redis's own accounting of the
scripts' time (INFO commandstats) per notification. Repeat to see the spread:

    python -m benchmarks.redis_cost --repeat 5 [--concurrency 32]

``--tree PATH`` imports notifier from another checkout (e.g. a ``git worktree`` of an older
commit) to compare the two on the same machine.

``--presence``: the presence script instead (``Broker.presence_update``, what an instance sends
about 50 ms after handshakes and closes): ``--count`` users join (count 1 on their own
``user:<sub>`` topic, and on the shared ``room`` with ``--room``) in calls of ``--batch`` changes,
then leave (count 0) the same way; Redis time per handshake = the script's usec / ``--count``
(one join and one leave each), and per change:

    python -m benchmarks.redis_cost --presence --repeat 5 [--batch 64] [--room]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@asynccontextmanager
async def _redis_and_broker(start: Callable[[Any], Awaitable[None]]) -> AsyncIterator[tuple[Any, Any]]:
    """A redis-server of its own on a free loopback port, and notifier's Redis broker on it
    (``start(broker)`` starts it), connected: ``(admin client, broker)``; both gone afterwards."""
    from redis.asyncio import Redis

    from notifier.broker_redis import RedisBroker

    port = _free_port()
    binary = shutil.which("redis-server") or "/usr/bin/redis-server"
    server = subprocess.Popen(
        [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
        stdout=subprocess.DEVNULL,
    )
    admin = Redis(port=port)
    try:
        deadline = time.monotonic() + 10
        while True:
            try:
                await admin.ping()
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                await asyncio.sleep(0.05)
        broker = RedisBroker(f"redis://127.0.0.1:{port}/0")
        await start(broker)
        while not broker.connected and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        try:
            yield admin, broker
        finally:
            await broker.close()
    finally:
        await admin.aclose()
        server.terminate()
        server.wait(10)


async def _start(broker: Any) -> None:
    callbacks: list[Any] = [lambda _n: None, lambda _c: None, lambda _lost: None]
    try:
        await broker.start(*callbacks)
    except TypeError:  # an older tree: no resync callback
        await broker.start(*callbacks[:2])


async def _once(count: int, topics: int, concurrency: int) -> float:
    async with _redis_and_broker(_start) as (admin, broker):
        await admin.config_resetstat()
        data = b'{"title":"hello","body":"' + b"x" * 200 + b'"}'

        async def publisher(first: int) -> None:
            for i in range(first, count, concurrency):
                await broker.publish(f"cost-{i % topics}", data, int(time.time() * 1000))

        await asyncio.gather(*(publisher(k) for k in range(concurrency)))
        stats = await admin.info("commandstats")
        return float(stats["cmdstat_evalsha"]["usec"]) / count


async def _presence_once(count: int, batch: int, room: bool) -> tuple[float, float, int]:
    """(Redis usec per handshake, usec per change, script calls) for ``count`` joins and leaves."""
    async with _redis_and_broker(_start) as (admin, broker):
        await broker.presence_update([("warm", "up", 1)])
        await admin.config_resetstat()
        changes = 0
        calls = 0
        for value in (1, 0):  # everyone joins, then everyone leaves
            for first in range(0, count, batch):
                chunk = []
                for i in range(first, min(count, first + batch)):
                    chunk.append((f"user:u{i}", f"u{i}", value))
                    if room:
                        chunk.append(("room", f"u{i}", value))
                await broker.presence_update(chunk)
                changes += len(chunk)
                calls += 1
        stats = await admin.info("commandstats")
        usec = float(stats["cmdstat_evalsha"]["usec"])
        return usec / count, usec / changes, calls


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--topics", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=1, help="publishes in flight (default 1)")
    parser.add_argument("--tree", help="import notifier from this checkout")
    parser.add_argument("--presence", action="store_true", help="the presence script (see above)")
    parser.add_argument("--batch", type=int, default=64, help="--presence: changes per call (64)")
    parser.add_argument("--room", action="store_true", help="--presence: each user also on one shared topic")
    args = parser.parse_args(argv)
    if args.tree:
        sys.path.insert(0, args.tree)
    if args.presence:
        if not 1 <= args.count <= 200000 or not 1 <= args.batch <= 256:
            parser.error("--presence: --count 1..200000, --batch 1..256")
        results = [asyncio.run(_presence_once(args.count, args.batch, args.room)) for _ in range(args.repeat)]
        per_hs = [r[0] for r in results]
        shown = ", ".join(f"{r:.1f}" for r in per_hs)
        room = " and the shared room" if args.room else ""
        print(
            f"presence script, {args.batch} handshakes per call, own topic{room}: median"
            f" {statistics.median(per_hs):.1f} us of Redis time per handshake (join + leave; runs: {shown});"
            f" {statistics.median(r[1] for r in results):.2f} us per change, {results[0][2]} calls per run"
        )
        return 0
    runs = [asyncio.run(_once(args.count, args.topics, args.concurrency)) for _ in range(args.repeat)]
    shown = ", ".join(f"{r:.1f}" for r in runs)
    print(
        f"publish scripts, {args.concurrency} in flight: median {statistics.median(runs):.1f} us of Redis"
        f" time per notification (runs: {shown})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
