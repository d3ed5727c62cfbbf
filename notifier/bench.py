"""``notifier bench``: a load test of a running deployment, bounded in time.

``fanout``: ``--subscribers`` sockets on one topic, notifications POSTed at ``--rate``/s; every
one should reach every socket. ``personal``: each socket on a topic of its own, the POSTs going
round the topics. ``handshake``: ``--concurrency`` workers opening and closing sockets.

Latency is a frame's receive time minus its ``ts`` (the acceptance time, ms); ``lost`` is the
deliveries expected (notifications answered 202 times the sockets of their topic) minus those
received once the counts settled (at most ``DRAIN`` s after the last answer). Everything is
bounded: counts, each request and handshake, and the whole run (:func:`budget`).
"""

from __future__ import annotations

import asyncio
import math
import secrets
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import orjson
from websockets.asyncio.client import ClientConnection, connect
from websockets.exceptions import ConnectionClosed, InvalidHandshake, InvalidStatus, InvalidURI

from notifier.auth import SUBSCRIBE, TokenAuthority
from notifier.bench_http import HttpConnection
from notifier.bench_report import SATURATED, Histogram, Progress
from notifier.client import Client, ClientError, _detail, _reason, ws_url

SCENARIOS = ("fanout", "personal", "handshake")
DEFAULTS = {"fanout": (100, 20.0), "personal": (50, 500.0)}  # (subscribers, rate)
DEFAULT_DURATION = 10.0
DEFAULT_CONCURRENCY = 20
MAX_DURATION = 300.0
MAX_SUBSCRIBERS = 10_000
MAX_RATE = 50_000.0
MAX_CONCURRENCY = 1_000
DRAIN = 5.0  # at most this long after the last answer for the deliveries to settle
TIMEOUT = 10.0  # one handshake (one POST: bench_http.TIMEOUT)
OPENING = 64  # handshakes in flight while a run opens its sockets
MAX_CONNECTIONS = 64  # publishing connections at most (one POST in flight on each)


class BenchError(Exception):
    """The run could not be made (or stopped): one line, exit status 1."""


@dataclass(frozen=True)
class Options:
    url: str  # http(s)://, as notifier.client.http_url gives it
    token: str | None
    scenario: str
    duration: float = DEFAULT_DURATION
    subscribers: int = 0
    rate: float = 0.0
    concurrency: int = DEFAULT_CONCURRENCY
    authority: TokenAuthority | None = None  # mints a token per socket (NOTIFIER_JWT_SECRET)


def budget(options: Options) -> float:
    """The whole run's wall-clock bound: the measured time, draining, and setup and teardown."""
    return options.duration + DRAIN + 2 * TIMEOUT + 30.0 + options.subscribers / 50


# -- the run -----------------------------------------------------------------------------------


