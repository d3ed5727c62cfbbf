"""The servers under test, each started fresh for one scenario run and stopped after it.

``SERVERS`` names what ``--servers`` accepts:

- ``notifier``: ``python -m notifier serve`` with the Redis broker (its redis-server runs on the
  load generator's core, not the server's);
- ``notifier-memory``: the same with ``memory://``;
- ``fastapi_manager``: the FastAPI textbook ``ConnectionManager`` (benchmarks/baselines);
- ``ws_broadcast``: plain ``websockets`` with ``websockets.broadcast()`` (benchmarks/baselines).

In the per-user scenarios (``personal``, ``multi``, ``handshake``) the baselines run with
``--topics``: a minimal ``topic -> set of sockets`` registry, so a POST reaches one user's socket.

The ``cluster`` scenario puts nginx in front: for notifier, ``deploy/local-cluster``; for a
baseline, which has no broker, one instance behind the same nginx configuration, reached the
same way (a Unix socket unless ``--upstream tcp``). The instances of a cluster share the one
server core a single server has; redis-server runs on the load generator's core and nginx on
whichever core is idle (see ``start_cluster``).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import socket
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.procs import ROOT, Proc, children, free_port, http_status, wait_for

SERVERS = ("notifier", "notifier-memory", "fastapi_manager", "ws_broadcast")
BASELINES = ("fastapi_manager", "ws_broadcast")
BASELINE_DIR = ROOT / "benchmarks" / "baselines"
LOCAL_CLUSTER = ROOT / "deploy" / "local-cluster"
NGINX_TEMPLATE = ROOT / "nginx.conf"
PLACEHOLDER = re.compile(r"\$(\{)?(NOTIFIER_\w*)(?(1)\})")
SBIN = ["/usr/local/sbin", "/usr/sbin", "/sbin"]
# Settings for every notifier instance under test: room for the largest fan-out, quick stops.
NOTIFIER_ENV = {"NOTIFIER_MAX_CONNECTIONS": "20000", "NOTIFIER_SHUTDOWN_TIMEOUT": "2"}


@dataclass
class Target:
    """What the load generator needs to know about a running deployment."""

    ws_url: str
    publish_url: str
    secret: str | None  # JWT secret: the load generator mints tokens (notifier only)
    pids: dict[str, list[int]]  # CPU/RSS groups: "server" (always), "nginx", "redis"
    info: dict[str, Any] = field(default_factory=dict)


def binary(name: str) -> str:
    path = shutil.which(name, path=os.pathsep.join([os.environ.get("PATH", os.defpath), *SBIN]))
    if path is None:
        raise RuntimeError(f"{name} not found: install it (apt-get install {name})")
    return path


def clean_env(**extra: str) -> dict[str, str]:
    """The environment without any NOTIFIER_* of the caller's, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOTIFIER_")}
    env.update(extra)
    return env


