"""``--profile``: where notifier's time goes in the fanout scenario (py-spy, sampled).

One extra fanout run of notifier (Redis broker) with ``py-spy record --format raw`` attached to
the server process for exactly the measurement window (the load generator starts and stops
it), once per count of ``--profile-subscribers``. Writes the collapsed stacks
(``profile-fanout-N.txt``: flamegraph.pl or speedscope read them) and a summary of the top
functions by own and by inclusive samples (``profile-fanout-N-top.md``) to the results
directory. Its figures are not in the table:
sampling slows the server.
"""

from __future__ import annotations

import shutil
import sys
import tempfile
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING

from benchmarks.procs import cores
from benchmarks.servers import Deployment, start_single

if TYPE_CHECKING:
    from benchmarks.run import Plan

# Samples per second. py-spy pauses the server for each sample (blocking mode: consistent stacks;
# --nonblocking misattributes samples when the machine is busy), a few % of overhead at this rate.
RATE = 100


def profile_fanout(plan: Plan, secret: str) -> list[Path]:
    """One profiled fanout run per count of ``--profile-subscribers``; the summaries written."""
    return [p for n in plan.profile_subscribers if (p := profile_one(plan, secret, n)) is not None]


def profile_one(plan: Plan, secret: str, subscribers: int) -> Path | None:
    from benchmarks.run import loadgen_cfg, run_loadgen

    py_spy = shutil.which("py-spy")
    if py_spy is None:
        print(
            "benchmarks: py-spy not found (pip install -r benchmarks/requirements.txt): no profile",
            file=sys.stderr,
        )
        return None
    server_core, load_core = cores() if plan.pin else (None, None)
    logdir = Path(tempfile.mkdtemp(prefix="notifier-bench-profile-"))
    plan.out.mkdir(parents=True, exist_ok=True)
    raw = plan.out / f"profile-fanout-{subscribers}.txt"
    dep = Deployment(logdir)
    try:
        target = start_single(dep, "notifier", secret, server_core, load_core)
        pid = target.pids["server"][0]
        cfg = loadgen_cfg(plan, target, "fanout", subscribers)
        cfg["profile"] = [
            py_spy,
            "record",
            "--pid",
            str(pid),
            "--output",
            str(raw),
            "--format",
            "raw",
            "--rate",
            str(RATE),
        ]
        lg = run_loadgen(plan, cfg, load_core, logdir)
    finally:
        dep.stop()
    shutil.rmtree(logdir, ignore_errors=True)
    if not raw.exists():
        print("benchmarks: py-spy wrote no profile", file=sys.stderr)
        return None
    summary = summarize(raw.read_text(), top=25)
    header = (
        f"# notifier fanout profile: {subscribers} subscribers, Redis broker, py-spy {RATE} Hz over "
        f"{lg.get('measure_s')} s; {lg.get('deliveries_per_s')} deliveries/s while sampled\n\n"
    )
    top = plan.out / f"profile-fanout-{subscribers}-top.md"
    top.write_text(header + summary)
    if not plan.json_only:
        print(f"\nprofile ({raw.name}, summary in {top.name}):\n\n{summary}")
    return top


def _frame(name: str) -> str:
    """``func (path/to/file.py:123)`` -> ``func (file.py)``: one entry per function, not per line."""
    func, _, where = name.partition(" (")
    path = where.rstrip(")").rsplit(":", 1)[0]
    parts = path.split("/")
    short = "/".join(parts[-2:]) if len(parts) > 1 else path
    return f"{func} ({short})" if where else func


def summarize(collapsed: str, top: int = 25) -> str:
    """Markdown tables of the functions with the most own and inclusive samples."""
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in collapsed.splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame(f) for f in stack.split(";")]
        # The first frame may be the thread name ("process 123:..." / "thread ...") in some formats.
        frames = [f for f in frames if f]
        total += count
        own[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    if not total:
        return "(no samples)\n"

    def table(counter: Counter[str], title: str) -> str:
        rows = [f"| {100 * n / total:5.1f}% | `{name}` |" for name, n in counter.most_common(top)]
        return f"**{title}** ({total} samples)\n\n| share | function |\n|---:|---|\n" + "\n".join(rows)

    return (
        table(own, "own time (the function itself, callees excluded)")
        + "\n\n"
        + table(inclusive, "inclusive time (the function and everything it called)")
        + "\n"
    )
