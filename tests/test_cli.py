"""The ``notifier`` command as a user runs it: real processes, real servers, real output.

Every command runs in an empty temporary directory (no ``.env`` can leak in) with no
``NOTIFIER_*`` variable but the ones a test sets. Output is read with deadlines.
"""

from __future__ import annotations

import contextlib
import json
import os
import queue
import re
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any

import httpx
import jwt
import pytest
from conftest import SECRET, mint_token
from support import Instance, RedisServer, free_port, memory_instance, wait_until
from websockets.sync.client import connect, unix_connect

pytestmark = pytest.mark.slow

DEADLINE = 15.0
JWT_RE = r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+"


# -- helpers ----------------------------------------------------------------------------------


def clean_env(**variables: str) -> dict[str, str]:
    """The environment without any ``NOTIFIER_*`` variable, plus ``variables``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("NOTIFIER_")}
    env.update(variables)
    return env


def notifier(*args: str, cwd: Path, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """Run ``notifier ARGS...`` to completion (with a deadline)."""
    return subprocess.run(
        [sys.executable, "-m", "notifier", *args],
        cwd=cwd,
        env=env if env is not None else clean_env(),
        capture_output=True,
        text=True,
        timeout=30,
    )


def assert_one_line_error(result: subprocess.CompletedProcess[str]) -> str:
    """A failed command: non-zero status, exactly one line on stderr, no traceback."""
    assert result.returncode != 0, result
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert result.stdout == "", result.stdout
    return lines[0]


class Lines:
    """Reads a pipe in a thread so that a test can wait for the next line with a deadline."""

    def __init__(self, pipe: IO[str]) -> None:
        self._lines: queue.Queue[str | None] = queue.Queue()
        self.seen: list[str] = []
        self._thread = threading.Thread(target=self._pump, args=(pipe,), daemon=True)
        self._thread.start()

    def _pump(self, pipe: IO[str]) -> None:
        for line in pipe:
            self._lines.put(line)
        self._lines.put(None)

    def next(self, timeout: float = DEADLINE) -> str:
        try:
            line = self._lines.get(timeout=timeout)
        except queue.Empty:
            pytest.fail(f"no output line within {timeout}s (so far: {self.seen!r})")
        if line is None:
            pytest.fail(f"the output ended (so far: {self.seen!r})")
        self.seen.append(line)
        return line

    def until(self, pattern: str, timeout: float = DEADLINE) -> re.Match[str]:
        """Read lines until one matches ``pattern``; its match."""
        deadline = time.monotonic() + timeout
        while True:
            match = re.search(pattern, self.next(max(0.0, deadline - time.monotonic())))
            if match:
                return match

    def rest(self) -> str:
        """Everything read so far plus what is left (once the pipe is closed)."""
        self._thread.join(5)
        while True:
            try:
                line = self._lines.get_nowait()
            except queue.Empty:
                break
            if line is not None:
                self.seen.append(line)
        return "".join(self.seen)


class Process:
    """A long-running ``notifier`` command with both outputs read line by line."""

    def __init__(self, args: list[str], cwd: Path, env: dict[str, str]) -> None:
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "notifier", *args],
            cwd=cwd,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        assert self.proc.stdout is not None and self.proc.stderr is not None
        self.stdout, self.stderr = Lines(self.proc.stdout), Lines(self.proc.stderr)

    def signal(self, signum: int, timeout: float = DEADLINE) -> int:
        """Send ``signum`` to the process group; its exit status (fails after ``timeout``)."""
        status = self._stop(signum, timeout)
        if status is None:
            pytest.fail(f"the process did not exit within {timeout}s of signal {signum}")
        return status

    def _stop(self, signum: int, timeout: float) -> int | None:
        """Signal the group and wait; SIGKILL after ``timeout`` (then None)."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signum)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(5)
            return None

    def close(self) -> None:
        self._stop(signal.SIGTERM, DEADLINE)
        self.stdout.rest()
        self.stderr.rest()
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


@contextmanager
def process(args: list[str], cwd: Path, env: dict[str, str]) -> Iterator[Process]:
    started = Process(args, cwd, env)
    try:
        yield started
    finally:
        started.close()


