"""The ``storm`` scenario: a reconnect storm after one of three instances dies.

    python -m benchmarks.storm [--clients N] [--signal kill|term|both] [--quick] [--json-only]
                               [--presence-listeners K]

One redis-server, three ``python -m notifier serve`` instances (shared secret, Redis broker,
``NOTIFIER_MAX_CONNECTIONS=20000``, the default ``NOTIFIER_SHUTDOWN_TIMEOUT`` of 10 s so a
SIGTERM drains at its real pace) and nginx rendered from the repository's ``nginx.conf`` in
front of them (over Unix sockets, as ``deploy/local-cluster`` does). ``deploy/local-cluster`` is
not used: it stops everything when one instance dies.

``benchmarks/storm.mjs`` (Node.js) connects N clients through nginx, each with its own token
(``sub`` ``storm<i>``) on ``user:storm<i>`` and the shared ``storm.all``, publishes open loop
to the two surviving instances, kills the third (SIGKILL: the crash; SIGTERM: its paced drain
with close code 1001), and follows every dropped client back: jittered exponential backoff as
the shipped clients (0.5 s doubling to 30 s, times 0.5-1), ``since=<topic>:<id>`` for its
topics. Then it checks every client received every accepted notification of its topics exactly
once, in order. ``--presence-listeners K``: the first K clients ask ``presence=1`` (the join and
leave events of ``storm.all``, counted in ``presence_events``). One JSON line per signal,
``{"scenario": "storm", "server": "notifier", ...}``.

The instances run on the server core, the load generator and redis-server on the other, nginx
unpinned (as in the ``cluster`` scenario); ``--no-pin`` turns pinning off. Every process runs in
its own process group and is stopped at the end, on an error, on Ctrl-C and on SIGTERM.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import secrets
import shutil
import signal
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

from benchmarks.procs import (
    CLK_TCK,
    Proc,
    cleanup_on_signals,
    cores,
    free_port,
    http_status,
    loadavg,
    wait_for,
)
from benchmarks.servers import (
    NGINX_TEMPLATE,
    PLACEHOLDER,
    Deployment,
    binary,
    clean_env,
    nginx_pids,
)

HERE = Path(__file__).resolve().parent
STORM_JS = HERE / "storm.mjs"
INSTANCES = 3
# nginx.conf allows 4096 connections per worker; a WebSocket holds two (client and instance):
# too few for 10,000 clients on a 2-core machine. The storm renders its own copy with room: as
# many as the open-file limit allows (a worker cannot raise its own past the hard limit).
NGINX_WORKER_CONNECTIONS = 32768
NOFILE = 131072
SIGNALS = {"kill": "SIGKILL", "term": "SIGTERM"}


def raise_nofile(target: int = NOFILE) -> int:
    """Raise this process's open-file limit (soft, and hard when privileged) for its children
    (procs.Proc raises a child's soft limit to the hard one). Returns the soft limit."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < target:
        try:
            nr_open = int(Path("/proc/sys/fs/nr_open").read_text())
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(target, nr_open), min(target, nr_open)))
        except (OSError, ValueError):
            pass
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def render_nginx(upstreams: list[str], port: int, worker_connections: int, nofile: int) -> str:
    """The repository's nginx.conf as the suite renders it, with more worker connections (its
    10,000 per worker is just enough for 10,000 clients on two workers: this leaves room)."""
    values = {
        "NOTIFIER_LISTEN": f"127.0.0.1:{port}",
        "NOTIFIER_UPSTREAMS": " ".join(f"server {u};" for u in upstreams),
    }
    text = PLACEHOLDER.sub(lambda m: values[m.group(2)], NGINX_TEMPLATE.read_text())
    text, n = re.subn(r"worker_connections\s+\d+;", f"worker_connections {worker_connections};", text)
    if n != 1:
        raise RuntimeError("nginx.conf: no worker_connections directive to raise")
    text, n = re.subn(r"worker_rlimit_nofile\s+\d+;", f"worker_rlimit_nofile {nofile};", text)
    if n != 1:
        raise RuntimeError("nginx.conf: no worker_rlimit_nofile directive to raise")
    return text


