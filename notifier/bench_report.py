"""What ``notifier bench`` measures and how it shows it: latency histograms, the progress line
on stderr, the table (or the one JSON object) on stdout."""

from __future__ import annotations

import asyncio
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import orjson

BUCKETS_PER_MS = 10  # latency resolution 0.1 ms (a frame's ts is in ms: the real one is ~1 ms)
SATURATED = 0.9  # the load generator's CPU over its wall time from which it was the limit


class Histogram:
    """Latencies in ms, counted in 0.1 ms buckets: constant memory per distinct bucket, however
    many samples (a run may record millions)."""

    def __init__(self) -> None:
        self.counts: dict[int, int] = {}
        self.total = 0

    def add(self, ms: float) -> None:
        bucket = int(ms * BUCKETS_PER_MS)
        self.counts[bucket] = self.counts.get(bucket, 0) + 1
        self.total += 1

    def merge(self, other: Histogram) -> None:
        for bucket, count in other.counts.items():
            self.counts[bucket] = self.counts.get(bucket, 0) + count
        self.total += other.total

    def percentile(self, p: float) -> float | None:
        """The ``p``-th percentile (0-100) in ms, None without samples."""
        if not self.total:
            return None
        rank = max(1, round(p / 100 * self.total))
        seen = 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if seen >= rank:
                return round(bucket / BUCKETS_PER_MS, 1)
        return round(max(self.counts) / BUCKETS_PER_MS, 1)  # pragma: no cover - rank <= total

    def summary(self) -> dict[str, float | None]:
        return {"p50": self.percentile(50), "p90": self.percentile(90), "p99": self.percentile(99),
                "max": self.percentile(100)}  # fmt: skip


class Progress:
    """A progress line on stderr about once a second: rewritten in place (``\\r``) on a
    terminal, else one line every few seconds (logs stay short)."""

    def __init__(self, describe: Callable[[], str], stream: TextIO = sys.stderr) -> None:
        self.describe = describe
        self.stream = stream
        self.tty = stream.isatty()
        self.every = 1.0 if self.tty else 5.0
        self.shown = False

    async def run(self) -> None:
        started = time.monotonic()
        for tick in range(1, 100_000):  # bounded: the run's own timeout ends it long before
            await asyncio.sleep(max(0.0, started + tick * self.every - time.monotonic()))
            self.show()

    def show(self) -> None:
        line = self.describe()
        if self.tty:
            self.stream.write(f"\r\x1b[K{line}")
            self.shown = True
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def clear(self) -> None:
        if self.shown:
            self.stream.write("\r\x1b[K")
            self.stream.flush()
            self.shown = False


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:,.1f}"
    if isinstance(value, int):
        return f"{value:,}"
    return str(value)


def _table(headers: list[str], row: list[Any]) -> str:
    cells = [_cell(value) for value in row]
    widths = [max(len(h), len(c)) for h, c in zip(headers, cells, strict=True)]
    head = "  ".join(h.ljust(w) for h, w in zip(headers, widths, strict=True))
    rule = "  ".join("-" * w for w in widths)
    line = "  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True))
    return f"{head.rstrip()}\n{rule}\n{line.rstrip()}"


def render_table(result: dict[str, Any]) -> str:
    """The human-readable result: one table, then the lines that matter (lost, warnings)."""
    common = [result["scenario"], result["url"], result["duration_s"]]
    if result["scenario"] == "handshake":
        ms = result["handshake_ms"]
        headers = ["scenario", "url", "duration s", "concurrency", "handshakes", "handshakes/s",
                   "p50 ms", "p99 ms", "failed"]  # fmt: skip
        row = [*common, result["concurrency"], result["handshakes"], result["handshakes_per_s"],
               ms["p50"], ms["p99"], result["failed"]]  # fmt: skip
        lines = [_table(headers, row)]
        if result["failed"]:
            by = ", ".join(f"{k}: {v}" for k, v in result["failed_by"].items())
            lines.append(f"failed handshakes: {by}")
    else:
        ms = result["latency_ms"]
        headers = ["scenario", "url", "duration s", "sockets", "accepted/s", "deliveries/s",
                   "p50 ms", "p99 ms", "lost", "out_of_order", "errors"]  # fmt: skip
        row = [*common, result["sockets"], result["accepted_per_s"], result["deliveries_per_s"],
               ms["p50"], ms["p99"], result["lost"], result["out_of_order"], result["errors"]]  # fmt: skip
        lines = [_table(headers, row)]
        lines.append(
            f"published {result['published']:,}, accepted {result['accepted']:,} "
            f"(rate asked {result['rate']:,.1f}/s); deliveries expected {result['expected']:,}, "
            f"received {result['received']:,}; latency p90 {_cell(ms['p90'])} ms, max {_cell(ms['max'])} ms"
        )
        if result["lost"]:
            share = 100 * result["lost"] / max(1, result["expected"])
            lines.append(f"LOST: {result['lost']:,} of {result['expected']:,} deliveries ({share:.2f}%)")
        if result["errors"]:
            lines.append(f"errors: {describe_errors(result['errors_by'])}")
    loadgen = result["loadgen"]
    lines.append(
        f"load generator: {loadgen['cpu_share'] * 100:.0f}% of one CPU core"
        f" ({'uvloop' if loadgen['uvloop'] else 'asyncio'})"
    )
    lines.extend(f"warning: {w}" for w in result["warnings"])
    return "\n".join(lines)


def describe_errors(errors_by: dict[str, dict[str, int]]) -> str:
    parts = []
    names = {"publish": "POST answers", "closed": "sockets closed by the server"}
    for kind, counts in errors_by.items():
        if counts:
            shown = ", ".join(f"{key}: {n}" for key, n in sorted(counts.items()))
            parts.append(f"{names.get(kind, kind)} ({shown})")
    return "; ".join(parts)


def render_json(result: dict[str, Any]) -> str:
    return orjson.dumps(result).decode()