# -- fixtures ---------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def server() -> Iterator[Instance]:
    """One instance (memory broker) that the client commands talk to."""
    yield from memory_instance(SECRET)


@pytest.fixture
def publisher() -> str:
    return mint_token("backend", ("publish",))


# -- serve --------------------------------------------------------------------------------------


def test_serve_without_a_secret_warns_and_prints_a_working_dev_token_and_demo_url(tmp_path: Path) -> None:
    port = free_port()
    with process(["serve", "--port", str(port)], tmp_path, clean_env()) as serve:
        warning = serve.stderr.until(r"NOTIFIER_JWT_SECRET", DEADLINE)
        assert "warn" in warning.string.lower()

        demo = serve.stdout.until(rf"http://127\.0\.0\.1:{port}/#token=({JWT_RE})\s*$")
        token = demo.group(1)
        printed = [line for line in serve.stdout.seen if token in line and line != demo.string]
        assert printed, f"the dev token itself is printed too: {serve.stdout.seen!r}"
        claims = jwt.decode(token, options={"verify_signature": False})
        assert claims["sub"] == "dev"
        assert set(claims["scope"].split()) == {"subscribe", "publish"}
        assert "topics" not in claims

        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(url + "/readyz", timeout=1).status_code == 200, DEADLINE, "/readyz")
        with connect(f"ws://127.0.0.1:{port}/v1/ws?token={token}&topics=news", open_timeout=5) as ws:
            hello = json.loads(ws.recv(timeout=DEADLINE))
            assert hello["type"] == "hello" and hello["user"] == "dev" and "news" in hello["topics"]

            response = httpx.post(
                url + "/v1/notifications",
                json={"topic": "news", "data": {"title": "hi"}},
                headers={"authorization": f"Bearer {token}"},
                timeout=10,
            )
            assert response.status_code == 202, response.text
            answer = response.json()
            assert json.loads(ws.recv(timeout=DEADLINE)) == {
                "type": "notification",
                "id": answer["id"],
                "topic": "news",
                "data": {"title": "hi"},
                "ts": answer["ts"],
            }


def test_serve_exits_with_status_0_on_sigterm(tmp_path: Path) -> None:
    port = free_port()
    env = clean_env(NOTIFIER_JWT_SECRET=SECRET, NOTIFIER_SHUTDOWN_TIMEOUT="2")
    with process(["serve", "--port", str(port)], tmp_path, env) as serve:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(url + "/readyz", timeout=1).status_code == 200, DEADLINE, "/readyz")
        started = time.monotonic()
        status = serve.signal(signal.SIGTERM, 2 + 5)  # within NOTIFIER_SHUTDOWN_TIMEOUT + 5 s
        assert time.monotonic() - started < 7
        assert status == 0, f"exit status {status}; stderr: {serve.stderr.rest()}"


def test_serve_with_notifier_uds_serves_the_unix_socket_too_and_removes_it_on_exit(tmp_path: Path) -> None:
    port, path = free_port(), tmp_path / "instance.sock"
    env = clean_env(NOTIFIER_JWT_SECRET=SECRET, NOTIFIER_SHUTDOWN_TIMEOUT="2", NOTIFIER_UDS=str(path))
    with process(["serve", "--port", str(port)], tmp_path, env) as serve:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(url + "/readyz", timeout=1).status_code == 200, DEADLINE, "/readyz")
        # A proxy's workers often run as another user: everyone may connect.
        assert stat.S_ISSOCK(path.stat().st_mode) and stat.S_IMODE(path.stat().st_mode) == 0o666
        token = mint_token("alice", ("subscribe",))
        with unix_connect(str(path), f"ws://localhost/v1/ws?token={token}&topics=news", open_timeout=5) as ws:
            assert json.loads(ws.recv(timeout=DEADLINE))["type"] == "hello"
            response = httpx.post(
                url + "/v1/notifications",
                json={"topic": "news", "data": 1},
                headers={"authorization": f"Bearer {mint_token('backend', ('publish',))}"},
                timeout=10,
            )
            assert response.status_code == 202, response.text
            frame = json.loads(ws.recv(timeout=DEADLINE))
            assert (frame["type"], frame["id"], frame["data"]) == ("notification", response.json()["id"], 1)
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(path))) as over_unix:
            assert over_unix.get("http://localhost/readyz", timeout=5).status_code == 200
        assert serve.signal(signal.SIGTERM, 2 + 5) == 0, serve.stderr.rest()
    assert not path.exists()