class StormCluster:
    """redis-server, three instances over Unix sockets, nginx: built from Deployment's pieces."""

    def __init__(self, logdir: Path, secret: str, server_core: int | None, aux_core: int | None) -> None:
        self.dep = Deployment(logdir)
        self.logdir = logdir
        self.secret = secret
        self.server_core = server_core
        self.aux_core = aux_core
        self.instances: list[tuple[Proc, int, str]] = []  # (process, TCP port, Unix socket)
        self.redis: Proc | None = None
        self.nginx: Proc | None = None
        self.nginx_port = 0
        # The Unix sockets and nginx's prefix, where nginx's workers (the build's default user
        # when started as root) can reach them, whatever the log directory's parents allow.
        self.rundir = Path(tempfile.mkdtemp(prefix="notifier-storm-run-"))
        self.rundir.chmod(0o755)

    def start(self) -> None:
        self.redis, broker = self.dep.redis(self.aux_core)
        for k in range(INSTANCES):
            port = free_port()
            uds = str(self.rundir / f"instance{k}-{port}.sock")
            env = clean_env(
                NOTIFIER_BROKER_URL=broker,
                NOTIFIER_JWT_SECRET=self.secret,
                NOTIFIER_HOST="127.0.0.1",
                NOTIFIER_PORT=str(port),
                NOTIFIER_UDS=uds,
                NOTIFIER_MAX_CONNECTIONS="20000",
                NOTIFIER_SHUTDOWN_TIMEOUT="10",
            )
            argv = [sys.executable, "-m", "notifier", "serve"]
            proc = self.dep.spawn(f"instance{k}", argv, env, self.server_core)
            self.instances.append((proc, port, uds))
        for proc, port, uds in self.instances:
            url = f"http://127.0.0.1:{port}/readyz"
            wait_for(partial(_ready, url, uds), url, [proc], 30)
        self._nginx([f"unix:{uds}" for _, _, uds in self.instances])

    def _nginx(self, upstreams: list[str]) -> None:
        port = free_port()
        prefix = self.rundir / f"nginx-{port}"
        prefix.mkdir()
        prefix.chmod(0o755)
        conf = prefix / "nginx.conf"
        nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        connections = min(NGINX_WORKER_CONNECTIONS, nofile - 100)
        conf.write_text(render_nginx(upstreams, port, connections, nofile))
        shutil.copy(conf, self.logdir / "nginx.conf")  # for the record: the prefix goes at the end
        argv = [binary("nginx"), "-p", f"{prefix}/", "-c", str(conf), "-e", "stderr", "-g", "daemon off;"]
        self.nginx = self.dep.spawn("nginx", argv)
        url = f"http://127.0.0.1:{port}/healthz"
        wait_for(lambda: http_status(url) not in (None, 502, 503, 504), url, [self.nginx], 20)
        self.nginx_port = port

    def stop(self) -> None:
        try:
            self.dep.stop()
        finally:
            shutil.rmtree(self.rundir, ignore_errors=True)


def _ready(url: str, uds: str) -> bool:
    return http_status(url) == 200 and os.path.exists(uds)


def storm_cfg(
    cluster: StormCluster,
    clients: int,
    sig: str,
    quick: bool,
    result_file: Path,
    verbose: bool,
    hello_timeout: float = 30.0,
    presence_listeners: int = 0,
) -> dict[str, Any]:
    killed, survivors = cluster.instances[-1], cluster.instances[:-1]
    assert cluster.nginx is not None and cluster.redis is not None
    connect_timeout = 60 + clients / 50
    cfg: dict[str, Any] = {
        "clients": clients,
        "secret": cluster.secret,
        "wsUrl": f"ws://127.0.0.1:{cluster.nginx_port}/v1/ws",
        "publishUrls": [f"http://127.0.0.1:{port}/v1/notifications" for _, port, _ in survivors],
        "metricsUrls": [f"http://127.0.0.1:{port}/metrics" for _, port, _ in cluster.instances],
        "killPid": killed[0].pid,
        "killSignal": SIGNALS[sig],
        "survivorPids": [proc.pid for proc, _, _ in survivors],
        "nginxPids": nginx_pids(cluster.nginx.pid),
        "redisPids": [cluster.redis.pid],
        "userRate": 200,
        "allRate": 2,
        "concurrency": 200,
        "steadyS": 2 if quick else 4,
        "afterS": 2 if quick else 3,
        "settleS": 15,
        "connectTimeoutS": connect_timeout,
        "backTimeoutS": 60,
        "maxPublishS": 300,
        "helloTimeoutS": hello_timeout,
        "presenceListeners": presence_listeners,
        "minDelay": 500,
        "maxDelay": 30000,
        "clkTck": CLK_TCK,
        "quiet": not verbose,
        "debug": verbose,
        "resultFile": str(result_file),
    }
    cfg["hardTimeout"] = connect_timeout + cfg["steadyS"] + cfg["backTimeoutS"] + cfg["afterS"] + 60
    return cfg


