"""Redis time per publish: the publishing script's ``usec_per_call`` (INFO commandstats).

Starts its own redis-server on a free loopback port, publishes ``--count`` notifications of
about 250 bytes over ``--topics`` topics through notifier's Redis broker, ``--concurrency`` at a
time (1: one after the other; more: as concurrent POSTs would, so that the broker can put the
publishes of one loop iteration in one script call), and prints Redis's own accounting of the
scripts' time (INFO commandstats) per notification. Repeat to see the spread:

    python -m benchmarks.redis_cost --repeat 5 [--concurrency 32]

``--tree PATH`` imports notifier from another checkout (e.g. a ``git worktree`` of an older
commit) to compare the two on the same machine.
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
from typing import Any


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def _once(count: int, topics: int, concurrency: int) -> float:
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
        callbacks: list[Any] = [lambda _n: None, lambda _c: None, lambda _lost: None]
        try:
            await broker.start(*callbacks)
        except TypeError:  # an older tree: no resync callback
            await broker.start(*callbacks[:2])
        while not broker.connected and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        await admin.config_resetstat()
        data = b'{"title":"hello","body":"' + b"x" * 200 + b'"}'

        async def publisher(first: int) -> None:
            for i in range(first, count, concurrency):
                await broker.publish(f"cost-{i % topics}", data, int(time.time() * 1000))

        await asyncio.gather(*(publisher(k) for k in range(concurrency)))
        stats = await admin.info("commandstats")
        await broker.close()
        return float(stats["cmdstat_evalsha"]["usec"]) / count
    finally:
        await admin.aclose()
        server.terminate()
        server.wait(10)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--count", type=int, default=5000)
    parser.add_argument("--topics", type=int, default=500)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=1, help="publishes in flight (default 1)")
    parser.add_argument("--tree", help="import notifier from this checkout")
    args = parser.parse_args(argv)
    if args.tree:
        sys.path.insert(0, args.tree)
    runs = [asyncio.run(_once(args.count, args.topics, args.concurrency)) for _ in range(args.repeat)]
    shown = ", ".join(f"{r:.1f}" for r in runs)
    print(
        f"publish scripts, {args.concurrency} in flight: median {statistics.median(runs):.1f} us of Redis"
        f" time per notification (runs: {shown})"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