def test_serve_replaces_a_stale_unix_socket_but_not_a_live_one_or_a_file(tmp_path: Path) -> None:
    stale = tmp_path / "stale.sock"
    with socket.socket(socket.AF_UNIX) as dead:  # bound, never listening, closed: what a crash leaves
        dead.bind(str(stale))
    port = free_port()
    env = clean_env(NOTIFIER_JWT_SECRET=SECRET, NOTIFIER_UDS=str(stale))
    with process(["serve", "--port", str(port)], tmp_path, env):
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(url + "/readyz", timeout=1).status_code == 200, DEADLINE, "/readyz")
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(stale))) as over_unix:
            assert over_unix.get("http://localhost/healthz", timeout=5).status_code == 200

        second = notifier("serve", "--port", str(free_port()), cwd=tmp_path, env=env)
        line = assert_one_line_error(second)
        assert "NOTIFIER_UDS" in line and str(stale) in line and "running server" in line, line
        with httpx.Client(transport=httpx.HTTPTransport(uds=str(stale))) as over_unix:
            assert over_unix.get("http://localhost/healthz", timeout=5).status_code == 200

    plain = tmp_path / "notes.txt"
    plain.write_text("keep me")
    result = notifier("serve", "--port", str(free_port()), cwd=tmp_path,
                      env=clean_env(NOTIFIER_JWT_SECRET=SECRET, NOTIFIER_UDS=str(plain)))
    line = assert_one_line_error(result)
    assert "NOTIFIER_UDS" in line and "not a socket" in line, line
    assert plain.read_text() == "keep me"


@pytest.mark.parametrize("how", ["--port", "NOTIFIER_PORT"])
def test_serve_on_a_port_in_use_fails_with_one_line_before_printing_any_token(
    tmp_path: Path, how: str
) -> None:
    path = tmp_path / "instance.sock"
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        env = clean_env(NOTIFIER_UDS=str(path))  # no secret: a dev token would be printed first
        if how == "--port":
            result = notifier("serve", "--port", str(port), cwd=tmp_path, env=env)
        else:
            result = notifier("serve", cwd=tmp_path, env={**env, "NOTIFIER_PORT": str(port)})
    line = assert_one_line_error(result)  # nothing on stdout: no dev token, no demo URL
    assert "NOTIFIER_PORT" in line and "--port" in line and f"127.0.0.1:{port}" in line, line
    assert "already in use" in line, line
    assert not path.exists()  # nor was the Unix socket created


def test_serve_on_port_0_prints_the_demo_url_of_the_port_it_got(tmp_path: Path) -> None:
    with process(["serve", "--port", "0"], tmp_path, clean_env()) as serve:
        demo = serve.stdout.until(rf"http://127\.0\.0\.1:(\d+)/#token=({JWT_RE})\s*$")
        url = f"http://127.0.0.1:{demo.group(1)}"
        assert demo.group(1) != "0"
        wait_until(lambda: httpx.get(url + "/readyz", timeout=1).status_code == 200, DEADLINE, "/readyz")


def test_serve_with_uvicorn_internals_missing_fails_with_one_line_before_printing_anything(
    tmp_path: Path,
) -> None:
    """notifier's protocols extend uvicorn's private protocol classes and check at import that what
    it uses is still there; an uvicorn without it (here: one method removed) stops `serve`."""
    broken = (
        "import sys\n"
        "from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol\n"
        "del HttpToolsProtocol._should_upgrade\n"
        "from notifier.cli import main\n"
        f"sys.exit(main(['serve', '--port', '{free_port()}']))\n"
    )
    result = subprocess.run([sys.executable, "-c", broken], cwd=tmp_path, env=clean_env(),
                            capture_output=True, text=True, timeout=30)  # fmt: skip
    line = assert_one_line_error(result)
    assert line.startswith("notifier: error: cannot start: "), line
    assert "HttpToolsProtocol" in line and "_should_upgrade" in line and "built against" in line, line


