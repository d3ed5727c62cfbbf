"""The tables (Markdown), the plots (PNG, matplotlib) and the docs/performance.md update."""

from __future__ import annotations

import re
import statistics
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from benchmarks.servers import BASELINES, SERVERS

DOC_BEGIN = "<!-- benchmark-results:begin -->"
DOC_END = "<!-- benchmark-results:end -->"
HEADLINE_SUBSCRIBERS = 1000
# The per-user scenarios' headline figures: (summary column, scenario, key); also fanin.png.
USER_COLUMNS = (
    ("notifications / server CPU-s (personal)", "personal", "deliveries_per_cpu_s"),
    ("deliveries / server CPU-s (multi)", "multi", "deliveries_per_cpu_s"),
    ("handshakes / server CPU-s", "handshake", "handshakes_per_cpu_s"),
)


def _num(value: Any, digits: int = 0) -> str:
    if value is None:
        return "–"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int | float):
        return f"{value:,.{digits}f}"
    return str(value)


def _pct(value: Any) -> str:
    return "–" if value is None else f"{100 * value:.0f}%"


def _busy(util: Any, busy: Any) -> str:
    """CPU share of the wall time, and share running or waiting for the core (see the method)."""
    if util is None:
        return "–"
    return _pct(util) + (f" / {_pct(busy)}" if busy is not None else "")


def _ratios(line: dict[str, Any]) -> str:
    ratios = line.get("ratios") or {}
    return ", ".join(f"{_num(r, 2)}× {name}" for name, r in ratios.items() if r is not None) or ""


