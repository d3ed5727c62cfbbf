"""``notifier bench`` as a user runs it: real ``notifier serve`` processes, short runs.

Runs are 1 s long with few sockets: what is checked is the accounting (every accepted
notification reaches every socket of its topic, nothing lost, counts consistent), the output
formats and the one-line errors, never timings.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import SECRET, mint_token
from support import Instance, RedisServer, free_port, memory_instance, wait_until
from test_cli import assert_one_line_error, clean_env

pytestmark = pytest.mark.slow

TOKEN_HINT = "set NOTIFIER_TOKEN or pass --token"


def bench(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "notifier", "bench", *args],
        cwd=cwd,
        env=env if env is not None else clean_env(),
        capture_output=True,
        text=True,
        timeout=60,
    )


def bench_json(server: Instance, *args: str, cwd: Path, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run with ``--json``: stdout is exactly one JSON object."""
    result = bench("--url", server.url, "--token", both_scopes(), *args, "--json", cwd=cwd, env=env)
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert len(result.stdout.strip().splitlines()) == 1, result.stdout
    answer = json.loads(result.stdout)
    assert isinstance(answer, dict)
    return answer


def both_scopes(sub: str = "bencher") -> str:
    return mint_token(sub, ("subscribe", "publish"))


def assert_nothing_lost(answer: dict[str, Any], sockets_per_topic: int) -> None:
    assert answer["published"] >= 1
    assert answer["accepted"] == answer["published"]
    assert answer["expected"] == answer["accepted"] * sockets_per_topic
    assert answer["received"] == answer["expected"]
    assert answer["lost"] == 0
    assert answer["out_of_order"] == 0
    assert answer["errors"] == 0, answer["errors_by"]
    latency = answer["latency_ms"]
    assert latency["p50"] is not None and latency["p99"] is not None
    assert latency["p50"] <= latency["p99"] <= latency["max"]
    assert answer["accepted_per_s"] > 0 and answer["deliveries_per_s"] > 0
    assert 0 <= answer["loadgen"]["cpu_share"]


@pytest.fixture(scope="module")
def server() -> Iterator[Instance]:
    yield from memory_instance(SECRET)


# -- measurements -----------------------------------------------------------------------------


def test_fanout_delivers_every_accepted_notification_to_every_socket(
    server: Instance, tmp_path: Path
) -> None:
    answer = bench_json(
        server, "--scenario", "fanout", "--duration", "1", "--subscribers", "20", "--rate", "20", cwd=tmp_path
    )
    assert answer["scenario"] == "fanout" and answer["url"] == server.url
    assert answer["sockets"] == 20 and answer["topics"] == 1
    assert answer["published"] == 20  # duration x rate
    assert_nothing_lost(answer, 20)


def test_personal_delivers_each_notification_to_the_one_socket_of_its_topic(
    server: Instance, tmp_path: Path
) -> None:
    answer = bench_json(
        server,
        "--scenario",
        "personal",
        "--duration",
        "1",
        "--subscribers",
        "10",
        "--rate",
        "100",
        cwd=tmp_path,
    )
    assert answer["sockets"] == 10 and answer["topics"] == 10
    assert answer["published"] == 100
    assert_nothing_lost(answer, 1)


def test_handshake_counts_handshakes_and_their_time(server: Instance, tmp_path: Path) -> None:
    answer = bench_json(
        server, "--scenario", "handshake", "--duration", "1", "--concurrency", "4", cwd=tmp_path
    )
    assert answer["scenario"] == "handshake" and answer["concurrency"] == 4
    assert answer["handshakes"] > 0 and answer["handshakes_per_s"] > 0
    assert answer["failed"] == 0, answer["failed_by"]
    assert answer["handshake_ms"]["p50"] is not None