def test_the_check_of_uvicorn_internals_names_what_is_missing() -> None:
    from notifier.server import _require

    class Protocol:
        def data_received(self) -> None:
            self.parser = None

    _require(Protocol, methods=("data_received",), names={"data_received": ("parser",)})
    with pytest.raises(ImportError) as missing:
        _require(Protocol, methods=("data_received", "on_url"), names={"data_received": ("flow",)})
    message = str(missing.value)
    assert "\n" not in message and "Protocol" in message
    assert "on_url" in message and "data_received() using .flow" in message and "built against" in message


@pytest.mark.redis
def test_serve_with_redis_unreachable_logs_the_url_and_why_at_once_and_then_at_each_retry(
    tmp_path: Path,
) -> None:
    redis = RedisServer()  # its port, nothing listening there yet
    broker = f"redis://127.0.0.1:{redis.port}/0"
    port = free_port()
    env = clean_env(NOTIFIER_JWT_SECRET=SECRET, NOTIFIER_BROKER_URL=broker, NOTIFIER_SHUTDOWN_TIMEOUT="2")
    started = time.monotonic()
    with process(["serve", "--port", str(port)], tmp_path, env) as serve:
        first = serve.stderr.until(r"WARNING.*unreachable", timeout=2.0).string
        assert time.monotonic() - started < 2.0
        assert f"{broker} unreachable: Connection refused; retrying in 0.1 s" in first, first
        serve.stderr.until(rf"{re.escape(broker)} unreachable: Connection refused; retrying in 0\.2 s$")
        url = f"http://127.0.0.1:{port}"
        assert httpx.get(url + "/readyz", timeout=5).status_code == 503
        try:
            redis.start()
            serve.stderr.until(rf"INFO.*{re.escape(broker)} connected")
            wait_until(lambda: httpx.get(url + "/readyz", timeout=1).status_code == 200, DEADLINE, "/readyz")
        finally:
            redis.stop()
        assert serve.signal(signal.SIGTERM) == 0


def test_serve_with_redis_unreachable_says_why_to_publishers_and_subscribers(tmp_path: Path) -> None:
    broker_port, port = free_port(), free_port()
    env = clean_env(
        NOTIFIER_JWT_SECRET=SECRET,
        NOTIFIER_BROKER_URL=f"redis://:hunter2@127.0.0.1:{broker_port}/0",
        NOTIFIER_SHUTDOWN_TIMEOUT="2",
    )
    shown = f"redis://:***@127.0.0.1:{broker_port}/0"  # the password never shows
    with process(["serve", "--port", str(port)], tmp_path, env) as serve:
        line = serve.stderr.until(r"unreachable", timeout=2.0).string
        assert f"{shown} unreachable: Connection refused" in line, line
        url = f"http://127.0.0.1:{port}"
        token = mint_token("backend", ("publish", "subscribe"))

        result = notifier("publish", "news", "1", "--url", url, "--token", token, cwd=tmp_path)
        line = assert_one_line_error(result)
        assert (
            f"503 Service Unavailable: broker unavailable, nothing accepted: {shown} not connected yet: "
            "Connection refused"
        ) in line, line

        with process(["subscribe", "news", "--url", url, "--token", token], tmp_path, clean_env()) as sub:
            retry = sub.stderr.until(r"handshake refused").string
            assert f"HTTP 503: broker unavailable: {shown} not connected: Connection refused" in retry, retry
            assert "reconnecting in" in retry
        assert serve.signal(signal.SIGTERM) == 0
    assert "hunter2" not in serve.stderr.rest() + serve.stdout.rest()