def run_one(
    clients: int,
    sig: str,
    quick: bool = False,
    pin: bool = True,
    logdir: Path | None = None,
    verbose: bool = False,
    hello_timeout: float = 30.0,
    presence_listeners: int = 0,
) -> dict[str, Any]:
    """One storm: a fresh cluster, N clients, one instance killed with ``sig`` (kill|term)."""
    node = shutil.which("node")
    if node is None:
        raise RuntimeError("node (Node.js >= 18) not found: the load generator is benchmarks/storm.mjs")
    raise_nofile()
    server_core, aux_core = cores() if pin else (None, None)
    logdir = logdir or Path(tempfile.mkdtemp(prefix="notifier-storm-logs-"))
    logdir.mkdir(parents=True, exist_ok=True)
    cluster = StormCluster(logdir, secrets.token_urlsafe(32), server_core, aux_core)
    load_start = loadavg()
    try:
        cluster.start()
        result_file = logdir / f"storm-{sig}-{time.time_ns()}.json"
        cfg = storm_cfg(cluster, clients, sig, quick, result_file, verbose, hello_timeout, presence_listeners)
        gen = cluster.dep.spawn("storm.mjs", [node, str(STORM_JS), json.dumps(cfg)], core=aux_core)
        if verbose:
            print(f"storm: logs in {logdir}", file=sys.stderr)
        try:
            gen.popen.wait(cfg["hardTimeout"] + 15)
        except Exception:
            gen.stop(timeout=2, sig=signal.SIGKILL)
        if not result_file.exists():
            status = gen.popen.returncode
            raise RuntimeError(f"storm.mjs wrote no result (status {status}):\n{gen.log_tail(30)}")
        lg: dict[str, Any] = json.loads(result_file.read_text())
        if "error" in lg:
            raise RuntimeError(f"storm.mjs failed: {lg['error']}\n{gen.log_tail(30)}")
        killed = cluster.instances[-1][0]
        killed.popen.poll()
        lg["killed_status"] = killed.popen.returncode
        lg["instances_log"] = instance_problems(cluster)
        lg["loadavg"] = [load_start, loadavg()]
    finally:
        cluster.stop()
    return result_line(lg, pin and server_core is not None, logdir)


def instance_problems(cluster: StormCluster) -> list[str]:
    """Tracebacks and errors from the instances' logs (up to 20 lines), for the report."""
    out: list[str] = []
    for proc, _, _ in cluster.instances:
        try:
            text = proc.log.read_text(errors="replace")
        except OSError:
            continue
        for line in text.splitlines():
            if re.search(r"Traceback|ERROR|CRITICAL|Exception", line):
                out.append(f"{proc.name}: {line.strip()[:300]}")
                if len(out) >= 20:
                    return out
    return out


def result_line(lg: dict[str, Any], pinned: bool, logdir: Path) -> dict[str, Any]:
    line: dict[str, Any] = {
        "scenario": "storm",
        "server": "notifier",
        "instances": INSTANCES,
        "killed": lg.pop("signal"),
        **lg,
        "pinned": pinned,
        "logs": str(logdir),
    }
    errors: dict[str, int] = {}
    for kind, n in lg.get("handshake_failures", {}).items():
        errors[f"handshake {kind}"] = n
    for kind, n in lg.get("publish_errors", {}).items():
        errors[f"publish {kind}"] = n
    if lg.get("closed_before_kill"):
        errors["closed before the kill"] = lg["closed_before_kill"]
    if lg.get("late_drops"):
        errors["closed after the storm"] = len(lg["late_drops"])
    line["errors"] = errors
    return line


def run_storm(
    clients: int = 10000,
    signals: tuple[str, ...] = ("kill", "term"),
    quick: bool = False,
    pin: bool = True,
    logdir: Path | None = None,
    verbose: bool = False,
    hello_timeout: float = 30.0,
) -> list[dict[str, Any]]:
    """The storm for each of ``signals`` ("kill", "term"), each on a fresh cluster; one result
    line per signal. The caller handles signals (run.py does: a KeyboardInterrupt raised in here
    stops this storm's processes on its way out); each storm's processes are stopped before the
    next one starts, and before this returns or raises."""
    lines = []
    for sig in signals:
        sub = (logdir / f"storm-{sig}") if logdir else None
        lines.append(run_one(clients, sig, quick, pin, sub, verbose, hello_timeout))
    return lines


