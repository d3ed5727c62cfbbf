"""The benchmark suite: ``python -m benchmarks [--quick]`` prints one JSON line per scenario per server,
then a table with notifier's ratio to each baseline measured in the same run.

Scenarios (each bounded in count and in time):

- ``fanout``: N subscribers on one topic; notifications (~256-byte frames) published as fast as
  the server delivers them (a window of notifications in flight); deliveries/s and deliveries
  per server CPU-second, for each N of ``--subscribers``;
- ``steady``: 1,000 subscribers x 20 notifications/s (20k deliveries/s) for ``--duration``;
  latency from the frame's ``ts`` to receipt, p50/p90/p99/max; lost = expected - received;
- ``idle_memory``: server RSS before and after opening K idle authenticated connections, in
  steps; KiB per connection (then one notification to all of them: lost must be 0);
- ``cluster``: ``steady`` through nginx over N instances sharing Redis (``deploy/local-cluster``);
- ``personal``: U users, one WebSocket each on its own ``user:`` topic; one POST per notification
  to one user's topic, as fast as the server answers (a bounded number in flight); notifications
  (= deliveries) per server CPU-second, each received exactly once by its user;
- ``multi``: 1,000 such users; each POST names all 1,000 topics (multi-topic publish), windowed as
  in fanout; deliveries per server CPU-second;
- ``handshake``: C connectors opening a WebSocket as a distinct user, waiting for ``hello`` and
  closing, in a loop; handshakes per server CPU-second, connect->hello latency;
- ``handshake_room`` / ``handshake_presence`` (notifier only): the same, each socket also on a
  shared topic (``topics=bench.room``), without / with ``presence=1``;
- ``fanout_sse`` / ``steady_sse`` (notifier only): ``fanout`` / ``steady`` over ``GET /v1/sse``
  event streams (a raw HTTP/1.1 client in the load generator), to compare with the same over
  WebSockets;
- ``presence_events`` (notifier only): ``--presence-listeners`` WebSockets with ``presence=1`` on
  one topic while churners open and close sockets on it as other users; join/leave frames
  delivered per second and per server CPU-second, lag from a churner's ``hello`` to the join.

With Redis, notifier's lines also carry Redis's own accounting over the whole run (INFO
commandstats, reset after start-up): calls and microseconds per handshake (handshake scenarios);
the whole commandstats in latest.json.

The server runs pinned to core 0, the load generator (benchmarks/loadgen.mjs, Node.js, with the
subscribers held by benchmarks/wsrecv.c) to core 1; CPU seconds are utime+stime from
/proc/<pid>/stat read at the start and end of the measurement window. See docs/performance.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks import report
from benchmarks.procs import CLK_TCK, ROOT, cleanup_on_signals, cores, loadavg, rss_kib
from benchmarks.servers import BASELINES, SERVERS, Deployment, Target, start_cluster, start_single

HERE = ROOT / "benchmarks"
LOADGEN = HERE / "loadgen.mjs"
WSRECV_SOURCE = HERE / "wsrecv.c"
WSRECV = HERE / ".build" / "wsrecv"
SCENARIOS = (
    "fanout",
    "steady",
    "idle_memory",
    "cluster",
    "personal",
    "multi",
    "handshake",
    "storm",
    "handshake_room",
    "handshake_presence",
    "fanout_sse",
    "steady_sse",
    "presence_events",
)
# Not in the default run (``--scenarios`` names them): presence and SSE, notifier only.
EXTRA_SCENARIOS = ("handshake_room", "handshake_presence", "fanout_sse", "steady_sse", "presence_events")
NOTIFIER_ONLY = EXTRA_SCENARIOS
HANDSHAKES = ("handshake", "handshake_room", "handshake_presence")
# One WebSocket per user on its own user:<sub> topic (baselines with their topic registry).
USER_SCENARIOS = ("personal", "multi", *HANDSHAKES)
ROOM = "bench.room"  # handshake_room, handshake_presence: the topic every socket also asks for
# personal: at most this many times --notifications (one POST reaches one socket, not N).
PERSONAL_FACTOR = 5
TOPIC = "bench"
# Every result line has exactly these keys (None where they do not apply).
KEYS = (
    "scenario",
    "server",
    "broker",
    "instances",
    "upstream",
    "subscribers",
    "published",
    "deliveries_per_s",
    "deliveries_per_cpu_s",
    "server_cpu_s",
    "server_cpu_util",
    "server_busy",
    "p50_ms",
    "p90_ms",
    "p99_ms",
    "max_ms",
    "lost",
    "out_of_order",
    "rss_kib",
    "rss_before_kib",
    "kib_per_connection",
    "loadgen_cpu_s",
    "loadgen_cpu_util",
    "loadgen_busy",
    "loadgen_saturated",
    "run_queue_wait_s",
    "receiver",
    "nginx_cpu_s",
    "redis_cpu_s",
    "frame_bytes",
    "deflate",
    "measure_s",
    "connect_per_s",
    "accepted_per_s",
    "misrouted",
    "redis_us_per_notification",
    "handshakes_per_s",
    "handshakes_per_cpu_s",
    "handshake_failures",
    "redis_calls_per_op",
    "redis_us_per_op",
    "presence_events_per_s",
    "ratio_metric",
    "ratios",
    "errors",
)
# The figure each scenario compares, and whether more is better.
HEADLINE = {
    "fanout": ("deliveries_per_cpu_s", True),
    "steady": ("p99_ms", False),
    "cluster": ("p99_ms", False),
    "idle_memory": ("kib_per_connection", False),
    "personal": ("deliveries_per_cpu_s", True),
    "multi": ("deliveries_per_cpu_s", True),
    "handshake": ("handshakes_per_cpu_s", True),
    "handshake_room": ("handshakes_per_cpu_s", True),
    "handshake_presence": ("handshakes_per_cpu_s", True),
    "fanout_sse": ("deliveries_per_cpu_s", True),
    "steady_sse": ("p99_ms", False),
    "presence_events": ("deliveries_per_cpu_s", True),
}
MIN_CPU_WINDOW = 0.5  # seconds
# The load generator's share of the wall time spent running or waiting for its core above
# which it may be what limits deliveries/s (deliveries per server CPU-second stay valid).
SATURATED = 0.9


@dataclass
class Plan:
    scenarios: list[str]
    servers: list[str]
    subscribers: list[int]  # fanout sweep
    steady_subscribers: int
    rate: float
    duration: float
    warmup: float
    max_notifications: int
    connections: int
    idle_steps: int
    settle: float
    instances: int
    upstream: str
    frame_bytes: int
    window: int
    personal_users: int
    multi_users: int
    handshake_concurrency: int
    handshake_tokens: int
    presence_listeners: int
    presence_churners: int
    presence_hold_ms: int
    publish_sockets: int
    pipeline: int
    deflate: bool
    receiver: str
    repeat: int
    pin: bool
    out: Path
    plots: bool
    profile: bool
    profile_subscribers: list[int]
    write_doc: bool
    quick: bool
    verbose: bool
    json_only: bool
    meta: dict[str, Any] = field(default_factory=dict)


QUICK = {
    "subscribers": "100,1000,2000",
    "steady_subscribers": 1000,
    "duration": 3.0,
    "warmup": 1.0,
    "connections": 1000,
    "idle_steps": 5,
    "settle": 0.5,
    "max_notifications": 20000,
    "personal_users": 1000,
    "multi_users": 1000,
    "handshake_concurrency": 64,
}
FULL = {
    "subscribers": "100,500,1000,2000,5000,10000",
    "steady_subscribers": 1000,
    "duration": 10.0,
    "warmup": 2.0,
    "connections": 5000,
    "idle_steps": 10,
    "settle": 1.0,
    "max_notifications": 100000,
    "personal_users": 2000,
    "multi_users": 1000,
    "handshake_concurrency": 64,
}


def parse_args(argv: list[str] | None) -> Plan:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="notifier's benchmark suite: fanout, steady, idle_memory, cluster, personal, multi and "
        "handshake, against baselines",
    )
    p.add_argument("--quick", action="store_true", help="smaller counts and shorter runs (under ~5 minutes)")
    default_scenarios = ",".join(s for s in SCENARIOS if s not in EXTRA_SCENARIOS)
    p.add_argument(
        "--scenarios",
        default=default_scenarios,
        help=f"comma-separated (default: {default_scenarios}; also {', '.join(EXTRA_SCENARIOS)})",
    )
    p.add_argument(
        "--servers",
        help=f"comma-separated of {', '.join(SERVERS)} (default: all; without notifier-memory in --quick)",
    )
    p.add_argument("--subscribers", help="fanout subscriber counts, comma-separated")
    p.add_argument("--steady-subscribers", type=int, help="subscribers of steady and cluster (default 1000)")
    p.add_argument(
        "--rate", type=float, default=20.0, help="notifications/s of steady and cluster (default 20)"
    )
    p.add_argument("--duration", type=float, help="seconds measured per run")
    p.add_argument("--warmup", type=float, help="seconds of load before measuring")
    p.add_argument("--notifications", type=int, dest="max_notifications", help="at most this many per run")
    p.add_argument("--connections", type=int, help="idle_memory: connections opened (default 5000)")
    p.add_argument("--idle-steps", type=int, help="idle_memory: RSS readings while opening them")
    p.add_argument("--settle", type=float, help="idle_memory: seconds to wait before each RSS reading")
    p.add_argument("--instances", type=int, default=3, help="cluster: notifier instances (default 3)")
    p.add_argument(
        "--upstream",
        choices=("unix", "tcp"),
        default="unix",
        help="cluster: nginx reaches the servers over Unix sockets (default, as deploy/local-cluster) or TCP",
    )
    p.add_argument("--frame-bytes", type=int, default=256, help="notification frame size (default 256)")
    p.add_argument("--window", type=int, default=0, help="fanout: notifications in flight (default: by N)")
    p.add_argument("--personal-users", type=int, help="personal: users (default 2000; 1000 quick)")
    p.add_argument("--multi-users", type=int, help="multi: users, topics per POST (default 1000)")
    p.add_argument(
        "--publish-sockets", type=int, default=32, help="personal: keep-alive publish connections (32)"
    )
    p.add_argument(
        "--pipeline", type=int, default=4, help="personal: POSTs in flight per publish connection (default 4)"
    )
    p.add_argument("--handshake-concurrency", type=int, help="handshake: concurrent connectors (default 64)")
    p.add_argument(
        "--handshake-tokens", type=int, default=20000, help="handshake: distinct users (default 20000)"
    )
    p.add_argument(
        "--presence-listeners", type=int, default=500, help="presence_events: listeners (default 500)"
    )
    p.add_argument(
        "--presence-churners", type=int, default=16, help="presence_events: churning connectors (16)"
    )
    p.add_argument(
        "--presence-hold-ms",
        type=int,
        default=200,
        help="presence_events: ms a churner holds its socket (default 200; under 50 its join and leave "
        "are sent to the broker together and cancel out)",
    )
    p.add_argument("--deflate", action="store_true", help="offer permessage-deflate, as browsers do")
    p.add_argument(
        "--receiver",
        choices=("c", "raw", "ws"),
        default="c",
        help="the subscribers' client: c = benchmarks/wsrecv.c, built with cc (default; raw if no compiler), "
        "raw = a minimal JavaScript client, ws = the ws package (always with --deflate)",
    )
    p.add_argument("--repeat", type=int, default=1, help="run everything R times; the table shows medians")
    p.add_argument("--no-pin", action="store_true", help="do not pin server and load generator to cores")
    p.add_argument("--out", type=Path, default=HERE / "results", help="results directory")
    p.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    p.add_argument("--profile", action="store_true", help="also profile notifier's fanout with py-spy")
    p.add_argument(
        "--profile-subscribers", default="100,1000", help="--profile: subscriber counts (default 100,1000)"
    )
    p.add_argument("--write-doc", action="store_true", help="put the table into docs/performance.md")
    p.add_argument("--json-only", action="store_true", help="print only the JSON lines")
    p.add_argument("-v", "--verbose", action="store_true", help="show the load generator's progress")
    a = p.parse_args(argv)
    preset = QUICK if a.quick else FULL
    scenarios = _csv(a.scenarios)
    for s in scenarios:
        if s not in SCENARIOS:
            p.error(f"--scenarios: unknown scenario {s!r} (choose from {', '.join(SCENARIOS)})")
    default_servers = [s for s in SERVERS if not (a.quick and s == "notifier-memory")]
    servers = _csv(a.servers) if a.servers else default_servers
    for s in servers:
        if s not in SERVERS:
            p.error(f"--servers: unknown server {s!r} (choose from {', '.join(SERVERS)})")

    def pick(name: str) -> Any:
        value = getattr(a, name)
        return preset[name] if value is None else value

    subscribers = [int(x) for x in _csv(str(pick("subscribers")))]
    users = [pick("personal_users"), pick("multi_users"), pick("handshake_concurrency")]
    users += [a.handshake_tokens, a.publish_sockets, a.pipeline, a.presence_listeners, a.presence_churners]
    if any(n < 1 for n in subscribers + users) or a.repeat < 1 or a.instances < 1 or a.rate <= 0:
        p.error("counts, --repeat, --instances and --rate must be positive")
    return Plan(
        scenarios=scenarios,
        servers=servers,
        subscribers=subscribers,
        steady_subscribers=pick("steady_subscribers"),
        rate=a.rate,
        duration=pick("duration"),
        warmup=pick("warmup"),
        max_notifications=pick("max_notifications"),
        connections=pick("connections"),
        idle_steps=pick("idle_steps"),
        settle=pick("settle"),
        instances=a.instances,
        upstream=a.upstream,
        frame_bytes=a.frame_bytes,
        window=a.window,
        personal_users=pick("personal_users"),
        multi_users=pick("multi_users"),
        handshake_concurrency=pick("handshake_concurrency"),
        handshake_tokens=a.handshake_tokens,
        presence_listeners=a.presence_listeners,
        presence_churners=a.presence_churners,
        presence_hold_ms=max(0, a.presence_hold_ms),
        publish_sockets=a.publish_sockets,
        pipeline=a.pipeline,
        deflate=a.deflate,
        receiver="ws" if a.deflate else a.receiver,
        repeat=a.repeat,
        pin=not a.no_pin,
        out=a.out,
        plots=not a.no_plots,
        profile=a.profile,
        profile_subscribers=[int(x) for x in _csv(a.profile_subscribers)],
        write_doc=a.write_doc,
        quick=a.quick,
        verbose=a.verbose,
        json_only=a.json_only,
    )


def _csv(text: str) -> list[str]:
    return [x.strip() for x in text.split(",") if x.strip()]


# -- load generator ------------------------------------------------------------------------


def ensure_node(plan: Plan) -> str:
    """node, and (for --receiver ws or --deflate only) the ws package in benchmarks/node_modules."""
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node (Node.js >= 18) not found: the load generator is benchmarks/loadgen.mjs")
    if plan.receiver == "ws" and not (HERE / "node_modules" / "ws" / "package.json").exists():
        npm = shutil.which("npm")
        if npm is None:
            raise RuntimeError("npm not found: run `npm ci` in benchmarks/ to install the ws package")
        print(
            "benchmarks: installing the load generator's ws package (npm ci in benchmarks/)", file=sys.stderr
        )
        subprocess.run(
            [npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"],
            cwd=HERE,
            check=True,
            timeout=300,
            stdout=subprocess.DEVNULL,
        )
    return node


def ensure_wsrecv(plan: Plan) -> None:
    """Build benchmarks/.build/wsrecv from wsrecv.c when it is missing or older; else fall back."""
    if plan.receiver != "c":
        return
    if WSRECV.exists() and WSRECV.stat().st_mtime >= WSRECV_SOURCE.stat().st_mtime:
        return
    cc = shutil.which("cc") or shutil.which("gcc") or shutil.which("clang")
    if cc is None:
        print("benchmarks: no C compiler (cc): the JavaScript receiver is used instead", file=sys.stderr)
        plan.receiver = "raw"
        return
    WSRECV.parent.mkdir(exist_ok=True)
    done = subprocess.run(
        [cc, "-O2", "-Wall", "-o", str(WSRECV), str(WSRECV_SOURCE)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    if done.returncode != 0:
        print(
            f"benchmarks: building wsrecv failed, using the JavaScript receiver:\n{done.stderr}",
            file=sys.stderr,
        )
        plan.receiver = "raw"


def run_loadgen(plan: Plan, cfg: dict[str, Any], core: int | None, logdir: Path) -> dict[str, Any]:
    node = ensure_node(plan)
    cfg = {"clkTck": CLK_TCK, "quiet": not plan.verbose, **cfg}
    cfg.setdefault("hardTimeout", 60 + cfg.get("connectTimeout", 120) + 2 * (cfg.get("duration") or 0))
    log = logdir / f"loadgen-{time.time_ns()}.log"
    with open(log, "wb") as err:
        proc = subprocess.Popen(
            [node, str(LOADGEN), json.dumps(cfg)],
            cwd=HERE,
            stdout=subprocess.PIPE,
            stderr=None if plan.verbose else err,
            start_new_session=True,
            preexec_fn=(lambda: os.sched_setaffinity(0, {core})) if core is not None else None,
        )
        try:
            out, _ = proc.communicate(timeout=cfg["hardTimeout"] + 15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, _ = proc.communicate()
        except BaseException:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()
            raise
    lines = out.decode(errors="replace").strip().splitlines()
    if not lines:
        tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
        raise RuntimeError(f"the load generator printed nothing (status {proc.returncode}):\n{tail}")
    result: dict[str, Any] = json.loads(lines[-1])
    if "error" in result:
        raise RuntimeError(f"the load generator failed: {result['error']}")
    return result


class RssSampler:
    """The servers' summed RSS every ``interval`` seconds, in a thread, while a run goes on:
    ``series`` is ``[[seconds since start, KiB], ...]`` (the soak's flat-or-not evidence)."""

    def __init__(self, pids: list[int], interval: float) -> None:
        self.pids, self.interval = pids, interval
        self.series: list[list[float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _run(self) -> None:
        started = time.monotonic()
        while True:
            try:
                kib = sum(rss_kib(pid) for pid in self.pids)
            except (OSError, ValueError):
                return  # a server is gone: the run is ending
            self.series.append([round(time.monotonic() - started, 1), kib])
            if self._stop.wait(self.interval):
                return


def loadgen_cfg(
    plan: Plan, target: Target, mode: str, subscribers: int, scenario: str | None = None
) -> dict[str, Any]:
    # Notifications in flight: enough that both sides batch (several frames per socket read and
    # write), bounded so a subscriber never has more than 64 frames (16 KiB) pending.
    window = plan.window or max(8, min(64, -(-32000 // subscribers)))
    extra: dict[str, Any] = {}
    if mode in USER_SCENARIOS:
        extra["userTopics"] = True
    if mode == "personal":
        extra.update(
            maxNotifications=plan.max_notifications * PERSONAL_FACTOR,
            publishSockets=plan.publish_sockets,
            pipeline=plan.pipeline,
        )
    if mode == "handshake":
        extra.update(concurrency=subscribers, tokens=plan.handshake_tokens)
    if scenario in ("handshake_room", "handshake_presence"):
        extra.update(handshakeTopic=ROOM, presence=scenario == "handshake_presence")
    if mode == "presence":
        extra.update(
            presence=True, concurrency=plan.presence_churners, holdMs=plan.presence_hold_ms, tokens=1000
        )
    # presence_events: the JavaScript receiver, which counts join and leave frames (wsrecv does not).
    receiver = {"fanout_sse": "sse", "steady_sse": "sse", "presence_events": "raw"}.get(
        scenario or "", plan.receiver
    )
    return {
        "mode": mode,
        "wsUrl": target.ws_url,
        "publishUrl": target.publish_url,
        "secret": target.secret,
        "topic": TOPIC,
        "subscribers": subscribers,
        "pids": target.pids,
        "duration": plan.duration,
        "warmup": plan.warmup,
        "maxNotifications": plan.max_notifications,
        "frameBytes": plan.frame_bytes,
        "deflate": plan.deflate,
        "receiver": receiver,
        "wsrecv": str(WSRECV),
        "window": window,
        "rate": plan.rate,
        "settle": plan.settle,
        "steps": plan.idle_steps,
        "connectConcurrency": 100,
        "connectTimeout": 30 + subscribers / 100,
        **extra,
    }


# -- one run -------------------------------------------------------------------------------


def result_line(
    scenario: str,
    server: str,
    target: Target,
    lg: dict[str, Any],
    redis_stats: dict[str, dict[str, float]] | None = None,
) -> dict[str, Any]:
    cpu: dict[str, float] = lg.get("cpu_s") or {}
    server_cpu = cpu.get("server")
    measured = lg.get("measured_deliveries")
    errors = []
    if lg.get("connect_errors"):
        errors.append(f"{lg['connect_errors']} connections failed")
    if lg.get("publish_errors"):
        errors.append(f"{lg['publish_errors']} publishes failed ({lg.get('last_publish_error')})")
    if lg.get("closed_early"):
        errors.append(f"{lg['closed_early']} sockets closed by the server")
    if lg.get("stalled"):
        errors.append("fan-out stalled")
    if lg.get("out_of_order"):
        errors.append(f"{lg['out_of_order']} frames out of id order")
    if lg.get("misrouted"):
        errors.append(f"{lg['misrouted']} notifications reached another user")
    if lg.get("unanswered"):
        errors.append(f"{lg['unanswered']} POSTs unanswered")
    failures: dict[str, int] = lg.get("handshake_failures") or {}
    if failures:
        kinds = ", ".join(f"{n} {kind}" for kind, n in sorted(failures.items()))
        errors.append(f"{sum(failures.values())} handshakes failed ({kinds})")
    if scenario == "idle_memory":
        loadgen_cpu, loadgen_util = lg.get("loadgen_total_cpu_s"), None
        if lg.get("loadgen_total_s"):
            loadgen_util = round(lg["loadgen_total_cpu_s"] / lg["loadgen_total_s"], 3)
    else:
        loadgen_cpu, loadgen_util = cpu.get("loadgen"), lg.get("loadgen_cpu_util")
    # CPU times tick at 1/CLK_TCK (10 ms): over a shorter window the CPU figures mean nothing.
    if (lg.get("measure_s") or 0) < MIN_CPU_WINDOW:
        server_cpu = None
        if scenario != "idle_memory":
            loadgen_util = None
        lg = {**lg, "server_cpu_util": None, "server_busy": None, "loadgen_busy": None}
    handshake = scenario in HANDSHAKES
    redis_cpu = cpu.get("redis")
    per_cpu_s = round(measured / server_cpu) if measured and server_cpu else None
    per_notification = None
    if scenario in ("personal", "multi") and redis_cpu is not None and measured and server_cpu:
        per_notification = round(redis_cpu * 1e6 / measured, 1)
    # Redis's own accounting over the whole run (not only the window), per handshake.
    calls_per_op = us_per_op = None
    ops = lg.get("handshakes") if handshake else None
    if redis_stats and ops:
        calls, usec = client_calls(redis_stats)
        calls_per_op, us_per_op = round(calls / ops, 3), round(usec / ops, 2)
    events_per_s = None
    if scenario == "presence_events" and measured is not None and lg.get("measure_s"):
        events_per_s = round(measured / lg["measure_s"])
    line: dict[str, Any] = {
        "scenario": scenario,
        "server": server,
        "broker": target.info.get("broker"),
        "instances": target.info.get("instances"),
        "upstream": target.info.get("upstream"),
        "subscribers": lg.get("subscribers"),
        "published": None if handshake else lg.get("published"),
        "deliveries_per_s": None if handshake else lg.get("deliveries_per_s"),
        "deliveries_per_cpu_s": None if handshake else per_cpu_s,
        "server_cpu_s": server_cpu,
        "server_cpu_util": lg.get("server_cpu_util"),
        "server_busy": lg.get("server_busy"),
        "p50_ms": lg.get("p50_ms"),
        "p90_ms": lg.get("p90_ms"),
        "p99_ms": lg.get("p99_ms"),
        "max_ms": lg.get("max_ms"),
        "lost": lg.get("lost"),
        "out_of_order": lg.get("out_of_order"),
        "rss_kib": lg.get("rss_kib", lg.get("rss_after_kib")),
        "rss_before_kib": lg.get("rss_before_kib"),
        "kib_per_connection": lg.get("kib_per_connection"),
        "loadgen_cpu_s": loadgen_cpu,
        "loadgen_cpu_util": loadgen_util,
        "loadgen_busy": lg.get("loadgen_busy"),
        "loadgen_saturated": bool((lg.get("loadgen_busy") or loadgen_util or 0) > SATURATED),
        "run_queue_wait_s": lg.get("run_queue_wait_s"),
        "receiver": lg.get("receiver"),
        "nginx_cpu_s": cpu.get("nginx"),
        "redis_cpu_s": cpu.get("redis"),
        "frame_bytes": lg.get("frame_bytes"),
        "deflate": lg.get("deflate"),
        "measure_s": lg.get("measure_s"),
        "connect_per_s": round(lg["connected"] / lg["connect_s"]) if lg.get("connect_s") else None,
        "accepted_per_s": lg.get("accepted_per_s"),
        "misrouted": lg.get("misrouted"),
        "redis_us_per_notification": per_notification,
        "handshakes_per_s": lg.get("handshakes_per_s"),
        "handshakes_per_cpu_s": per_cpu_s if handshake else None,
        "handshake_failures": failures if handshake else None,
        "redis_calls_per_op": calls_per_op,
        "redis_us_per_op": us_per_op,
        "presence_events_per_s": events_per_s,
        "ratio_metric": HEADLINE[scenario][0],
        "ratios": None,
        "errors": errors,
    }
    assert tuple(line) == KEYS
    return line


def run_one(
    plan: Plan, scenario: str, server: str, subscribers: int, secret: str
) -> tuple[dict[str, Any], dict[str, Any]]:
    """Start ``server`` fresh, run one scenario's load against it, stop it: (result line, details)."""
    server_core, load_core = cores() if plan.pin else (None, None)
    logdir = Path(tempfile.mkdtemp(prefix="notifier-bench-"))
    dep = Deployment(logdir)
    try:
        if scenario == "cluster":
            target = start_cluster(dep, server, secret, plan.instances, server_core, load_core, plan.upstream)
        else:
            target = start_single(dep, server, secret, server_core, load_core, scenario in USER_SCENARIOS)
        modes = {
            "steady": "steady",
            "cluster": "steady",
            "idle_memory": "idle",
            "handshake_room": "handshake",
            "handshake_presence": "handshake",
            "fanout_sse": "fanout",
            "steady_sse": "steady",
            "presence_events": "presence",
        }
        mode = modes.get(scenario, scenario)
        redis_url = target.info.get("redis_url")
        if redis_url:
            redis_command(redis_url, "CONFIG", "RESETSTAT")
        # One RSS reading per second in short runs, about 100 per run in long ones (a soak).
        with RssSampler(target.pids["server"], max(1.0, plan.duration / 100)) as rss:
            cfg = loadgen_cfg(plan, target, mode, subscribers, scenario)
            lg = run_loadgen(plan, cfg, load_core, logdir)
        redis_stats = commandstats(redis_command(redis_url, "INFO", "commandstats")) if redis_url else None
    except BaseException:
        print(f"benchmarks: {scenario}/{server} failed; logs kept in {logdir}", file=sys.stderr)
        dep.stop()
        raise
    dep.stop()
    line = result_line(scenario, server, target, lg, redis_stats)
    if line["errors"]:
        print(
            f"benchmarks: {scenario}/{server}: {'; '.join(line['errors'])}; logs kept in {logdir}",
            file=sys.stderr,
        )
    else:
        shutil.rmtree(logdir, ignore_errors=True)
    details = {
        "line": line,
        "cdf": lg.get("cdf"),
        "rss_steps": lg.get("rss_steps"),
        "rss_series": rss.series,
        "info": target.info,
        "cpu_s": lg.get("cpu_s"),
        "connect_s": lg.get("connect_s"),
        "window": lg.get("window"),
        "reads_in_window": lg.get("reads_in_window"),
        "measured_deliveries": lg.get("measured_deliveries"),
        "loadgen_user_sys_s": lg.get("loadgen_user_sys_s"),
        "redis_commandstats": redis_stats,
        "presence_events": lg.get("presence_events"),
        "churn_cycles_per_s": lg.get("churn_cycles_per_s"),
    }
    return line, details


def redis_command(url: str, *args: str) -> str:
    """One command to the redis-server at ``url`` (redis://host:port/db), its answer as text."""
    rest = url.split("://", 1)[1].split("/", 1)[0]
    host, port = rest.rsplit(":", 1)
    request = f"*{len(args)}\r\n" + "".join(f"${len(a.encode())}\r\n{a}\r\n" for a in args)
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request.encode())
        data = b""
        while True:
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
            if data.startswith(b"+") or data.startswith(b"-"):
                if data.endswith(b"\r\n"):
                    break
            elif data.startswith(b"$"):
                head, _, body = data.partition(b"\r\n")
                if len(body) >= int(head[1:]) + 2:
                    break
    return data.decode(errors="replace")


# Commands of the suite's own bookkeeping, not of the server under test.
OWN_COMMANDS = ("info", "config")
# INFO commandstats also counts the commands a script runs (HGET, XADD, ... inside EVALSHA): the
# calls the server makes are the script calls plus the commands only a client sends (pub/sub,
# connection set-up); a script's usec include its commands'.
SCRIPT_COMMANDS = ("evalsha", "eval", "evalsha_ro", "eval_ro", "fcall", "fcall_ro")
CLIENT_COMMANDS = ("subscribe", "unsubscribe", "ssubscribe", "sunsubscribe", "psubscribe", "punsubscribe")
CLIENT_COMMANDS += ("ping", "hello", "script", "client", "select", "cluster")


def client_calls(stats: dict[str, dict[str, float]]) -> tuple[int, int]:
    """(calls, usec) of the commands the server sent itself (scripts whole, not their insides)."""
    mine = [v for k, v in stats.items() if k.split("|")[0] in SCRIPT_COMMANDS + CLIENT_COMMANDS]
    return int(sum(v["calls"] for v in mine)), int(sum(v["usec"] for v in mine))


def commandstats(text: str) -> dict[str, dict[str, float]]:
    """INFO commandstats as {command: {"calls": n, "usec": n}}, without the suite's own commands."""
    out: dict[str, dict[str, float]] = {}
    for line in text.splitlines():
        if not line.startswith("cmdstat_"):
            continue
        name, _, fields = line[len("cmdstat_") :].partition(":")
        if name.split("|")[0] in OWN_COMMANDS:
            continue
        values = dict(kv.split("=", 1) for kv in fields.split(",") if "=" in kv)
        out[name] = {"calls": int(values.get("calls", 0)), "usec": int(values.get("usec", 0))}
    return out


def add_ratios(line: dict[str, Any], baselines: dict[str, dict[str, Any]]) -> None:
    """notifier's headline figure divided by each baseline's from the same run."""
    metric = line["ratio_metric"]
    ratios = {}
    for name, other in baselines.items():
        mine, theirs = line.get(metric), other.get(metric)
        ratios[name] = round(mine / theirs, 3) if mine is not None and theirs else None
    line["ratios"] = ratios or None


def groups(plan: Plan) -> Iterator[tuple[str, int, list[str]]]:
    """(scenario, subscribers, servers in run order: baselines first, so notifier lines carry ratios)."""
    order = sorted(plan.servers, key=lambda s: (s not in BASELINES, SERVERS.index(s)))
    for scenario in plan.scenarios:
        if scenario == "storm":
            continue  # notifier only, on a cluster of its own: see benchmarks/storm.py, run by main()
        servers = [s for s in order if not (scenario == "cluster" and s == "notifier-memory")]
        if scenario in NOTIFIER_ONLY:
            servers = [s for s in servers if s not in BASELINES]
            if not servers:
                continue
        if scenario in ("fanout", "fanout_sse"):
            for n in plan.subscribers:
                yield scenario, n, servers
        elif scenario == "idle_memory":
            yield scenario, plan.connections, servers
        elif scenario == "personal":
            yield scenario, plan.personal_users, servers
        elif scenario == "multi":
            yield scenario, plan.multi_users, servers
        elif scenario in HANDSHAKES:
            yield scenario, plan.handshake_concurrency, servers
        elif scenario == "presence_events":
            yield scenario, plan.presence_listeners, servers
        else:
            yield scenario, plan.steady_subscribers, servers


# -- the whole run -------------------------------------------------------------------------


def metadata(plan: Plan) -> dict[str, Any]:
    def version(module: str) -> str | None:
        try:
            from importlib.metadata import version as v

            return v(module)
        except Exception:  # noqa: BLE001 - not installed
            return None

    def command(argv: list[str]) -> str | None:
        try:
            done = subprocess.run(argv, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return None
        return (
            (done.stdout + done.stderr).strip().splitlines()[0]
            if (done.stdout + done.stderr).strip()
            else None
        )

    cpu_model = None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu_model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    ws_version = None
    try:
        ws_version = json.loads((HERE / "node_modules" / "ws" / "package.json").read_text())["version"]
    except (OSError, ValueError, KeyError):
        pass
    try:
        from benchmarks.servers import binary

        nginx, redis = command([binary("nginx"), "-v"]), command([binary("redis-server"), "--version"])
        nginx = nginx.rsplit("/", 1)[-1] if nginx else None  # "nginx version: nginx/1.22.1"
        if redis and " v=" in redis:  # "Redis server v=7.0.15 sha=..."
            redis = redis.split(" v=", 1)[1].split()[0]
    except RuntimeError:
        nginx = redis = None
    server_core, load_core = cores() if plan.pin else (None, None)
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
        "machine": {
            "cpu": cpu_model,
            "cores": os.cpu_count(),
            "kernel": platform.release(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        },
        "versions": {
            "python": platform.python_version(),
            "notifier": version("notifier"),
            "uvicorn": version("uvicorn"),
            "websockets": version("websockets"),
            "fastapi": version("fastapi"),
            "starlette": version("starlette"),
            "uvloop": version("uvloop"),
            "httptools": version("httptools"),
            "orjson": version("orjson"),
            "redis-py": version("redis"),
            "hiredis": version("hiredis"),
            "redis-server": redis,
            "nginx": nginx,
            "node": command(["node", "--version"]),
            "ws (node)": ws_version,
        },
        "pinning": {"server_core": server_core, "loadgen_core": load_core},
        "node": command(["node", "--version"]),
        "plan": {k: (str(v) if isinstance(v, Path) else v) for k, v in asdict(plan).items() if k != "meta"},
        "loadavg_start": loadavg(),
    }


def loadgen_description(plan: Plan) -> str:
    node = plan.meta.get("node") or "Node.js"
    if plan.receiver == "c":
        return (
            f"Node.js {node} publishing and measuring + wsrecv (C, epoll) holding the subscribers, one core"
        )
    if plan.receiver == "ws":
        deflate = ", permessage-deflate offered" if plan.deflate else ""
        return f"Node.js {node} + the ws package, one process{deflate}"
    return f"Node.js {node}, one process, minimal WebSocket client"


def median_lines(lines: list[dict[str, Any]]) -> dict[str, Any]:
    """One line from repeats of the same run: the median of each number, the rest from the first."""
    if len(lines) == 1:
        return lines[0]
    merged = dict(lines[0])
    for key, value in merged.items():
        if isinstance(value, int | float) and not isinstance(value, bool):
            values = [x[key] for x in lines if isinstance(x.get(key), int | float)]
            merged[key] = statistics.median(values) if values else value
    merged["errors"] = sorted({e for x in lines for e in x["errors"]})
    if merged.get("handshake_failures") is not None:
        failures: dict[str, int] = {}
        for x in lines:
            for kind, n in (x.get("handshake_failures") or {}).items():
                failures[kind] = failures.get(kind, 0) + n
        merged["handshake_failures"] = failures  # every repeat's, summed
    return merged


def main(argv: list[str] | None = None) -> int:
    plan = parse_args(argv)
    plan.meta = metadata(plan)
    secret = secrets.token_urlsafe(32)
    out: list[dict[str, Any]] = []
    storms: list[dict[str, Any]] = []
    started = time.monotonic()
    with cleanup_on_signals():
        try:
            ensure_wsrecv(plan)
            ensure_node(plan)
            plan.meta["loadgen"] = loadgen_description(plan)
            for rep in range(plan.repeat):
                for scenario, n, servers in groups(plan):
                    baselines: dict[str, dict[str, Any]] = {}
                    for server in servers:
                        line, details = run_one(plan, scenario, server, n, secret)
                        details["repeat"] = rep
                        if server in BASELINES:
                            baselines[server] = line
                        else:
                            add_ratios(line, baselines)
                        print(json.dumps(line), flush=True)
                        out.append(details)
                if "storm" in plan.scenarios and "notifier" in plan.servers:
                    # 10,000 clients on three instances, one killed (SIGKILL; SIGTERM too in a
                    # full run); 1,000 and SIGKILL only in --quick.
                    from benchmarks.storm import run_storm

                    signals = ("kill",) if plan.quick else ("kill", "term")
                    for line in run_storm(
                        clients=1000 if plan.quick else 10000, signals=signals, quick=plan.quick,
                        pin=plan.pin, verbose=plan.verbose,
                    ):  # fmt: skip
                        line["repeat"] = rep
                        print(json.dumps(line), flush=True)
                        storms.append(line)
            if plan.profile:
                from benchmarks.profile import profile_fanout

                profile_fanout(plan, secret)
        except KeyboardInterrupt:
            print("benchmarks: interrupted; every process started was stopped", file=sys.stderr)
            return 130
        except (RuntimeError, subprocess.CalledProcessError) as exc:
            print(f"benchmarks: error: {exc}", file=sys.stderr)
            return 1
    plan.meta["loadavg_end"] = loadavg()
    plan.meta["elapsed_s"] = round(time.monotonic() - started, 1)
    summary = summarize(out)
    plan.out.mkdir(parents=True, exist_ok=True)
    (plan.out / "latest.json").write_text(
        json.dumps({"meta": plan.meta, "runs": out, "storm": storms}, indent=1) + "\n"
    )
    table = report.markdown(summary, plan.meta)
    if storms:
        from benchmarks.storm import table as storm_table

        table += "\n**storm** (three instances behind nginx, one killed; see benchmarks/storm.py)\n\n"
        table += storm_table(storms) + "\n"
    (plan.out / "latest.md").write_text(table)
    if not plan.json_only:
        print()
        print(table)
    if plan.plots:
        made = report.plots(out, plan.out)
        if not plan.json_only and made:
            print(
                "plots: "
                + ", ".join(str(p.relative_to(ROOT)) if p.is_relative_to(ROOT) else str(p) for p in made)
            )
    if plan.write_doc:
        report.write_doc(ROOT / "docs" / "performance.md", table)
    return 0


def summarize(out: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One line per (scenario, subscribers, server): the median over repeats, ratios recomputed."""
    keyed: dict[tuple[str, int, str], list[dict[str, Any]]] = {}
    for details in out:
        line = details["line"]
        keyed.setdefault((line["scenario"], line["subscribers"], line["server"]), []).append(line)
    merged = {k: median_lines(v) for k, v in keyed.items()}
    for (scenario, n, server), line in merged.items():
        if server not in BASELINES:
            add_ratios(line, {b: merged[(scenario, n, b)] for b in BASELINES if (scenario, n, b) in merged})
    return list(merged.values())


if __name__ == "__main__":
    sys.exit(main())