@pytest.mark.parametrize("access_log", [None, "true"], ids=["default", "NOTIFIER_ACCESS_LOG=true"])
def test_serve_logs_handshakes_and_requests_only_when_asked_and_never_their_token(
    tmp_path: Path, access_log: str | None
) -> None:
    port = free_port()
    env = clean_env(NOTIFIER_JWT_SECRET=SECRET, **({"NOTIFIER_ACCESS_LOG": access_log} if access_log else {}))
    token = mint_token("alice", ("subscribe", "publish"))
    with process(["serve", "--port", str(port)], tmp_path, env) as serve:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(url + "/readyz", timeout=1).status_code == 200, DEADLINE, "/readyz")
        with connect(f"ws://127.0.0.1:{port}/v1/ws?token={token}&topics=news", open_timeout=5) as ws:
            assert json.loads(ws.recv(timeout=DEADLINE))["type"] == "hello"
        if access_log:
            serve.stderr.until(r'"WebSocket /v1/ws\?token=\[redacted\]&topics=news" \[accepted\]')
        response = httpx.post(url + "/v1/notifications", json={"topic": "news", "data": 1},
                              headers={"authorization": f"Bearer {token}"}, timeout=10)
        assert response.status_code == 202, response.text
        assert serve.signal(signal.SIGTERM) == 0
    logged = serve.stderr.rest() + serve.stdout.rest()
    assert token not in logged
    assert ('"POST /v1/notifications HTTP/1.1" 202' in logged) == (access_log == "true"), logged
    assert ("[accepted]" in logged) == (access_log == "true"), logged
    assert ("connection open" in logged) == (access_log == "true"), logged


# -- token --------------------------------------------------------------------------------------