@dataclass
class Run:
    options: Options
    run_id: str = field(default_factory=lambda: secrets.token_hex(4))
    latency: Histogram = field(default_factory=Histogram)
    phase: str = "checking the token"
    started: float = 0.0  # monotonic, when the measured part began
    sockets: list[ClientConnection] = field(default_factory=list)
    readers: list[asyncio.Task[None]] = field(default_factory=list)
    closing: bool = False
    published: int = 0
    accepted: int = 0
    received: int = 0
    out_of_order: int = 0
    handshakes: int = 0
    accepted_by: list[int] = field(default_factory=list)  # per topic (personal), or [n] (fanout)
    target: float = math.inf  # the deliveries expected, once known: then ``settled`` is set
    settled: asyncio.Event = field(default_factory=asyncio.Event)
    errors: dict[str, Counter[str]] = field(
        default_factory=lambda: {"publish": Counter(), "closed": Counter()}
    )
    failed: Counter[str] = field(default_factory=Counter)  # handshakes of the handshake scenario
    last_delivery: float = 0.0
    max_backlog: int = 0

    @property
    def topic(self) -> str:
        return f"bench.{self.run_id}"

    def topics(self) -> list[str]:
        if self.options.scenario == "personal":
            return [f"{self.topic}.{i}" for i in range(self.options.subscribers)]
        return [self.topic]

    def token(self, i: int) -> str | None:
        """The token of socket ``i``: its own (a distinct ``sub``) when a secret is at hand."""
        authority = self.options.authority
        if authority is None:
            return self.options.token
        ttl = int(budget(self.options)) + 60
        return authority.mint(f"bench-{self.run_id}-{i}", [SUBSCRIBE], ttl=ttl)

    def describe(self) -> str:
        """The progress line."""
        if not self.started:
            return f"bench {self.options.scenario}: {self.phase}"
        elapsed = min(time.monotonic() - self.started, self.options.duration)
        done = f"bench {self.options.scenario}: {elapsed:.0f}/{self.options.duration:.0f} s"
        if self.options.scenario == "handshake":
            return f"{done}, {self.handshakes:,} handshakes, {sum(self.failed.values()):,} failed"
        errors = sum(sum(c.values()) for c in self.errors.values())
        return f"{done}, {self.accepted:,} accepted, {self.received:,} deliveries, {errors:,} errors"

    # -- sockets --------------------------------------------------------------------------------

    async def open(self, i: int, topic: str) -> ClientConnection:
        """Socket ``i`` on ``topic``, once its ``hello`` came; BenchError if refused."""
        token = self.token(i)
        url = ws_url(self.options.url, token, [topic], None)
        try:
            async with asyncio.timeout(TIMEOUT):
                ws = await connect(url, compression=None, max_size=None, open_timeout=None, close_timeout=2)
                try:
                    hello = orjson.loads(await ws.recv())
                except BaseException:
                    await ws.close()
                    raise
        except InvalidStatus as exc:
            raise BenchError(self._refused(i, exc)) from None
        except InvalidURI as exc:
            raise BenchError(f"invalid URL {self.options.url!r}: {exc}") from None
        except (OSError, TimeoutError, InvalidHandshake, ConnectionClosed) as exc:
            why = "no hello within 10 s" if isinstance(exc, TimeoutError) else _reason(exc)
            raise BenchError(f"socket {i + 1}: cannot connect to {self.options.url}: {why}") from None
        if hello.get("type") != "hello":
            await ws.close()
            raise BenchError(f"socket {i + 1}: the first frame was not hello but {hello.get('type')!r}")
        return ws

    def _refused(self, i: int, exc: InvalidStatus) -> str:
        status, detail = exc.response.status_code, _detail(exc.response.body)
        count = self.options.subscribers or self.options.concurrency
        line = f"socket {i + 1} of {count}: handshake refused: HTTP {status}"
        line += f": {detail}" if detail else ""
        if status == 429 and self.options.authority is None:
            line += (
                " (all sockets share the one token's user: set NOTIFIER_JWT_SECRET to the deployment's "
                "secret so that each socket gets a token of its own, or ask for fewer --subscribers)"
            )
        elif status in (401, 403) and self.options.authority is not None:
            line += (
                "; the sockets use tokens signed with NOTIFIER_JWT_SECRET: set it to the "
                "deployment's secret, or unset it to use --token for every socket"
            )
        return line

    async def open_all(self) -> None:
        topics = self.topics()
        count = self.options.subscribers
        gate = asyncio.Semaphore(OPENING)

        async def one(i: int) -> None:
            async with gate:
                ws = await self.open(i, topics[i % len(topics)])
            self.sockets.append(ws)
            self.readers.append(asyncio.create_task(self.read(ws, topics[i % len(topics)])))
            self.phase = f"opening sockets ({len(self.sockets):,}/{count:,})"

        try:
            async with asyncio.TaskGroup() as group:
                for i in range(count):
                    group.create_task(one(i))
        except BaseExceptionGroup as group_error:
            first = group_error.exceptions[0]
            raise first if isinstance(first, BenchError) else BenchError(_reason(first)) from None

    async def read(self, ws: ClientConnection, topic: str) -> None:
        """Count the deliveries of ``topic`` on ``ws``, their latency and their order."""
        last = 0
        add = self.latency.add
        try:
            async for raw in ws:
                now = time.time() * 1000
                frame = orjson.loads(raw)
                if frame.get("topic") != topic or frame.get("type") != "notification":
                    continue
                add(now - frame["ts"])
                id_ = int(frame["id"])
                if id_ <= last:
                    self.out_of_order += 1
                else:
                    last = id_
                self.received += 1
                self.last_delivery = time.monotonic()
                if self.received >= self.target:
                    self.settled.set()
        except ConnectionClosed:
            pass
        if not self.closing:
            self.errors["closed"][str(ws.close_code or 1006)] += 1

    async def close_all(self) -> None:
        self.closing = True
        if self.sockets:
            closes = [asyncio.create_task(ws.close()) for ws in self.sockets]
            await asyncio.wait(closes, timeout=5)
            for task in closes:
                task.cancel()
        for ws in self.sockets:
            ws.transport.abort()
        for reader in self.readers:
            reader.cancel()
        await asyncio.gather(*self.readers, return_exceptions=True)

    # -- publishing -----------------------------------------------------------------------------

    async def publish(self) -> float:
        """POST at the rate for the duration, open loop: each notification is due at
        ``start + n / rate`` and sent then on an idle connection (a new one while fewer than
        ``MAX_CONNECTIONS`` are open), whatever the answers of the ones before; the seconds from
        the first due to the last answer. With every connection busy the sending falls behind,
        which ``accepted_per_s`` (and ``max_backlog``) shows."""
        options = self.options
        total = max(1, int(options.duration * options.rate))
        bodies = [b'{"topic":"%s","data":{"n":' % t.encode() for t in self.topics()]
        self.accepted_by = [0] * len(bodies)
        idle: list[HttpConnection] = []  # the last one used on top: a slow rate keeps reusing one
        opened: list[HttpConnection] = []
        slots = asyncio.Semaphore(MAX_CONNECTIONS)  # POSTs in flight, each on its own connection
        sending: set[asyncio.Task[None]] = set()

        async def send(n: int) -> None:
            if idle:
                connection = idle.pop()
            else:
                connection = HttpConnection(options.url, options.token)
                opened.append(connection)
            which = n % len(bodies)
            try:
                status = await connection.post(b"%s%d}}" % (bodies[which], n))
            except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError, ValueError):
                self.errors["publish"]["connection failed"] += 1
                return
            except TimeoutError:
                self.errors["publish"]["timeout"] += 1
                return
            finally:
                idle.append(connection)
                slots.release()
            if status == 202:
                self.accepted += 1
                self.accepted_by[which] += 1
            else:
                self.errors["publish"][str(status)] += 1

        start = time.monotonic()
        try:
            while self.published < total:
                due = min(total, int((time.monotonic() - start) * options.rate) + 1)
                self.max_backlog = max(self.max_backlog, due - self.published)
                for _ in range(due - self.published):
                    await slots.acquire()
                    task = asyncio.create_task(send(self.published))
                    sending.add(task)
                    task.add_done_callback(sending.discard)
                    self.published += 1
                # At least 1 ms: the loop's timers have that resolution, less would spin. What
                # fell due meanwhile goes out together at the next tick.
                await asyncio.sleep(max(0.001, start + self.published / options.rate - time.monotonic()))
            await asyncio.gather(*sending)
        finally:
            for task in sending:
                task.cancel()
            for connection in opened:
                connection.close()
        return time.monotonic() - start

    def expected(self) -> int:
        per_topic = self.options.subscribers // len(self.accepted_by)
        return sum(self.accepted_by) * per_topic

    # -- scenarios ------------------------------------------------------------------------------

    async def deliveries(self) -> dict[str, Any]:
        options = self.options
        self.phase = f"opening sockets (0/{options.subscribers:,})"
        await self.open_all()
        self.started = time.monotonic()
        self.phase = "publishing"
        cpu = time.process_time()
        elapsed = await self.publish()
        self.phase = "waiting for the last deliveries"
        expected = self.expected()
        self.target = expected
        if self.received >= expected:
            self.settled.set()
        answered = time.monotonic()
        try:
            await asyncio.wait_for(self.settled.wait(), DRAIN)
        except TimeoutError:
            pass
        drained = time.monotonic() - answered
        wall = time.monotonic() - self.started
        cpu = time.process_time() - cpu
        delivering = max(elapsed, (self.last_delivery or answered) - self.started)
        errors_by = {kind: dict(counts) for kind, counts in self.errors.items()}
        return {
            "sockets": options.subscribers,
            "topics": len(self.accepted_by),
            "rate": options.rate,
            "published": self.published,
            "accepted": self.accepted,
            "accepted_per_s": round(self.accepted / elapsed, 1),
            "expected": expected,
            "received": self.received,
            "deliveries_per_s": round(self.received / delivering, 1),
            "latency_ms": self.latency.summary(),
            "lost": max(0, expected - self.received),
            "out_of_order": self.out_of_order,
            "errors": sum(sum(c.values()) for c in self.errors.values()),
            "errors_by": errors_by,
            "publish_s": round(elapsed, 2),
            "drain_s": round(drained, 2),
            "max_backlog": self.max_backlog,
            "_cpu": (cpu, wall),
        }

    async def handshake(self) -> dict[str, Any]:
        options = self.options
        urls = [ws_url(options.url, self.token(i), [self.topic], None) for i in range(options.concurrency)]
        failed = self.failed
        if options.authority is not None:  # a token it signed refused: one clear line, not failures
            await (await self.open(0, self.topic)).close()
        self.started = time.monotonic()
        self.phase = "opening and closing sockets"
        cpu = time.process_time()
        end = self.started + options.duration

        async def worker(url: str) -> None:
            while time.monotonic() < end:
                began = time.perf_counter()
                try:
                    async with asyncio.timeout(TIMEOUT):
                        ws = await connect(url, compression=None, open_timeout=None, close_timeout=2)
                        try:
                            hello = orjson.loads(await ws.recv())
                            took = (time.perf_counter() - began) * 1000
                        finally:
                            await ws.close()
                except InvalidStatus as exc:
                    failed[str(exc.response.status_code)] += 1
                except TimeoutError:
                    failed["timeout"] += 1
                except (OSError, InvalidHandshake, ConnectionClosed):
                    failed["connection failed"] += 1
                else:
                    if hello.get("type") == "hello":
                        self.handshakes += 1
                        self.latency.add(took)
                        continue
                    failed["no hello"] += 1
                await asyncio.sleep(0.01)  # after a failure: no tight loop against a refusing server

        await asyncio.gather(*(worker(url) for url in urls))
        wall = time.monotonic() - self.started
        cpu = time.process_time() - cpu
        return {
            "concurrency": options.concurrency,
            "handshakes": self.handshakes,
            "handshakes_per_s": round(self.handshakes / wall, 1),
            "handshake_ms": self.latency.summary(),
            "failed": sum(failed.values()),
            "failed_by": dict(failed),
            "_cpu": (cpu, wall),
        }

    async def check_token(self) -> None:
        """One cheap request per scope, so that a refused token is one clear line before any load."""
        try:
            async with Client(self.options.url, self.options.token, timeout=TIMEOUT) as client:
                await client.history(self.topic, limit=1)
                if self.options.scenario != "handshake":
                    await client.publish(self.topic, {"bench": "check"})
        except ClientError as exc:
            if exc.status == 403:
                hint = "notifier bench needs a token with both scopes and no topics claim"
                raise ClientError(f"{exc} ({hint})", exc.status, exc.detail) from None
            raise

    async def run(self) -> dict[str, Any]:
        await self.check_token()
        if self.options.scenario == "handshake":
            result = await self.handshake()
        else:
            result = await self.deliveries()
        cpu, wall = result.pop("_cpu")
        share = cpu / wall if wall > 0 else 0.0
        warnings = []
        if share >= SATURATED:
            warnings.append(
                f"the load generator used {share * 100:.0f}% of a CPU core: it was probably the "
                "limit, not the server (run fewer sockets or a lower rate per process)"
            )
        if self.options.scenario != "handshake" and result["accepted_per_s"] < 0.9 * self.options.rate:
            warnings.append(
                f"accepted {result['accepted_per_s']:,.1f}/s of the {self.options.rate:,.1f}/s asked: "
                "the server (or this load generator) could not keep up"
            )
        if self.failed.get("429") and self.options.authority is None:
            warnings.append(
                "handshakes refused with 429: the one token's user is at the per-user limit "
                "(NOTIFIER_MAX_CONNECTIONS_PER_USER); set NOTIFIER_JWT_SECRET or lower --concurrency"
            )
        return {
            "scenario": self.options.scenario,
            "url": self.options.url,
            "duration_s": self.options.duration,
            **result,
            "loadgen": {"cpu_s": round(cpu, 2), "cpu_share": round(share, 3), "uvloop": _uvloop_running()},
            "warnings": warnings,
        }