def table(lines: list[dict[str, Any]]) -> str:
    head = (
        "| killed | clients | dropped | back | all back (s) | back p50 / p99 (s) | survivors CPU (s) |"
        " handshakes / CPU-s | recovered: false | lost | dup | out of order | failed handshakes |"
    )
    rows = [head, "|" + "---|" * 13]
    for ln in lines:
        fails = sum(ln.get("handshake_failures", {}).values())
        rows.append(
            f"| {ln['killed']} | {ln['clients']:,} | {ln['clients_dropped']:,}"
            f" | {ln['clients_reconnected']:,} |"
            f" {ln['storm_s']} | {ln['back_p50_s']} / {ln['back_p99_s']} | {ln['survivors_cpu_s']} |"
            f" {ln['handshakes_per_cpu_s']} | {ln['recovered_false']} | {ln['lost']} | {ln['duplicates']} |"
            f" {ln['out_of_order']} | {fails} |"
        )
    return "\n".join(rows)


def summary(ln: dict[str, Any]) -> str:
    return (
        f"{ln['killed']}: {ln['clients_dropped']:,} of {ln['clients']:,} clients dropped"
        f" (close codes {ln['close_codes']}), {ln['clients_reconnected']:,} back within {ln['storm_s']} s"
        f" of the kill (p50 {ln['back_p50_s']} s, p99 {ln['back_p99_s']} s; from their own drop:"
        f" p50 {ln['gap_p50_s']} s, p99 {ln['gap_p99_s']} s) after {ln['attempts_total']:,} handshakes"
        f" (at most {ln['attempts_max']} for one client; failures {ln['handshake_failures'] or 'none'});"
        f" survivors spent {ln['survivors_cpu_s']} CPU-s in {ln['window_s']} s"
        f" ({ln['survivors_extra_cpu_s']} above their steady rate), nginx {ln['nginx_cpu_s']};"
        f" {ln['expected']:,} deliveries expected, lost {ln['lost']}, duplicates {ln['duplicates']},"
        f" out of order {ln['out_of_order']}, recovered: false {ln['recovered_false']};"
        f" load generator {ln['loadgen_cpu_s']} CPU-s."
    )


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.storm", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, help="clients through nginx (10,000; 1,000 with --quick)")
    parser.add_argument(
        "--signal", choices=("kill", "term", "both"), default="both", help="how the instance dies"
    )
    parser.add_argument("--quick", action="store_true", help="1,000 clients, shorter phases")
    parser.add_argument("--json-only", action="store_true", help="print only the JSON lines")
    parser.add_argument("--no-pin", action="store_true", help="no CPU pinning")
    parser.add_argument(
        "--hello-timeout",
        type=float,
        default=30.0,
        help="seconds a client waits for its hello before it gives up and retries (30)",
    )
    parser.add_argument(
        "--presence-listeners",
        type=int,
        default=0,
        help="the first K clients ask presence=1 (join/leave events of storm.all; default 0)",
    )
    parser.add_argument("--logdir", type=Path, help="where the processes' logs go (default: a temp dir)")
    parser.add_argument("-v", "--verbose", action="store_true", help="the load generator's progress")
    args = parser.parse_args(argv)
    clients = args.clients or (1000 if args.quick else 10000)
    if not 1 <= clients <= 15000:
        parser.error("--clients: 1..15000")
    if args.presence_listeners < 0:
        parser.error("--presence-listeners: 0 or more")
    signals = ("kill", "term") if args.signal == "both" else (args.signal,)
    lines = []
    try:
        with cleanup_on_signals():
            for sig in signals:
                sub = (args.logdir / f"storm-{sig}") if args.logdir else None
                line = run_one(
                    clients,
                    sig,
                    args.quick,
                    not args.no_pin,
                    sub,
                    args.verbose,
                    args.hello_timeout,
                    args.presence_listeners,
                )
                print(json.dumps(line), flush=True)
                lines.append(line)
    except KeyboardInterrupt as exc:
        print(f"storm: interrupted ({exc or 'Ctrl-C'}); every process stopped", file=sys.stderr)
        return 130
    if not args.json_only:
        print()
        print(table(lines))
        print()
        for line in lines:
            print(summary(line))
    return 0


if __name__ == "__main__":
    sys.exit(main())
