"""Processes for the benchmark: start pinned to a core, stop by process group, read /proc.

Every process the suite starts is a :class:`Proc`, alone in its own session (so its process
group id is its pid) and registered in :data:`RUNNING` until stopped; :func:`stop_all` stops
whatever is left (on an error or a signal). Nothing is ever stopped by name.
"""

from __future__ import annotations

import os
import resource
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

ROOT = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
# Loopback only: never go through a proxy from the environment.
HTTP = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def cores() -> tuple[int | None, int | None]:
    """(server core, load generator core): 0 and 1 when this process may use both, else no pinning."""
    allowed = sorted(os.sched_getaffinity(0))
    if len(allowed) < 2:
        return None, None
    return allowed[0], allowed[1]


def _preexec(core: int | None) -> Callable[[], None]:
    def setup() -> None:
        if core is not None:
            os.sched_setaffinity(0, {core})
        soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        if hard == resource.RLIM_INFINITY or soft < hard:
            target = 65536 if hard == resource.RLIM_INFINITY else hard
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))

    return setup


class Proc:
    """One child process, in its own session, optionally pinned to one CPU core."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log: Path,
        env: dict[str, str] | None = None,
        core: int | None = None,
    ) -> None:
        self.name = name
        self.log = log
        self._out = open(log, "ab")  # closed in stop()
        self.popen = subprocess.Popen(
            list(argv),
            cwd=ROOT,
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=self._out,
            stderr=self._out,
            start_new_session=True,
            preexec_fn=_preexec(core),  # the suite is single-threaded
        )
        RUNNING.append(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def stop(self, timeout: float = 15.0, sig: int = signal.SIGTERM) -> None:
        """Signal the process group, wait up to ``timeout``, then SIGKILL the group; always reaps."""
        if self.popen.poll() is None:
            _killpg(self.pid, sig)
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                _killpg(self.pid, signal.SIGKILL)
                self.popen.wait(10)
        # Leftovers of the group (the leader is reaped now, but its group id cannot be reused
        # while any member lives): nginx workers of a killed master, for instance.
        _killpg(self.pid, signal.SIGKILL)
        self._out.close()
        if self in RUNNING:
            RUNNING.remove(self)

    def log_tail(self, lines: int = 15) -> str:
        try:
            text = self.log.read_text(errors="replace").rstrip()
        except OSError:
            return ""
        return "\n".join("    " + line for line in text.splitlines()[-lines:])


RUNNING: list[Proc] = []


@contextmanager
def cleanup_on_signals() -> Iterator[None]:
    """SIGTERM and SIGHUP end the run as Ctrl-C does; every process started is stopped on the
    way out, however it ends."""

    def on_signal(signum: int, _frame: FrameType | None) -> None:
        raise KeyboardInterrupt(f"signal {signum}")

    old = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        stop_all()
        for s, handler in old.items():
            signal.signal(s, handler)


def stop_all() -> None:
    for proc in reversed(list(RUNNING)):
        proc.stop(timeout=10)


def _killpg(pgid: int, sig: int) -> None:
    try:
        os.killpg(pgid, sig)
    except (ProcessLookupError, PermissionError):
        pass


# -- /proc ---------------------------------------------------------------------------------


def cpu_seconds(pid: int) -> float:
    """utime + stime of ``pid`` (all its threads), in seconds; 0 if it is gone."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return 0.0
    fields = stat[stat.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def rss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def children(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc/*/stat)."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rindex(")") + 2 :].split()[1]) == pid:
            found.append(int(entry.name))
    return found


def loadavg() -> list[float]:
    return [float(x) for x in Path("/proc/loadavg").read_text().split()[:3]]


# -- network -------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def http_status(url: str, timeout: float = 2.0) -> int | None:
    try:
        with HTTP.open(url, timeout=timeout) as response:
            status: int = response.status
            return status
    except urllib.error.HTTPError as exc:
        return exc.code
    except (OSError, ValueError):
        return None


def wait_for(check: Callable[[], bool], what: str, procs: Sequence[Proc], timeout: float = 30.0) -> None:
    """Poll ``check`` until true; raise if it times out or one of ``procs`` exits meanwhile."""
    deadline = time.monotonic() + timeout
    while not check():
        for proc in procs:
            if not proc.alive():
                raise RuntimeError(
                    f"{proc.name} (pid {proc.pid}) exited with status {proc.popen.returncode} "
                    f"while waiting for {what}; its log ends:\n{proc.log_tail()}"
                )
        if time.monotonic() > deadline:
            tails = "\n".join(f"  {p.name}:\n{p.log_tail()}" for p in procs)
            raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}\n{tails}")
        time.sleep(0.05)