def test_the_table_has_its_headers_and_one_row(server: Instance, tmp_path: Path) -> None:
    env = clean_env(NOTIFIER_URL=server.url, NOTIFIER_TOKEN=both_scopes())  # defaults from the environment
    result = bench("--scenario", "fanout", "--duration", "1", "--subscribers", "5", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    for header in ("scenario", "url", "sockets", "accepted/s", "deliveries/s", "p50 ms", "p99 ms", "lost"):
        assert header in lines[0], lines[0]
    assert lines[2].split()[:2] == ["fanout", server.url], lines[2]
    assert "LOST" not in result.stdout
    assert "load generator:" in result.stdout


def test_more_sockets_than_the_per_user_limit_need_the_secret(tmp_path: Path) -> None:
    limited = Instance(
        {
            "NOTIFIER_BROKER_URL": "memory://",
            "NOTIFIER_JWT_SECRET": SECRET,
            "NOTIFIER_MAX_CONNECTIONS_PER_USER": "3",
        }
    )
    try:
        limited.start()
        args = ("--url", limited.url, "--token", both_scopes(), "--scenario", "fanout", "--duration", "1")
        refused = bench(*args, "--subscribers", "5", cwd=tmp_path)
        line = assert_one_line_error(refused)
        assert refused.returncode == 1
        assert "HTTP 429: " in line and "NOTIFIER_MAX_CONNECTIONS_PER_USER" in line, line
        assert "set NOTIFIER_JWT_SECRET" in line and "fewer --subscribers" in line, line
        # With the deployment's secret, each socket gets a token (a user) of its own.
        answer = bench_json(
            limited, *args[4:], "--subscribers", "5", cwd=tmp_path, env=clean_env(NOTIFIER_JWT_SECRET=SECRET)
        )
        assert_nothing_lost(answer, 5)
    finally:
        limited.stop()
        os.unlink(limited.log.name)


@pytest.mark.redis
def test_fanout_and_personal_on_a_redis_broker_lose_nothing(
    redis_server: RedisServer, tmp_path: Path
) -> None:
    instance = Instance({"NOTIFIER_BROKER_URL": redis_server.url, "NOTIFIER_JWT_SECRET": SECRET})
    try:
        instance.start()
        fanout = bench_json(
            instance,
            "--scenario",
            "fanout",
            "--duration",
            "1",
            "--subscribers",
            "10",
            "--rate",
            "20",
            cwd=tmp_path,
        )
        assert_nothing_lost(fanout, 10)
        personal = bench_json(
            instance,
            "--scenario",
            "personal",
            "--duration",
            "1",
            "--subscribers",
            "5",
            "--rate",
            "50",
            cwd=tmp_path,
        )
        assert_nothing_lost(personal, 1)
    finally:
        instance.stop()
        os.unlink(instance.log.name)


def test_ctrl_c_stops_a_run_quietly_with_status_130_and_closes_every_socket(
    server: Instance, tmp_path: Path
) -> None:
    env = clean_env(NOTIFIER_URL=server.url, NOTIFIER_TOKEN=both_scopes("interrupted"))
    args = ["--scenario", "fanout", "--duration", "60", "--subscribers", "7", "--rate", "5"]
    before = server.metric("notifier_connections")
    run = subprocess.Popen(
        [sys.executable, "-m", "notifier", "bench", *args],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        wait_until(lambda: server.metric("notifier_connections") >= before + 7, 20, "the run's sockets")
        run.send_signal(signal.SIGINT)
        stdout, stderr = run.communicate(timeout=20)
    finally:
        if run.poll() is None:
            run.kill()
            run.communicate()
    assert run.returncode == 130, stderr
    assert stdout == "" and "Traceback" not in stderr, (stdout, stderr)
    wait_until(lambda: server.metric("notifier_connections") <= before, 10, "the run's sockets to close")


# -- errors -----------------------------------------------------------------------------------


def test_a_bad_token_is_one_line_with_the_servers_reason_and_how_to_pass_one(
    server: Instance, tmp_path: Path
) -> None:
    bad = mint_token("bencher", ("subscribe", "publish"), secret="not-the-secret-0123456789abcdef0123")
    result = bench("--url", server.url, "--token", bad, "--scenario", "fanout", cwd=tmp_path)
    line = assert_one_line_error(result)
    assert result.returncode == 1
    assert "401 Unauthorized: invalid token: " in line, line
    assert TOKEN_HINT in line, line


def test_no_token_is_one_line_saying_none_was_given(server: Instance, tmp_path: Path) -> None:
    result = bench("--url", server.url, "--scenario", "handshake", cwd=tmp_path)
    line = assert_one_line_error(result)
    assert result.returncode == 1
    assert "401 Unauthorized: missing bearer token" in line and "no token was given" in line, line


def test_socket_tokens_signed_with_another_secret_are_one_line_saying_so(
    server: Instance, tmp_path: Path
) -> None:
    env = clean_env(NOTIFIER_JWT_SECRET="another-secret-0123456789abcdef0123456789")
    for scenario in ("fanout", "handshake"):
        result = bench(
            "--url", server.url, "--token", both_scopes(), "--scenario", scenario, cwd=tmp_path, env=env
        )
        line = assert_one_line_error(result)
        assert result.returncode == 1
        assert "HTTP 403: invalid token: " in line and "signed with NOTIFIER_JWT_SECRET" in line, line


@pytest.mark.parametrize(
    ("token", "reason"),
    [
        (mint_token("reader", ("subscribe",)), "403 Forbidden: token lacks the 'publish' scope"),
        (
            mint_token("roomy", ("subscribe", "publish"), topics=["room:*"]),
            "403 Forbidden: not allowed to subscribe",
        ),
    ],
    ids=["publish-scope-missing", "topics-claim"],
)
def test_a_token_without_both_scopes_or_with_a_topics_claim_is_refused_in_one_line(
    server: Instance, tmp_path: Path, token: str, reason: str
) -> None:
    result = bench("--url", server.url, "--token", token, "--scenario", "fanout", cwd=tmp_path)
    line = assert_one_line_error(result)
    assert result.returncode == 1
    assert reason in line and "both scopes and no topics claim" in line, line


def test_an_unreachable_server_is_one_line(tmp_path: Path) -> None:
    nobody = f"http://127.0.0.1:{free_port()}"
    result = bench("--url", nobody, "--token", both_scopes(), "--scenario", "personal", cwd=tmp_path)
    line = assert_one_line_error(result)
    assert result.returncode == 1
    assert f"cannot reach {nobody}" in line, line


@pytest.mark.parametrize(
    ("args", "named"),
    [
        ([], "--scenario"),
        (["--scenario", "storm"], "--scenario"),
        (["--scenario", "fanout", "--duration", "0"], "--duration"),
        (["--scenario", "fanout", "--duration", "301"], "--duration"),
        (["--scenario", "fanout", "--duration", "soon"], "--duration"),
        (["--scenario", "fanout", "--subscribers", "0"], "--subscribers"),
        (["--scenario", "personal", "--subscribers", "10001"], "--subscribers"),
        (["--scenario", "fanout", "--rate", "0"], "--rate"),
        (["--scenario", "fanout", "--rate", "nan"], "--rate"),
        (["--scenario", "personal", "--rate", "50001"], "--rate"),
        (["--scenario", "handshake", "--rate", "5"], "--rate"),
        (["--scenario", "fanout", "--concurrency", "5"], "--concurrency"),
        (["--scenario", "handshake", "--concurrency", "1001"], "--concurrency"),
        (["--scenario", "fanout", "--url", "ftp://example"], "--url"),
    ],
)
def test_bad_arguments_are_one_line_and_status_2(tmp_path: Path, args: list[str], named: str) -> None:
    result = bench(*args, "--token", "unused", cwd=tmp_path)
    line = assert_one_line_error(result)
    assert result.returncode == 2, line
    assert named in line, line