def _uvloop_running() -> bool:
    return type(asyncio.get_running_loop()).__module__.startswith("uvloop")


async def bench(options: Options, progress: Progress | None = None) -> dict[str, Any]:
    """Run one scenario against ``options.url``; the result (see :mod:`notifier.bench_report`)."""
    run = Run(options)
    if progress is not None:
        progress.describe = run.describe
    shower = asyncio.create_task(progress.run()) if progress is not None else None
    limit = budget(options)
    try:
        async with asyncio.timeout(limit):
            return await run.run()
    except TimeoutError:
        raise BenchError(
            f"the run did not finish within {limit:.0f} s ({run.phase}): is the server stuck?"
        ) from None
    finally:
        if shower is not None:
            shower.cancel()
            await asyncio.gather(shower, return_exceptions=True)
        if progress is not None:
            progress.clear()
        await run.close_all()


def make_options(
    url: str,
    token: str | None,
    scenario: str,
    *,
    duration: float | None = None,
    subscribers: int | None = None,
    rate: float | None = None,
    concurrency: int | None = None,
    authority: TokenAuthority | None = None,
) -> Options:
    """Options with the scenario's defaults; :class:`ValueError` naming the option when one is
    out of bounds or does not apply to the scenario."""
    duration = DEFAULT_DURATION if duration is None else duration
    if not 0 < duration <= MAX_DURATION:
        raise ValueError(f"--duration: must be more than 0 and at most {MAX_DURATION:.0f} seconds")
    if scenario == "handshake":
        for name, given in (("--subscribers", subscribers), ("--rate", rate)):
            if given is not None:
                raise ValueError(f"{name}: not used by the handshake scenario (it has --concurrency)")
        concurrency = DEFAULT_CONCURRENCY if concurrency is None else concurrency
        if not 1 <= concurrency <= MAX_CONCURRENCY:
            raise ValueError(f"--concurrency: must be between 1 and {MAX_CONCURRENCY:,}")
        return Options(url, token, scenario, duration, concurrency=concurrency, authority=authority)
    if concurrency is not None:
        raise ValueError(f"--concurrency: used by the handshake scenario only, not {scenario}")
    default_subscribers, default_rate = DEFAULTS[scenario]
    subscribers = default_subscribers if subscribers is None else subscribers
    rate = default_rate if rate is None else rate
    if not 1 <= subscribers <= MAX_SUBSCRIBERS:
        raise ValueError(f"--subscribers: must be between 1 and {MAX_SUBSCRIBERS:,}")
    if not math.isfinite(rate) or not 0 < rate <= MAX_RATE:
        raise ValueError(f"--rate: must be more than 0 and at most {MAX_RATE:,.0f} notifications/s")
    if duration * rate < 1:
        raise ValueError("--duration x --rate: less than one notification; raise either")
    return Options(url, token, scenario, duration, subscribers, rate, authority=authority)


def run(options: Options, progress: Progress | None = None) -> dict[str, Any]:
    """:func:`bench` on uvloop when it is installed (cheaper per frame), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(bench(options, progress))
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(bench(options, progress))