def test_token_prints_a_jwt_signed_with_the_secret_carrying_the_claims(tmp_path: Path) -> None:
    issued = int(time.time())
    result = notifier(
        "token", "--sub", "alice", "--scope", "subscribe", "--topic", "room:*", "--ttl", "60",
        cwd=tmp_path, env=clean_env(NOTIFIER_JWT_SECRET=SECRET),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    token = result.stdout.strip()
    assert re.fullmatch(JWT_RE, token), result.stdout
    claims = jwt.decode(token, SECRET, algorithms=["HS256"])
    assert claims["sub"] == "alice"
    assert claims["scope"].split() == ["subscribe"]
    assert claims["topics"] == ["room:*"]
    assert issued + 60 - 2 <= claims["exp"] <= int(time.time()) + 60 + 2


def test_token_with_both_scopes_and_no_topic_may_publish_anywhere(tmp_path: Path) -> None:
    result = notifier(
        "token", "--sub", "svc", "--scope", "subscribe", "--scope", "publish",
        cwd=tmp_path, env=clean_env(NOTIFIER_JWT_SECRET=SECRET),
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    claims = jwt.decode(result.stdout.strip(), SECRET, algorithms=["HS256"])
    assert set(claims["scope"].split()) == {"subscribe", "publish"}
    assert "topics" not in claims
    assert claims["exp"] > time.time() + 3000  # the default ttl is an hour


def test_token_without_a_secret_fails_with_one_line(tmp_path: Path) -> None:
    result = notifier("token", "--sub", "alice", "--scope", "subscribe", cwd=tmp_path)
    line = assert_one_line_error(result)
    assert "NOTIFIER_JWT_SECRET" in line


# -- publish ------------------------------------------------------------------------------------


def test_publish_prints_the_json_answer(server: Instance, publisher: str, tmp_path: Path) -> None:
    result = notifier(
        "publish", "news", '{"title": "hi"}', "--url", server.url, "--token", publisher, cwd=tmp_path
    )
    assert result.returncode == 0, result.stderr
    answer = json.loads(result.stdout)
    assert set(answer) == {"id", "topic", "ts"}
    assert answer["id"].isdigit() and answer["topic"] == "news"
    assert abs(answer["ts"] - time.time() * 1000) < 60_000


def test_publish_takes_url_and_token_from_the_environment(
    server: Instance, publisher: str, tmp_path: Path
) -> None:
    env = clean_env(NOTIFIER_URL=server.url, NOTIFIER_TOKEN=publisher)
    result = notifier("publish", "news", "null", cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["topic"] == "news"


def test_publish_with_a_bad_token_fails_with_one_line_saying_401_why_and_how_to_pass_one(
    server: Instance, tmp_path: Path
) -> None:
    bad = mint_token("backend", ("publish",), secret="not-the-secret-0123456789abcdef0123")
    result = notifier("publish", "news", "{}", "--url", server.url, "--token", bad, cwd=tmp_path)
    line = assert_one_line_error(result)
    assert "401 Unauthorized: invalid token: " in line, line
    assert "set NOTIFIER_TOKEN or pass --token with a valid one" in line, line


def test_publish_without_a_token_fails_with_one_line_saying_none_was_given(
    server: Instance, tmp_path: Path
) -> None:
    result = notifier("publish", "news", "{}", "--url", server.url, cwd=tmp_path)
    line = assert_one_line_error(result)
    assert line == (
        "notifier: error: 401 Unauthorized: missing bearer token; "
        "no token was given: set NOTIFIER_TOKEN or pass --token"
    ), line


def test_publish_refused_for_its_scope_says_the_servers_reason(server: Instance, tmp_path: Path) -> None:
    reader = mint_token("reader", ("subscribe",))
    result = notifier("publish", "news", "{}", "--url", server.url, "--token", reader, cwd=tmp_path)
    line = assert_one_line_error(result)
    assert line == "notifier: error: 403 Forbidden: token lacks the 'publish' scope", line


def test_publish_to_an_unreachable_server_fails_with_one_line(publisher: str, tmp_path: Path) -> None:
    nobody = f"http://127.0.0.1:{free_port()}"
    result = notifier("publish", "news", "{}", "--url", nobody, "--token", publisher, cwd=tmp_path)
    assert_one_line_error(result)


@pytest.mark.parametrize("data", ["{not json", ""])
def test_publish_with_invalid_json_data_fails_with_one_line(
    server: Instance, publisher: str, tmp_path: Path, data: str
) -> None:
    result = notifier("publish", "news", data, "--url", server.url, "--token", publisher, cwd=tmp_path)
    assert_one_line_error(result)


def test_publish_with_data_too_deep_to_encode_fails_with_one_line(
    server: Instance, publisher: str, tmp_path: Path
) -> None:
    deep = "[" * 1000 + "]" * 1000  # valid JSON that orjson reads but cannot write back
    result = notifier("publish", "news", deep, "--url", server.url, "--token", publisher, cwd=tmp_path)
    assert "cannot be sent as JSON" in assert_one_line_error(result)


# -- subscribe ----------------------------------------------------------------------------------


def test_subscribe_prints_each_notification_as_one_json_line_at_once(
    server: Instance, publisher: str, tmp_path: Path
) -> None:
    wait_until(lambda: server.metric("notifier_connections") == 0, DEADLINE, "no connection on the server")
    token = mint_token("reader", ("subscribe",))
    args = ["subscribe", "news", "--url", server.url, "--token", token]
    with process(args, tmp_path, clean_env()) as subscriber:
        wait_until(lambda: server.metric("notifier_connections") == 1, DEADLINE, "the subscriber to connect")

        sent: list[tuple[dict[str, Any], Any]] = []
        for data in ({"title": "first"}, None):
            result = notifier(
                "publish", "news", json.dumps(data), "--url", server.url, "--token", publisher, cwd=tmp_path
            )
            assert result.returncode == 0, result.stderr
            sent.append((json.loads(result.stdout), data))
            # Read while the subscriber still runs: the line must have been flushed at once.
            line = subscriber.stdout.next()
            assert line.endswith("\n") and line.count("\n") == 1
            answer = sent[-1][0]
            assert json.loads(line) == {
                "type": "notification",
                "id": answer["id"],
                "topic": "news",
                "data": data,
                "ts": answer["ts"],
            }
        assert subscriber.proc.poll() is None

        subscriber.signal(signal.SIGINT)
        assert "Traceback" not in subscriber.stderr.rest()


def test_subscribe_with_a_bad_token_fails_with_one_line_saying_403_why_and_how_to_pass_one(
    server: Instance, tmp_path: Path
) -> None:
    bad = mint_token("reader", ("subscribe",), secret="not-the-secret-0123456789abcdef0123")
    result = notifier("subscribe", "news", "--url", server.url, "--token", bad, cwd=tmp_path)
    line = assert_one_line_error(result)
    assert "handshake refused: HTTP 403: invalid token: " in line, line
    assert "set NOTIFIER_TOKEN or pass --token with a valid one" in line, line


def test_subscribe_without_a_token_fails_with_one_line_saying_none_was_given(
    server: Instance, tmp_path: Path
) -> None:
    result = notifier("subscribe", "news", "--url", server.url, cwd=tmp_path)
    line = assert_one_line_error(result)
    assert line == (
        "notifier: error: handshake refused: HTTP 403: missing bearer token; "
        "no token was given: set NOTIFIER_TOKEN or pass --token"
    ), line


def test_subscribe_to_a_topic_not_allowed_says_the_servers_reason_and_no_token_hint(
    server: Instance, tmp_path: Path
) -> None:
    limited = mint_token("reader", ("subscribe",), topics=["room:*"])
    result = notifier("subscribe", "news", "--url", server.url, "--token", limited, cwd=tmp_path)
    line = assert_one_line_error(result)
    assert line == "notifier: error: handshake refused: HTTP 403: not allowed to subscribe to 'news'", line


def test_subscribe_to_an_unreachable_server_fails_with_one_line(tmp_path: Path) -> None:
    nobody = f"http://127.0.0.1:{free_port()}"
    result = notifier("subscribe", "news", "--url", nobody, "--token", mint_token("reader"), cwd=tmp_path)
    assert_one_line_error(result)


# -- presence -----------------------------------------------------------------------------------


def presence_of(url: str, topic: str) -> dict[str, Any]:
    """The presence answer of ``topic``, straight over HTTP (where the command is not under test)."""
    response = httpx.get(
        f"{url}/v1/topics/{topic}/presence",
        headers={"authorization": f"Bearer {mint_token('watcher', ('subscribe',))}"},
        timeout=10,
    )
    assert response.status_code == 200, response.text
    answer: dict[str, Any] = response.json()
    return answer


def test_presence_prints_the_json_answer_with_each_users_connections(
    server: Instance, tmp_path: Path
) -> None:
    topic = f"cli:presence:{os.getpid()}.{time.monotonic_ns()}"
    expected = {
        "topic": topic,
        "count": 2,
        "users": [{"user": "bob", "connections": 2}, {"user": "carol", "connections": 1}],
    }
    with contextlib.ExitStack() as stack:
        for user in ("bob", "bob", "carol"):
            query = f"token={mint_token(user, ('subscribe',))}&topics={topic}"
            ws = stack.enter_context(connect(f"{server.ws_url}?{query}", open_timeout=5))
            assert json.loads(ws.recv(timeout=DEADLINE))["type"] == "hello"
        wait_until(lambda: presence_of(server.url, topic) == expected, DEADLINE, "bob and carol there")
        token = mint_token("alice", ("subscribe",), topics=["cli:*"])
        result = notifier("presence", topic, "--url", server.url, "--token", token, cwd=tmp_path)
        assert result.returncode == 0, result.stderr
        assert result.stderr == ""
        assert result.stdout.endswith("\n") and result.stdout.count("\n") == 1
        assert json.loads(result.stdout) == expected
    env = clean_env(NOTIFIER_URL=server.url, NOTIFIER_TOKEN=token)  # the environment's, as the others
    wait_until(lambda: presence_of(server.url, topic)["count"] == 0, DEADLINE, "everyone to be gone")
    result = notifier("presence", topic, cwd=tmp_path, env=env)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) == {"topic": topic, "count": 0, "users": []}


def test_presence_of_a_topic_not_allowed_fails_with_one_line_saying_403_and_no_token_hint(
    server: Instance, tmp_path: Path
) -> None:
    limited = mint_token("reader", ("subscribe",), topics=["room:*"])
    result = notifier("presence", "news", "--url", server.url, "--token", limited, cwd=tmp_path)
    assert result.returncode == 1
    line = assert_one_line_error(result)
    assert line.startswith("notifier: error: 403 Forbidden: "), line
    assert "NOTIFIER_TOKEN" not in line, line


def test_presence_of_broadcast_fails_with_one_line_saying_422(server: Instance, tmp_path: Path) -> None:
    token = mint_token("reader", ("subscribe",))
    result = notifier("presence", "broadcast", "--url", server.url, "--token", token, cwd=tmp_path)
    assert result.returncode == 1
    assert assert_one_line_error(result).startswith("notifier: error: 422 Unprocessable"), result.stderr


def test_presence_without_a_token_fails_with_one_line_saying_none_was_given(
    server: Instance, tmp_path: Path
) -> None:
    result = notifier("presence", "news", "--url", server.url, cwd=tmp_path)
    line = assert_one_line_error(result)
    assert line == (
        "notifier: error: 401 Unauthorized: missing bearer token; "
        "no token was given: set NOTIFIER_TOKEN or pass --token"
    ), line
