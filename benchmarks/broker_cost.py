"""Broker side: Redis CPU per notification, one Redis vs a three-shard Redis Cluster.

Starts one redis-server, a Redis Cluster of three masters (no replicas) and a one-node cluster
holding every slot (cluster mode's own cost, without sharding) on free loopback ports, and
publishes the same load through notifier's own brokers (``create_broker`` with
``redis://`` and ``redis+cluster://``): ``--count`` notifications of about 250 bytes over
``--topics`` topics, from ``--concurrency`` asyncio tasks at once. Around each run it reads every
server's ``INFO cpu`` (used_cpu_user + used_cpu_sys) and ``INFO commandstats`` (the publishing
script's calls and ``usec_per_call``), and prints Redis CPU per notification for the single Redis
and for the cluster in total, each shard's share of it, and the throughput. The
configurations alternate within each of ``--repeat`` rounds (each goes first, middle and last in
turn) and the table shows medians:

    python -m benchmarks.broker_cost --repeat 3
    python -m benchmarks.broker_cost --count 200 --repeat 1 --json

Throughput is the client's: on a small machine the Python publisher (one process, one core at
most) is the ceiling, not Redis; Redis CPU per notification is what this measures.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any

SCRIPT_COMMANDS = ("evalsha", "eval", "evalsha_ro", "eval_ro", "fcall")
PAYLOAD = b'{"title":"hello","body":"' + b"x" * 220 + b'"}'  # ~250 bytes


def _bindable(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def _free_port(taken: list[int], bus: bool = False) -> int:
    """A free loopback port (and, for a cluster node, its bus port + 10000)."""
    for _ in range(1000):
        port = random.randrange(20000, 50000)
        if port not in taken and _bindable(port) and (not bus or _bindable(port + 10000)):
            return port
    raise RuntimeError("no free loopback port")


def _ask(port: int, *words: Any) -> Any:
    from redis import Redis

    with Redis(port=port, socket_timeout=5, socket_connect_timeout=2, decode_responses=True) as client:
        return client.execute_command(*words)


def _wait(check: Any, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if check():
                return
        except Exception:  # noqa: BLE001 - not up yet
            pass
        time.sleep(0.05)
    raise RuntimeError(f"timed out waiting for {what}")


class Servers:
    """One plain redis-server and three cluster masters; ``stop()`` ends every one it started."""

    def __init__(self) -> None:
        self.binary = shutil.which("redis-server") or "/usr/bin/redis-server"
        self.cli = shutil.which("redis-cli") or "/usr/bin/redis-cli"
        if not os.path.exists(self.binary):
            raise RuntimeError("redis-server is not installed")
        self.dir = tempfile.mkdtemp(prefix="notifier-broker-cost-")
        self.single = _free_port([])
        self.shards: list[int] = []
        for _ in range(3):
            self.shards.append(_free_port([self.single, *self.shards], bus=True))
        # A one-node cluster (every slot on one master): cluster mode's own cost, without sharding.
        self.solo = _free_port([self.single, *self.shards], bus=True)
        self.procs: list[subprocess.Popen[bytes]] = []

    def _spawn(self, port: int, *extra: str) -> None:
        self.procs.append(
            subprocess.Popen(
                [self.binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                 "--appendonly", "no", "--dir", self.dir, *extra],
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
        )  # fmt: skip

    def start(self) -> Servers:
        self._spawn(self.single)
        for port in (*self.shards, self.solo):
            self._spawn(port, "--cluster-enabled", "yes", "--cluster-config-file", f"nodes-{port}.conf",
                        "--cluster-node-timeout", "5000")  # fmt: skip
        for port in (self.single, *self.shards, self.solo):
            _wait(lambda p=port: _ask(p, "PING"), 10, f"redis on port {port}")
        subprocess.run(
            [self.cli, "--cluster", "create", *(f"127.0.0.1:{p}" for p in self.shards),
             "--cluster-replicas", "0", "--cluster-yes"],
            check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=60,
        )  # fmt: skip
        _ask(self.solo, "CLUSTER", "ADDSLOTSRANGE", 0, 16383)
        nodes = (*self.shards, self.solo)
        _wait(
            lambda: all("cluster_state:ok" in _ask(p, "CLUSTER", "INFO") for p in nodes), 30, "the clusters"
        )
        return self

    def stop(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + 10
        for proc in self.procs:
            try:
                proc.wait(max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait(5)
        shutil.rmtree(self.dir, ignore_errors=True)


def _counters(port: int) -> tuple[float, int, int]:
    """(CPU seconds, script calls, script usec) of the server on ``port``, so far."""
    cpu = _ask(port, "INFO", "cpu")
    stats = _ask(port, "INFO", "commandstats")
    calls = usec = 0
    for name in SCRIPT_COMMANDS:
        entry = stats.get(f"cmdstat_{name}")
        if entry:
            calls += int(entry["calls"])
            usec += int(entry["usec"])
    return float(cpu["used_cpu_user"]) + float(cpu["used_cpu_sys"]), calls, usec


async def _publish_load(broker: Any, count: int, topics: int, concurrency: int, prefix: str) -> int:
    """Publish ``count`` notifications; returns how many were refused (a 503 for the API)."""
    from notifier.errors import BrokerUnavailable

    left = iter(range(count))
    refused = 0

    async def worker() -> None:
        nonlocal refused
        for i in left:  # shared: each index is published once, by whichever task takes it
            try:
                await broker.publish(f"{prefix}-{i % topics}", PAYLOAD, int(time.time() * 1000))
            except BrokerUnavailable:
                refused += 1

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return refused


async def _measure(
    url: str, ports: list[int], count: int, topics: int, concurrency: int, idle: float = 1.0
) -> dict[str, Any]:
    from notifier.broker import create_broker

    broker = create_broker(url)

    def noop(*_a: Any) -> None:
        return None

    await broker.start(noop, noop, noop)
    try:
        deadline = time.monotonic() + 30
        while not broker.connected:
            if time.monotonic() > deadline:
                raise RuntimeError(f"broker for {url} never connected")
            await asyncio.sleep(0.05)
        # Warm up (scripts loaded, connections open, cluster slots known) out of the measure.
        await _publish_load(broker, min(500, count), topics, concurrency, "cost")
        # Background (serverCron, cluster bus, the broker's probes): the servers idle for a while.
        idle0, idle_wall0 = [_counters(p)[0] for p in ports], time.perf_counter()
        await asyncio.sleep(idle)
        idle_wall = time.perf_counter() - idle_wall0
        idle_cpu = [_counters(p)[0] - c for p, c in zip(ports, idle0, strict=True)]
        before = [_counters(p) for p in ports]
        wall0, client0 = time.perf_counter(), time.process_time()
        refused = await _publish_load(broker, count, topics, concurrency, "cost")
        wall, client = time.perf_counter() - wall0, time.process_time() - client0
        after = [_counters(p) for p in ports]
    finally:
        await broker.close()
    cpu = [a[0] - b[0] for a, b in zip(after, before, strict=True)]
    calls = [a[1] - b[1] for a, b in zip(after, before, strict=True)]
    usec = [a[2] - b[2] for a, b in zip(after, before, strict=True)]
    total = sum(cpu)
    return {
        "notifications": count,
        "refused": refused,
        "seconds": wall,
        "per_s": count / wall,
        "client_cpu_util": client / wall,
        "redis_cpu_s": total,
        "redis_cpu_us_per_notification": total / count * 1e6,
        "shard_cpu_us_per_notification": [c / count * 1e6 for c in cpu],
        "shard_share": [c / total if total else 0.0 for c in cpu],
        "shard_calls": calls,
        "script_usec_per_call": sum(usec) / sum(calls) if sum(calls) else None,
        "redis_busy": [c / wall for c in cpu],
        # What the same servers burn idle, per notification at this run's rate (already included above).
        "idle_cpu_us_per_notification": sum(idle_cpu) / idle_wall * wall / count * 1e6,
    }


def _median(runs: list[dict[str, Any]], key: str, index: int | None = None) -> float:
    values = [r[key] if index is None else r[key][index] for r in runs]
    return float(statistics.median(values))


CONFIGS = (  # name, label, shards
    ("single", "one Redis", 1),
    ("solo", "one Redis, cluster mode (1 node, all slots)", 1),
    ("cluster", "3-shard cluster (total)", 3),
)


def summarize(runs: dict[str, list[dict[str, Any]]]) -> dict[str, Any]:
    def block(rs: list[dict[str, Any]], shards: int) -> dict[str, Any]:
        return {
            "runs": len(rs),
            "refused": sum(r["refused"] for r in rs),
            "per_s": _median(rs, "per_s"),
            "client_cpu_util": _median(rs, "client_cpu_util"),
            "redis_cpu_us_per_notification": _median(rs, "redis_cpu_us_per_notification"),
            "redis_cpu_us_per_notification_runs": [round(r["redis_cpu_us_per_notification"], 1) for r in rs],
            "script_usec_per_call": _median(rs, "script_usec_per_call"),
            "idle_cpu_us_per_notification": _median(rs, "idle_cpu_us_per_notification"),
            "shard_cpu_us_per_notification": [
                _median(rs, "shard_cpu_us_per_notification", i) for i in range(shards)
            ],  # fmt: skip
            "shard_share": [_median(rs, "shard_share", i) for i in range(shards)],
            "shard_calls_share": [
                statistics.median(r["shard_calls"][i] / sum(r["shard_calls"]) for r in rs)
                for i in range(shards)
            ],  # fmt: skip
            "redis_busy": [_median(rs, "redis_busy", i) for i in range(shards)],
        }

    return {name: block(runs[name], shards) for name, _label, shards in CONFIGS}


def table(summary: dict[str, Any]) -> str:
    rows = [
        "| configuration | notifications/s (client-bound) | Redis CPU us / notification "
        "| script usec_per_call | Redis busy | per-shard CPU us / notification (share) |",
        "|---|---|---|---|---|---|",
    ]
    for name, label, shards in CONFIGS:
        s = summary[name]
        busy = " + ".join(f"{b:.0%}" for b in s["redis_busy"])
        pairs = zip(s["shard_cpu_us_per_notification"], s["shard_share"], strict=True)
        split = " / ".join(f"{c:.1f} ({sh:.0%})" for c, sh in pairs) if shards > 1 else "-"
        rows.append(
            f"| {label} | {s['per_s']:,.0f} | {s['redis_cpu_us_per_notification']:.1f} "
            f"| {s['script_usec_per_call']:.1f} | {busy} | {split} |"
        )
    key = "redis_cpu_us_per_notification"
    one, solo, three = summary["single"][key], summary["solo"][key], summary["cluster"][key]
    busiest = max(summary["cluster"]["shard_cpu_us_per_notification"])
    rows.append("")
    rows.append(
        f"cluster total / one Redis: {three / one:.2f}x CPU per notification "
        f"(vs the 1-node cluster: {three / solo:.2f}x); busiest shard {busiest:.1f} us vs {one:.1f} us "
        f"for one Redis (Redis-bound ceiling x{one / busiest:.1f}) and {solo:.1f} us for the 1-node "
        f"cluster (x{solo / busiest:.1f})"
    )
    rows.append(
        "runs (us/notification): "
        + "; ".join(f"{name} {summary[name][key + '_runs']}" for name, _l, _s in CONFIGS)
        + "; client CPU "
        + " / ".join(f"{summary[name]['client_cpu_util']:.0%}" for name, _l, _s in CONFIGS)
        + " of a core; refused publishes "
        + " / ".join(str(summary[name]["refused"]) for name, _l, _s in CONFIGS)
        + "; idle background (us/notification at the run's rate) "
        + " / ".join(f"{summary[name]['idle_cpu_us_per_notification']:.1f}" for name, _l, _s in CONFIGS)
    )
    return "\n".join(rows)


async def _rounds(servers: Servers, args: argparse.Namespace) -> dict[str, list[dict[str, Any]]]:
    cluster = lambda ports: "redis+cluster://" + ",".join(f"127.0.0.1:{p}" for p in ports)  # noqa: E731
    targets = {
        "single": (f"redis://127.0.0.1:{servers.single}/0", [servers.single]),
        "solo": (cluster([servers.solo]), [servers.solo]),
        "cluster": (cluster(servers.shards), servers.shards),
    }
    runs: dict[str, list[dict[str, Any]]] = {name: [] for name in targets}
    names = [name for name, _label, _shards in CONFIGS]
    for round_ in range(args.repeat):
        # Alternate: each configuration goes first, middle and last in turn.
        shift = round_ % len(names)
        order = names[shift:] + names[:shift]
        if round_ % 2:
            order.reverse()
        for which in order:
            url, ports = targets[which]
            run = await _measure(url, ports, args.count, args.topics, args.concurrency)
            runs[which].append(run)
            print(f"round {round_ + 1} {which}: {run['redis_cpu_us_per_notification']:.1f} us/notification, "
                  f"{run['per_s']:,.0f}/s", file=sys.stderr)  # fmt: skip
    return runs


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--count", type=int, default=20000, help="notifications per run")
    parser.add_argument("--topics", type=int, default=1000)
    parser.add_argument("--concurrency", type=int, default=32, help="publishing asyncio tasks")
    parser.add_argument("--repeat", type=int, default=3, help="rounds; each runs both configurations")
    parser.add_argument("--json", action="store_true", help="print the summary and every run as JSON too")
    args = parser.parse_args(argv)
    if args.count < 1 or args.topics < 1 or args.concurrency < 1 or args.repeat < 1:
        parser.error("--count, --topics, --concurrency and --repeat must be at least 1")
    servers = Servers()
    try:
        servers.start()
        runs = asyncio.run(_rounds(servers, args))
    finally:
        servers.stop()
    summary = summarize(runs)
    print(table(summary))
    if args.json:
        out = {"count": args.count, "topics": args.topics, "concurrency": args.concurrency,
               "repeat": args.repeat, "summary": summary, "runs": runs}  # fmt: skip
        print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
