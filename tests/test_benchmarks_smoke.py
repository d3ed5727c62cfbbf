"""Smoke run of the benchmark suite (benchmarks/, docs/performance.md) so it never rots.

Every scenario against notifier (Redis broker) and both baselines with tiny numbers: each must
print one JSON line with the expected keys, and nothing may be lost. No timing assertions.
Needs node (the load generator), redis-server and nginx; the C receiver is built with cc when
there is one, else the JavaScript receiver runs (neither needs benchmarks/node_modules).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytestmark = [pytest.mark.slow, pytest.mark.redis]

SERVERS = ("fastapi_manager", "ws_broadcast", "notifier")
SCENARIOS = ("fanout", "steady", "idle_memory", "cluster")


# What every result line carries (docs/performance.md describes each).
REQUIRED_KEYS = {
    "scenario", "server", "subscribers", "published", "deliveries_per_s", "deliveries_per_cpu_s",
    "server_cpu_s", "p50_ms", "p90_ms", "p99_ms", "max_ms", "lost", "rss_kib", "kib_per_connection",
    "loadgen_cpu_s", "loadgen_cpu_util", "ratio_metric", "ratios", "errors",
}  # fmt: skip


def _missing() -> list[str]:
    search = os.pathsep.join([os.environ.get("PATH", os.defpath), "/usr/local/sbin", "/usr/sbin", "/sbin"])
    return [name for name in ("node", "redis-server", "nginx") if shutil.which(name, path=search) is None]


def test_every_scenario_prints_a_json_line_and_loses_nothing(tmp_path: Path) -> None:
    missing = _missing()
    if missing:
        pytest.skip(f"the benchmark needs {', '.join(missing)}")
    argv = [
        sys.executable, "-m", "benchmarks",
        "--scenarios", ",".join(SCENARIOS), "--servers", ",".join(SERVERS),
        "--subscribers", "5", "--steady-subscribers", "5", "--notifications", "10",
        "--duration", "1", "--warmup", "0.2", "--rate", "20",
        "--connections", "5", "--idle-steps", "2", "--settle", "0.1", "--instances", "2",
        "--out", str(tmp_path), "--no-plots", "--json-only",
    ]  # fmt: skip
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, f"status {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"

    lines = [json.loads(line) for line in done.stdout.splitlines() if line.strip()]
    seen = {(line["scenario"], line["server"]) for line in lines}
    assert seen == {(scenario, server) for scenario in SCENARIOS for server in SERVERS}, done.stdout
    assert len(lines) == len(seen)
    for line in lines:
        assert REQUIRED_KEYS <= line.keys(), REQUIRED_KEYS - line.keys()
        assert line.keys() == lines[0].keys(), line
        assert line["lost"] == 0, line
        assert line["published"] and line["published"] >= 1, line
        assert line["out_of_order"] == 0, line
        assert line["errors"] == [], line
        if line["server"] == "notifier":
            assert set(line["ratios"]) == {"fastapi_manager", "ws_broadcast"}, line
    # Through nginx every server is reached the way deploy/local-cluster reaches notifier.
    assert {line["upstream"] for line in lines if line["scenario"] == "cluster"} == {"unix"}, lines
    idle = [line for line in lines if line["scenario"] == "idle_memory"]
    assert all(line["rss_before_kib"] and line["rss_kib"] for line in idle), idle

    results = json.loads((tmp_path / "latest.json").read_text())
    assert len(results["runs"]) == len(lines)
    assert (tmp_path / "latest.md").read_text().count("| notifier") >= 1


def test_per_user_scenarios_print_a_json_line_and_lose_nothing(tmp_path: Path) -> None:
    """personal, multi and handshake (one socket per user on its own user: topic; the baselines
    with their topic registry), tiny: every notification reaches its user exactly once (lost 0,
    none misrouted, no repeated id), every handshake gets its hello."""
    missing = _missing()
    if missing:
        pytest.skip(f"the benchmark needs {', '.join(missing)}")
    scenarios = ("personal", "multi", "handshake")
    argv = [
        sys.executable, "-m", "benchmarks",
        "--scenarios", ",".join(scenarios), "--servers", ",".join(SERVERS),
        "--personal-users", "6", "--multi-users", "4", "--handshake-concurrency", "3",
        "--handshake-tokens", "5", "--publish-sockets", "2", "--pipeline", "2",
        "--notifications", "12", "--duration", "0.3", "--warmup", "0.1",
        "--out", str(tmp_path), "--json-only",
    ]  # fmt: skip
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"status {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"

    lines = [json.loads(line) for line in done.stdout.splitlines() if line.strip().startswith("{")]
    seen = {(line["scenario"], line["server"]) for line in lines}
    assert seen == {(scenario, server) for scenario in scenarios for server in SERVERS}, done.stdout
    assert len(lines) == len(seen)
    for line in lines:
        assert REQUIRED_KEYS <= line.keys(), REQUIRED_KEYS - line.keys()
        assert line["errors"] == [], line
        assert line["out_of_order"] == 0, line
        if line["server"] == "notifier":
            assert set(line["ratios"]) == {"fastapi_manager", "ws_broadcast"}, line
        if line["scenario"] == "handshake":
            assert line["handshake_failures"] == {}, line
            assert line["ratio_metric"] == "handshakes_per_cpu_s", line
        else:
            assert line["lost"] == 0 and line["misrouted"] == 0, line
            assert line["published"] and line["published"] >= 1, line
            assert line["subscribers"] == (6 if line["scenario"] == "personal" else 4), line
    results = json.loads((tmp_path / "latest.json").read_text())
    assert len(results["runs"]) == len(lines)
    table = (tmp_path / "latest.md").read_text()
    assert "**personal**" in table and "**multi**" in table and "**handshake**" in table, table


def test_broker_cost_prints_the_table() -> None:
    """benchmarks/broker_cost.py (docs/performance.md, "Broker side: one Redis vs three shards"),
    tiny: one Redis, a one-node cluster and three shards, one round each."""
    search = os.pathsep.join([os.environ.get("PATH", os.defpath), "/usr/local/sbin", "/usr/sbin", "/sbin"])
    if shutil.which("redis-server", path=search) is None or shutil.which("redis-cli", path=search) is None:
        pytest.skip("the benchmark needs redis-server and redis-cli")
    argv = [sys.executable, "-m", "benchmarks.broker_cost", "--count", "200", "--repeat", "1", "--json"]
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, f"status {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"
    assert "| one Redis |" in done.stdout and "| 3-shard cluster (total) |" in done.stdout, done.stdout
    result = json.loads(done.stdout.splitlines()[-1])
    cluster = result["summary"]["cluster"]
    assert len(cluster["shard_share"]) == 3 and abs(sum(cluster["shard_share"]) - 1) < 1e-6, cluster
    assert all(share > 0 for share in cluster["shard_calls_share"]), cluster
    assert sum(len(runs) for runs in result["runs"].values()) == 3


def test_presence_and_sse_scenarios_print_a_json_line(tmp_path: Path) -> None:
    """handshake_room, handshake_presence, fanout_sse, steady_sse and presence_events (notifier only), tiny:
    one line each; the handshakes get their hello and carry Redis's calls per handshake, the
    event streams lose nothing, the presence listeners receive join and leave frames."""
    missing = _missing()
    if missing:
        pytest.skip(f"the benchmark needs {', '.join(missing)}")
    scenarios = (
        "handshake_room",
        "handshake_presence",
        "fanout_sse",
        "steady_sse",
        "presence_events",
    )
    argv = [
        sys.executable, "-m", "benchmarks",
        "--scenarios", ",".join(scenarios), "--servers", "notifier",
        "--subscribers", "5", "--steady-subscribers", "5", "--rate", "20",
        "--handshake-concurrency", "3", "--handshake-tokens", "5",
        "--presence-listeners", "4", "--presence-churners", "2", "--presence-hold-ms", "100",
        "--notifications", "12", "--duration", "0.6", "--warmup", "0.2",
        "--out", str(tmp_path), "--no-plots",
    ]  # fmt: skip
    done = subprocess.run(argv, cwd=ROOT, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, f"status {done.returncode}\nstdout:\n{done.stdout}\nstderr:\n{done.stderr}"

    lines = [json.loads(line) for line in done.stdout.splitlines() if line.strip().startswith("{")]
    seen = {(line["scenario"], line["server"]) for line in lines}
    # The new scenarios are notifier's only (a baseline has no presence, no event stream).
    assert seen == {(s, "notifier") for s in scenarios}, done.stdout
    for line in lines:
        assert REQUIRED_KEYS <= line.keys(), REQUIRED_KEYS - line.keys()
        assert line["errors"] == [], line
        assert line["out_of_order"] == 0, line
        if line["server"] != "notifier":
            continue
        if line["scenario"].startswith("handshake"):
            assert line["handshake_failures"] == {}, line
            assert line["redis_calls_per_op"] and line["redis_us_per_op"], line
        elif line["scenario"] in ("fanout_sse", "steady_sse"):
            assert line["receiver"] == "sse" and line["lost"] == 0, line
            assert line["published"] and line["published"] >= 1, line
        else:
            assert line["presence_events_per_s"] is not None, line
    results = json.loads((tmp_path / "latest.json").read_text())
    events = [r["presence_events"] for r in results["runs"] if r["line"]["scenario"] == "presence_events"]
    assert events and events[0]["joins"] > 0 and events[0]["leaves"] > 0, events
    assert "**presence and SSE**" in (tmp_path / "latest.md").read_text()