class Deployment:
    """A set of processes started together and stopped together (reverse order)."""

    def __init__(self, logdir: Path) -> None:
        self.logdir = logdir
        self.procs: list[Proc] = []
        # Grandchildren started by deploy/local-cluster (pid, what their command line contains):
        # stopped by local-cluster itself; killed here only if it could not.
        self.delegated: list[tuple[int, str]] = []

    def spawn(
        self, name: str, argv: list[str], env: dict[str, str] | None = None, core: int | None = None
    ) -> Proc:
        log = self.logdir / f"{name}-{time.time_ns()}.log"
        proc = Proc(name, argv, log, env=env, core=core)
        self.procs.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.procs):
            if proc.name == "local-cluster":
                # SIGTERM only to local-cluster itself: it stops its children (instances drain
                # for up to NOTIFIER_SHUTDOWN_TIMEOUT + 10 s) and exits 0.
                proc.stop(timeout=40)
                for pid, marker in self.delegated:
                    _kill_if(pid, marker)
                self.delegated.clear()
            else:
                proc.stop()
        self.procs.clear()

    # -- building blocks --------------------------------------------------------------------

    def redis(self, core: int | None) -> tuple[Proc, str]:
        port = free_port()
        data = self.logdir / f"redis-{port}"
        data.mkdir(exist_ok=True)
        proc = self.spawn(
            "redis-server",
            [
                binary("redis-server"),
                "--port",
                str(port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
                "--dir",
                str(data),
            ],
            core=core,
        )
        wait_for(lambda: _redis_answers(port), "redis-server to answer PING", [proc], 15)
        return proc, f"redis://127.0.0.1:{port}/0"

    def notifier(
        self, broker_url: str, secret: str, core: int | None, name: str = "notifier"
    ) -> tuple[Proc, int]:
        port = free_port()
        env = clean_env(
            NOTIFIER_BROKER_URL=broker_url,
            NOTIFIER_JWT_SECRET=secret,
            NOTIFIER_HOST="127.0.0.1",
            NOTIFIER_PORT=str(port),
            **NOTIFIER_ENV,
        )
        proc = self.spawn(name, [sys.executable, "-m", "notifier", "serve"], env=env, core=core)
        url = f"http://127.0.0.1:{port}/readyz"
        wait_for(lambda: http_status(url) == 200, url, [proc], 30)
        return proc, port

    def baseline(
        self, kind: str, core: int | None, uds: str | None = None, topics: bool = False
    ) -> tuple[Proc, int, str]:
        """A baseline server: (process, WebSocket port, publish URL); with ``uds``, its WebSocket
        endpoint also listens on that Unix socket (for nginx); with ``topics``, its minimal topic
        registry (``?topics=`` per socket, POSTs to a topic's sockets only)."""
        port = free_port()
        script = str(BASELINE_DIR / f"{kind}.py")
        argv = [sys.executable, script, "--port", str(port)] + (["--uds", uds] if uds else [])
        argv += ["--topics"] if topics else []
        if kind == "fastapi_manager":
            http_port = port
        else:
            http_port = free_port()
            argv += ["--http-port", str(http_port)]
        proc = self.spawn(kind, argv, env=clean_env(), core=core)
        health = f"http://127.0.0.1:{http_port}/healthz"
        wait_for(lambda: http_status(health) == 200, health, [proc], 30)
        return proc, port, f"http://127.0.0.1:{http_port}/v1/notifications"

    def nginx(self, upstreams: list[str]) -> tuple[Proc, int]:
        """nginx rendered from the repository's nginx.conf, in front of ``upstreams`` (nginx
        addresses: ``host:port`` or ``unix:path``), on no particular core (see start_cluster)."""
        port = free_port()
        prefix = self.logdir / f"nginx-{port}"
        prefix.mkdir()
        # nginx started as root runs its workers as the build's default user, which must reach
        # the temp paths under the prefix.
        for path in (self.logdir, prefix):
            path.chmod(0o755)
        values = {
            "NOTIFIER_LISTEN": f"127.0.0.1:{port}",
            "NOTIFIER_UPSTREAMS": " ".join(f"server {u};" for u in upstreams),
        }
        conf = prefix / "nginx.conf"
        conf.write_text(PLACEHOLDER.sub(lambda m: values[m.group(2)], NGINX_TEMPLATE.read_text()))
        proc = self.spawn(
            "nginx",
            [binary("nginx"), "-p", f"{prefix}/", "-c", str(conf), "-e", "stderr", "-g", "daemon off;"],
        )
        # Up when nginx answers from the upstream (anything but a gateway error).
        url = f"http://127.0.0.1:{port}/healthz"
        wait_for(lambda: http_status(url) not in (None, 502, 503, 504), url, [proc], 20)
        return proc, port


def _redis_answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _kill_if(pid: int, marker: str) -> None:
    """SIGKILL the process group of ``pid`` if it still runs a command line containing ``marker``."""
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return
    if marker in cmdline:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def nginx_pids(master: int) -> list[int]:
    return [master, *children(master)]


def start_single(
    dep: Deployment,
    kind: str,
    secret: str,
    server_core: int | None,
    aux_core: int | None,
    topics: bool = False,
) -> Target:
    """One server process pinned to ``server_core`` (its redis-server, if any, on ``aux_core``);
    ``topics``: a baseline with its topic registry (the per-user scenarios)."""
    if kind in ("notifier", "notifier-memory"):
        pids: dict[str, list[int]] = {}
        broker = "memory://"
        if kind == "notifier":
            redis, broker = dep.redis(aux_core)
            pids["redis"] = [redis.pid]
        proc, port = dep.notifier(broker, secret, server_core)
        pids["server"] = [proc.pid]
        return Target(
            f"ws://127.0.0.1:{port}/v1/ws",
            f"http://127.0.0.1:{port}/v1/notifications",
            secret,
            pids,
            {
                "broker": broker.split(":")[0],
                "instances": 1,
                **({"redis_url": broker} if kind == "notifier" else {}),
            },
        )
    proc, port, publish_url = dep.baseline(kind, server_core, topics=topics)
    return Target(
        f"ws://127.0.0.1:{port}/v1/ws",
        publish_url,
        None,
        {"server": [proc.pid]},
        {"broker": None, "instances": 1},
    )


def start_cluster(
    dep: Deployment,
    kind: str,
    secret: str,
    instances: int,
    server_core: int | None,
    aux_core: int | None,
    upstream: str = "unix",
) -> Target:
    """The deployment of the ``cluster`` scenario: the instances on ``server_core`` (the one core a
    single server has in ``steady``), redis-server on ``aux_core`` (as in ``steady``), nginx on
    neither: on a 2-core machine it must share a core with someone, and pinned to the load
    generator's it delays the receiver (measured: p99 +6 ms), to the server's the server. Left to
    the scheduler it takes what is idle on either, as it would take cores of its own in production.
    nginx reaches the instances over Unix sockets (``upstream="unix"``, as ``deploy/local-cluster``
    does by default) or TCP (``"tcp"``)."""
    if kind in BASELINES:
        uds = str(dep.logdir / f"{kind}.sock") if upstream == "unix" else None
        proc, port, publish_url = dep.baseline(kind, server_core, uds)
        nginx, nginx_port = dep.nginx([f"unix:{uds}" if uds else f"127.0.0.1:{port}"])
        # fastapi_manager publishes through nginx like notifier; ws_broadcast's publish endpoint
        # is a second port nginx.conf does not route, so it is posted to directly. Latency is
        # measured from the acceptance time (ts), so the publish leg does not count either way.
        if kind == "fastapi_manager":
            publish_url = f"http://127.0.0.1:{nginx_port}/v1/notifications"
        return Target(
            f"ws://127.0.0.1:{nginx_port}/v1/ws",
            publish_url,
            None,
            {"server": [proc.pid], "nginx": nginx_pids(nginx.pid)},
            {"broker": None, "instances": 1, "via": "nginx", "upstream": upstream},
        )
    if kind != "notifier":
        raise ValueError(f"the cluster scenario needs a broker shared by instances: not {kind}")
    return _local_cluster(dep, secret, instances, server_core, aux_core, upstream)


_CHILD_LINE = re.compile(r"^(instance|nginx|redis|prometheus): (\S+) \(pid (\d+)\)$")


def _local_cluster(
    dep: Deployment, secret: str, instances: int, core: int | None, aux_core: int | None, upstream: str
) -> Target:
    """``deploy/local-cluster`` as a user runs it, pinned to ``core`` (its children inherit that);
    redis-server is then moved to ``aux_core`` and nginx let loose on every core."""
    port = free_port()
    env = clean_env(NOTIFIER_JWT_SECRET=secret, **NOTIFIER_ENV)
    proc = dep.spawn(
        "local-cluster",
        [
            sys.executable,
            str(LOCAL_CLUSTER),
            "--instances",
            str(instances),
            "--port",
            str(port),
            "--upstream",
            upstream,
        ],
        env=env,
        core=core,
    )
    # local-cluster stops its own children (each in its own session) on SIGTERM.
    ready: list[str] = []

    def is_ready() -> bool:
        text = proc.log.read_text(errors="replace")
        ready[:] = [line for line in text.splitlines() if line.startswith("ready: ")]
        return bool(ready)

    wait_for(is_ready, "deploy/local-cluster to print ready:", [proc], 60)
    pids: dict[str, list[int]] = {"server": [], "nginx": [], "redis": []}
    for line in proc.log.read_text(errors="replace").splitlines():
        match = _CHILD_LINE.match(line.strip())
        if match is None:
            continue
        label, pid = match.group(1), int(match.group(3))
        dep.delegated.append((pid, {"instance": "notifier", "redis": "redis-server"}.get(label, label)))
        if label == "instance":
            pids["server"].append(pid)
        elif label == "nginx":
            pids["nginx"] = nginx_pids(pid)
        elif label == "redis":
            pids["redis"].append(pid)
    if core is not None:
        every_core = set(range(os.cpu_count() or 1))
        redis_cores = every_core if aux_core is None else {aux_core}
        moves = [(pid, redis_cores) for pid in pids["redis"]] + [(pid, every_core) for pid in pids["nginx"]]
        for pid, cores in moves:
            try:
                os.sched_setaffinity(pid, cores)
            except OSError:
                pass
    if len(pids["server"]) != instances:
        raise RuntimeError(
            f"deploy/local-cluster printed {len(pids['server'])} instance pids, want {instances}"
        )
    url = ready[0].split(" ", 1)[1].strip()
    return Target(
        url.replace("http://", "ws://") + "/v1/ws",
        url + "/v1/notifications",
        secret,
        pids,
        {"broker": "redis", "instances": instances, "via": "nginx", "upstream": upstream},
    )