def _order(lines: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    return sorted(lines, key=lambda x: (x["subscribers"] or 0, SERVERS.index(x["server"])))


def _table(header: list[str], rows: list[list[str]]) -> str:
    align = ["---"] + ["---:"] * (len(header) - 1)
    out = ["| " + " | ".join(header) + " |", "| " + " | ".join(align) + " |"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out)


def markdown(summary: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    by: dict[str, list[dict[str, Any]]] = {}
    for line in summary:
        by.setdefault(line["scenario"], []).append(line)
    parts = [_meta(meta)]

    headline = _headline(by)
    if headline:
        parts.append(headline)

    if "fanout" in by:
        rows = [
            [
                _num(x["subscribers"]),
                x["server"],
                _num(x["deliveries_per_s"]),
                _num(x["deliveries_per_cpu_s"]),
                _busy(x["server_cpu_util"], x["server_busy"]),
                _num(x["p99_ms"], 1),
                _num(x["lost"]),
                _busy(x["loadgen_cpu_util"], x["loadgen_busy"]),
                _ratios(x),
                "; ".join(x["errors"]),
            ]
            for x in _order(by["fanout"])
        ]
        parts.append(
            "**fanout** (notifications as fast as delivered; ratio: deliveries per server CPU-second)\n\n"
            + _table(
                [
                    "subscribers",
                    "server",
                    "deliveries/s",
                    "deliveries / server CPU-s",
                    "server CPU / busy",
                    "p99 ms",
                    "lost",
                    "loadgen CPU / busy",
                    "notifier ÷ baseline",
                    "errors",
                ],
                rows,
            )
        )
    for scenario in ("steady", "cluster"):
        if scenario not in by:
            continue
        rows = [
            [
                x["server"] + (f" ×{int(x['instances'])}" if (x["instances"] or 1) > 1 else ""),
                _num(x["subscribers"]),
                _num(x["deliveries_per_s"]),
                _num(x["p50_ms"], 1),
                _num(x["p90_ms"], 1),
                _num(x["p99_ms"], 1),
                _num(x["max_ms"], 1),
                _num(x["lost"]),
                _busy(x["server_cpu_util"], x["server_busy"]),
                _num(x["nginx_cpu_s"], 2) if scenario == "cluster" else _num(x["redis_cpu_s"], 2),
                _busy(x["loadgen_cpu_util"], x["loadgen_busy"]),
                _ratios(x),
                "; ".join(x["errors"]),
            ]
            for x in _order(by[scenario])
        ]
        upstream = "Unix sockets" if by[scenario][0].get("upstream") != "tcp" else "TCP"
        what = (
            f"through nginx over {upstream}; the instances share one core, redis on the load "
            "generator's, nginx on either"
            if scenario == "cluster"
            else "one server process"
        )
        parts.append(
            f"**{scenario}** ({what}; latency from `ts` to receipt; ratio: p99, lower is better)\n\n"
            + _table(
                [
                    "server",
                    "subscribers",
                    "deliveries/s",
                    "p50 ms",
                    "p90 ms",
                    "p99 ms",
                    "max ms",
                    "lost",
                    "server CPU / busy",
                    "nginx CPU-s" if scenario == "cluster" else "redis CPU-s",
                    "loadgen CPU / busy",
                    "notifier ÷ baseline",
                    "errors",
                ],
                rows,
            )
        )
    if "idle_memory" in by:
        rows = [
            [
                x["server"],
                _num(x["subscribers"]),
                _num((x["rss_before_kib"] or 0) / 1024, 1),
                _num((x["rss_kib"] or 0) / 1024, 1),
                _num(x["kib_per_connection"], 1),
                _num(x["lost"]),
                _ratios(x),
                "; ".join(x["errors"]),
            ]
            for x in _order(by["idle_memory"])
        ]
        parts.append(
            "**idle_memory** (RSS growth over idle authenticated connections; ratio: KiB per connection)\n\n"
            + _table(
                [
                    "server",
                    "connections",
                    "RSS before MiB",
                    "RSS after MiB",
                    "KiB / connection",
                    "lost",
                    "notifier ÷ baseline",
                    "errors",
                ],
                rows,
            )
        )
    parts += _user_tables(by)
    extra = _presence_sse_table(by)
    if extra:
        parts.append(extra)
    return "\n\n".join(parts) + "\n"


# The presence and SSE scenarios (notifier only): one table, one row per run.
PRESENCE_SSE = (
    "handshake",
    "handshake_room",
    "handshake_presence",
    "fanout",
    "fanout_sse",
    "steady",
    "steady_sse",
    "presence_events",
)


def _presence_sse_table(by: dict[str, list[dict[str, Any]]]) -> str | None:
    if not any(s in by for s in PRESENCE_SSE if s not in ("handshake", "fanout", "steady")):
        return None
    rows = []
    for scenario in PRESENCE_SSE:
        for x in _order(by.get(scenario, [])):
            if x["server"] not in ("notifier", "notifier-memory"):
                continue
            handshake = scenario.startswith("handshake")
            rows.append(
                [
                    scenario,
                    x["server"],
                    _num(x["subscribers"]),
                    _num(x["handshakes_per_cpu_s"] if handshake else x["deliveries_per_cpu_s"]),
                    _num(x["handshakes_per_s"] if handshake else x["deliveries_per_s"]),
                    _busy(x["server_cpu_util"], x["server_busy"]),
                    _num(x["p50_ms"], 2),
                    _num(x["p99_ms"], 2),
                    _num(x["redis_calls_per_op"], 2),
                    _num(x["redis_us_per_op"], 1),
                    _num(x["lost"]),
                    "; ".join(x["errors"]),
                ]
            )
    return (
        "**presence and SSE** (notifier; per CPU-s: handshakes for handshake*, deliveries for fanout*,"
        " join/leave frames delivered for presence_events; Redis calls and µs per handshake over the"
        " whole run)\n\n"
        + _table(
            [
                "scenario",
                "server",
                "N",
                "per server CPU-s",
                "per s",
                "server CPU / busy",
                "p50 ms",
                "p99 ms",
                "Redis calls / handshake",
                "Redis µs / handshake",
                "lost",
                "errors",
            ],
            rows,
        )
    )


Column = tuple[str, Callable[[dict[str, Any]], str]]


def _user_columns(count: str, rate: Column, per_cpu: Column, checks: list[Column]) -> list[Column]:
    """The columns of a per-user scenario's table: what differs between them, in a shared frame."""
    return [
        ("server", lambda x: x["server"]),
        (count, lambda x: _num(x["subscribers"])),
        rate,
        per_cpu,
        ("server CPU / busy", lambda x: _busy(x["server_cpu_util"], x["server_busy"])),
        ("p50 ms", lambda x: _num(x["p50_ms"], 1)),
        ("p99 ms", lambda x: _num(x["p99_ms"], 1)),
        *checks,
        ("loadgen CPU / busy", lambda x: _busy(x["loadgen_cpu_util"], x["loadgen_busy"])),
        ("notifier ÷ baseline", _ratios),
        ("errors", lambda x: "; ".join(x["errors"])),
    ]


_REDIS_US: Column = ("redis µs / notification", lambda x: _num(x["redis_us_per_notification"], 1))
_LOST: Column = ("lost", lambda x: _num(x["lost"]))
USER_TABLES: list[tuple[str, str, list[Column]]] = [
    (
        "personal",
        "**personal** (one socket per user on its own `user:` topic; one POST per notification to "
        "one user, as fast as answered; ratio: notifications per server CPU-second)",
        _user_columns(
            "users",
            ("notifications/s", lambda x: _num(x["deliveries_per_s"])),
            ("notifications / server CPU-s", lambda x: _num(x["deliveries_per_cpu_s"])),
            [("accepted/s", lambda x: _num(x["accepted_per_s"])), _LOST, _REDIS_US],
        ),
    ),
    (
        "multi",
        "**multi** (each POST names every user's topic, windowed as fanout; ratio: deliveries per "
        "server CPU-second)",
        _user_columns(
            "users (topics per POST)",
            ("deliveries/s", lambda x: _num(x["deliveries_per_s"])),
            ("deliveries / server CPU-s", lambda x: _num(x["deliveries_per_cpu_s"])),
            [_LOST, _REDIS_US],
        ),
    ),
    (
        "handshake",
        "**handshake** (connect as a distinct user, wait for `hello`, close, in a loop; latency from "
        "connect to `hello`; ratio: handshakes per server CPU-second)",
        _user_columns(
            "connectors",
            ("handshakes/s", lambda x: _num(x["handshakes_per_s"])),
            ("handshakes / server CPU-s", lambda x: _num(x["handshakes_per_cpu_s"])),
            [
                ("failed", lambda x: _num(sum((x["handshake_failures"] or {}).values()))),
                ("redis CPU-s", lambda x: _num(x["redis_cpu_s"], 2)),
            ],
        ),
    ),
]


def _user_tables(by: dict[str, list[dict[str, Any]]]) -> list[str]:
    """The tables of the per-user scenarios: personal, multi, handshake."""
    parts = []
    for scenario, title, columns in USER_TABLES:
        if scenario in by:
            rows = [[cell(x) for _name, cell in columns] for x in _order(by[scenario])]
            parts.append(title + "\n\n" + _table([name for name, _cell in columns], rows))
    return parts


def _headline(by: dict[str, list[dict[str, Any]]]) -> str:
    """The issue's table: one row per stack, the three headline figures of this run."""
    fan = by.get("fanout", [])
    counts = sorted({x["subscribers"] for x in fan})
    n = HEADLINE_SUBSCRIBERS if HEADLINE_SUBSCRIBERS in counts else (counts[-1] if counts else None)
    servers = [s for s in SERVERS if any(x["server"] == s for lines in by.values() for x in lines)]
    if not servers:
        return ""

    def get(scenario: str, server: str, key: str, subscribers: int | None = None) -> Any:
        for x in by.get(scenario, []):
            if x["server"] == server and (subscribers is None or x["subscribers"] == subscribers):
                return x[key]
        return None

    fan_label = f"deliveries / server CPU-s (fanout, {n} subscribers)" if n else "deliveries / server CPU-s"
    # (header, scenario, key, subscribers, digits), for the scenarios that ran.
    columns: list[tuple[str, str, str, int | None, int]] = [
        (fan_label, "fanout", "deliveries_per_cpu_s", n, 0),
        ("p99 ms (steady)", "steady", "p99_ms", None, 1),
        ("p99 ms (cluster, nginx)", "cluster", "p99_ms", None, 1),
        ("KiB / idle connection", "idle_memory", "kib_per_connection", None, 1),
    ]
    columns += [(label, scenario, key, None, 0) for label, scenario, key in USER_COLUMNS]
    columns = [c for c in columns if c[1] in by]
    rows = []
    for s in servers:
        rows.append([s] + [_num(get(sc, s, key, sub), digits) for _, sc, key, sub, digits in columns])
    ratios = []
    for s in servers:
        if s in BASELINES:
            continue
        for b in BASELINES:
            if b not in servers:
                continue
            cells = []
            for _, scenario, key, sub, _ in columns:
                mine, theirs = get(scenario, s, key, sub), get(scenario, b, key, sub)
                cells.append(_num(mine / theirs, 2) + "×" if mine is not None and theirs else "–")
            ratios.append([f"{s} ÷ {b}", *cells])
    header = ["stack", *(label for label, *_ in columns)]
    return "**Summary** (this run; ratios are what count on a shared machine)\n\n" + _table(
        header, rows + ratios
    )


def _meta(meta: dict[str, Any]) -> str:
    m, v = meta.get("machine", {}), meta.get("versions", {})
    pin = meta.get("pinning", {})
    versions = ", ".join(f"{k} {val}" for k, val in v.items() if val)
    pinning = (
        f"server side on core {pin['server_core']}, load generator on core {pin['loadgen_core']}"
        if pin.get("server_core") is not None
        else "no pinning"
    )
    end = meta.get("loadavg_end")
    return (
        f"Run {meta.get('date')}: {m.get('cpu')}, {m.get('cores')} cores, {m.get('memory_gib')} GiB, "
        f"Linux {m.get('kernel')}; {pinning}; load generator: {meta.get('loadgen')}; "
        f"load average at start {meta.get('loadavg_start')}"
        + (f", at end {end}" if end else "")
        + (f"; {meta['elapsed_s']} s in all" if meta.get("elapsed_s") else "")
        + f".\n\nVersions: {versions}."
    )


# -- plots ---------------------------------------------------------------------------------


SOAK_S = 60  # a steady run measured this long or longer gets the RSS-over-time plot


def plots(runs: list[dict[str, Any]], out: Path) -> list[Path]:
    try:
        import matplotlib
    except ImportError:
        print(
            "benchmarks: matplotlib is not installed (pip install -r benchmarks/requirements.txt): no plots"
        )
        return []
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    made: list[Path] = []
    lines = [r["line"] for r in runs]

    fan = [x for x in lines if x["scenario"] == "fanout" and x["deliveries_per_s"]]
    if fan:
        fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
        for server in SERVERS:
            # With --repeat, one point per N: the median, and a bar from the lowest to the highest.
            by_n: dict[int, list[dict[str, Any]]] = {}
            for x in fan:
                if x["server"] == server:
                    by_n.setdefault(x["subscribers"], []).append(x)
            if not by_n:
                continue
            ns = sorted(by_n)
            for ax, key in ((left, "deliveries_per_s"), (right, "deliveries_per_cpu_s")):
                values = [[x[key] or 0 for x in by_n[n]] for n in ns]
                mid = [statistics.median(v) for v in values]
                low = [m - min(v) for m, v in zip(mid, values, strict=True)]
                high = [max(v) - m for m, v in zip(mid, values, strict=True)]
                bars = [low, high]
                colour = f"C{SERVERS.index(server)}"
                ax.errorbar(ns, mid, yerr=bars, marker="o", capsize=3, label=server, color=colour)
        for ax, title in ((left, "deliveries/s"), (right, "deliveries per server CPU-second")):
            ax.set_xscale("log")
            ax.set_xlabel("subscribers on one topic")
            ax.set_title(title)
            ax.grid(True, alpha=0.3)
            ax.set_ylim(bottom=0)
        left.legend()
        fig.suptitle("fanout: ~256-byte frames, server pinned to one core")
        fig.tight_layout()
        made.append(_save(fig, out / "fanout.png"))
        plt.close(fig)

    cdfs = [r for r in runs if r["line"]["scenario"] in ("steady", "cluster") and r.get("cdf")]
    if cdfs:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        labelled: set[str] = set()
        for r in cdfs:
            cdf = [(ms, pct) for pct, ms in r["cdf"] if ms is not None]
            line = r["line"]
            # One colour per server, solid direct and dashed through nginx; with --repeat, one
            # curve per run and one legend entry.
            label = f"{line['server']} ({line['scenario']})"
            ax.plot(
                [max(p[0], 0.05) for p in cdf],
                [p[1] for p in cdf],
                color=f"C{SERVERS.index(line['server'])}",
                linestyle="--" if line["scenario"] == "cluster" else "-",
                label=None if label in labelled else label,
            )
            labelled.add(label)
        ax.set_xscale("log")
        ax.set_xlabel("latency, ms (ts in the frame to receipt)")
        ax.set_ylabel("percentile")
        ax.set_ylim(0, 100)
        ax.grid(True, alpha=0.3, which="both")
        ax.legend(fontsize=8)
        ax.set_title("latency CDF at steady load (1,000 subscribers x 20 notifications/s)")
        fig.tight_layout()
        made.append(_save(fig, out / "latency_cdf.png"))
        plt.close(fig)

    idle = [r for r in runs if r["line"]["scenario"] == "idle_memory" and r.get("rss_steps")]
    if idle:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for r in idle:
            steps = r["rss_steps"]
            ax.plot(
                [s["connections"] for s in steps],
                [s["rss_kib"] / 1024 for s in steps],
                marker="o",
                label=f"{r['line']['server']} ({_num(r['line']['kib_per_connection'], 1)} KiB/conn)",
            )
        rss_png = out / "rss.png"
        made.append(_finish(fig, ax, "idle authenticated connections", "RSS against connections", rss_png))

    fanin = _fanin(lines, out)
    if fanin is not None:
        made.append(fanin)

    # A soak: a steady run long enough for a leak to show.
    soaks = [
        r
        for r in runs
        if r["line"]["scenario"] == "steady"
        and (r["line"]["measure_s"] or 0) >= SOAK_S
        and r.get("rss_series")
    ]
    if soaks:
        fig, ax = plt.subplots(figsize=(8, 4.5))
        for r in soaks:
            series = r["rss_series"]
            ax.plot([t for t, _ in series], [kib / 1024 for _, kib in series], label=r["line"]["server"])
        ax.set_ylim(bottom=0)
        made.append(
            _finish(
                fig,
                ax,
                "seconds since the load generator started (connecting, warm-up, then measured load)",
                "RSS during a soak at steady load (1,000 subscribers x 20 notifications/s)",
                out / "soak_rss.png",
            )
        )
    return made


def _fanin(lines: list[dict[str, Any]], out: Path) -> Path | None:
    """fanin.png: one bar chart per per-user scenario, its headline figure per server (the
    median over repeats, a bar from the lowest to the highest)."""
    import matplotlib.pyplot as plt

    present = [c for c in USER_COLUMNS if any(x["scenario"] == c[1] and x[c[2]] for x in lines)]
    if not present:
        return None
    fig, axes = plt.subplots(1, len(present), figsize=(4.2 * len(present), 4.2), squeeze=False)
    for ax, (label, scenario, key) in zip(axes[0], present, strict=True):
        names, mids, lows, highs, colours = [], [], [], [], []
        for server in SERVERS:
            values = [x[key] for x in lines if x["scenario"] == scenario and x["server"] == server and x[key]]
            if not values:
                continue
            mid = statistics.median(values)
            names.append(server)
            mids.append(mid)
            lows.append(mid - min(values))
            highs.append(max(values) - mid)
            colours.append(f"C{SERVERS.index(server)}")
        ax.bar(names, mids, yerr=[lows, highs], capsize=3, color=colours)
        title = label.replace(" (personal)", "").replace(" (multi)", "")
        ax.set_title(f"{title}\n({scenario})", fontsize=10)
        ax.tick_params(axis="x", labelrotation=20, labelsize=8)
        ax.grid(True, axis="y", alpha=0.3)
    fig.suptitle("per-user scenarios: work per server CPU-second (higher is better)")
    fig.tight_layout()
    path = _save(fig, out / "fanin.png")
    plt.close(fig)
    return path


def _finish(fig: Any, ax: Any, xlabel: str, title: str, path: Path) -> Path:
    """An RSS plot's labels, grid and legend; saved to ``path`` and closed."""
    ax.set_xlabel(xlabel)
    ax.set_ylabel("server RSS, MiB")
    ax.grid(True, alpha=0.3)
    ax.legend()
    ax.set_title(title)
    fig.tight_layout()
    _save(fig, path)
    import matplotlib.pyplot as plt

    plt.close(fig)
    return path


def _save(fig: Any, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    return path


# -- docs/performance.md -------------------------------------------------------------------


def write_doc(doc: Path, table: str) -> None:
    """Replace the results section of ``doc`` (between the two markers) with ``table``."""
    text = doc.read_text()
    if DOC_BEGIN not in text or DOC_END not in text:
        raise RuntimeError(f"{doc}: no {DOC_BEGIN} ... {DOC_END} section to replace")
    pattern = re.compile(re.escape(DOC_BEGIN) + r".*?" + re.escape(DOC_END), re.DOTALL)
    doc.write_text(pattern.sub(lambda _: f"{DOC_BEGIN}\n{table}\n{DOC_END}", text, count=1))
