"""Configuration: the contract's defaults, the ``NOTIFIER_`` environment, ``.env``, and bad values."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
from support import free_port

from notifier.settings import ConfigError, load_settings

ROOT = Path(__file__).resolve().parent.parent

CONTRACT_DEFAULTS = {
    "broker_url": "memory://",
    "jwt_secret": None,
    "host": "127.0.0.1",
    "port": 8000,
    "max_connections": 10000,
    "max_connections_per_user": 100,
    "max_topics_per_connection": 128,
    "max_message_bytes": 65536,
    "history_size": 1000,
    "send_queue_bytes": 1048576,
    "shutdown_timeout": 10,
}


@pytest.fixture(autouse=True)
def clean_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No NOTIFIER_ variable from the outside, and a working directory without a .env file."""
    for name in list(os.environ):
        if name.upper().startswith("NOTIFIER_"):
            monkeypatch.delenv(name)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_defaults_are_the_contract_table() -> None:
    settings = load_settings()
    assert {name: getattr(settings, name) for name in CONTRACT_DEFAULTS} == CONTRACT_DEFAULTS


def test_no_secret_configured_is_reported_as_the_missing_variable() -> None:
    with pytest.raises(ConfigError, match="NOTIFIER_JWT_SECRET"):
        _ = load_settings().secret


@pytest.mark.parametrize(
    ("variable", "value", "field", "expected"),
    [
        ("NOTIFIER_BROKER_URL", "redis://cache:6379/2", "broker_url", "redis://cache:6379/2"),
        ("NOTIFIER_BROKER_URL", "rediss://cache:6380/0", "broker_url", "rediss://cache:6380/0"),
        ("NOTIFIER_HOST", "0.0.0.0", "host", "0.0.0.0"),
        ("NOTIFIER_PORT", "9123", "port", 9123),
        ("NOTIFIER_MAX_CONNECTIONS", "5", "max_connections", 5),
        ("NOTIFIER_MAX_CONNECTIONS_PER_USER", "1", "max_connections_per_user", 1),
        ("NOTIFIER_MAX_TOPICS_PER_CONNECTION", "2", "max_topics_per_connection", 2),
        ("NOTIFIER_MAX_MESSAGE_BYTES", "4096", "max_message_bytes", 4096),
        ("NOTIFIER_HISTORY_SIZE", "0", "history_size", 0),
        ("NOTIFIER_SEND_QUEUE_BYTES", "2048", "send_queue_bytes", 2048),
        ("NOTIFIER_SHUTDOWN_TIMEOUT", "2.5", "shutdown_timeout", 2.5),
        ("NOTIFIER_WS_COMPRESSION", "true", "ws_compression", True),
        ("NOTIFIER_ACCESS_LOG", "true", "access_log", True),
        ("NOTIFIER_UDS", "/run/notifier/1.sock", "uds", "/run/notifier/1.sock"),
    ],
)
def test_each_setting_is_read_from_its_notifier_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str, field: str, expected: object
) -> None:
    monkeypatch.setenv(variable, value)
    assert getattr(load_settings(), field) == expected


SECRET_VALUE = "s3cret-value-of-at-least-32-bytes"


def test_the_jwt_secret_is_read_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFIER_JWT_SECRET", SECRET_VALUE)
    assert load_settings().secret == SECRET_VALUE


def test_the_secret_does_not_show_in_the_settings_repr(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFIER_JWT_SECRET", SECRET_VALUE)
    assert SECRET_VALUE not in repr(load_settings())


@pytest.mark.parametrize("secret", ["x" * 32, "é" * 16, "🔑" * 8])
def test_a_secret_of_32_bytes_is_enough(monkeypatch: pytest.MonkeyPatch, secret: str) -> None:
    monkeypatch.setenv("NOTIFIER_JWT_SECRET", secret)
    assert load_settings().secret == secret


@pytest.mark.parametrize("secret", ["x" * 31, "é" * 15, "short"])
def test_a_secret_under_32_bytes_is_refused_without_showing_it(
    monkeypatch: pytest.MonkeyPatch, secret: str
) -> None:
    monkeypatch.setenv("NOTIFIER_JWT_SECRET", secret)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert message.startswith("NOTIFIER_JWT_SECRET:") and "32 bytes" in message
    assert secret not in message and "\n" not in message


@pytest.mark.parametrize(
    "url", ["redis://:hunter2-secret@127.0.0.1:6379/x", "redis+sentinel://user:hunter2-secret@h:1,h:2"]
)
def test_a_bad_broker_url_is_named_without_its_password(monkeypatch: pytest.MonkeyPatch, url: str) -> None:
    monkeypatch.setenv("NOTIFIER_BROKER_URL", url)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert message.startswith("NOTIFIER_BROKER_URL:") and "***@" in message, message
    assert "hunter2" not in message and "\n" not in message


def test_variables_without_the_prefix_are_ignored(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PORT", "9999")
    monkeypatch.setenv("BROKER_URL", "redis://elsewhere:6379/0")
    settings = load_settings()
    assert settings.port == 8000
    assert settings.broker_url == "memory://"


def test_a_dotenv_file_in_the_working_directory_is_honoured(clean_environment: Path) -> None:
    dotenv_secret = SECRET_VALUE + "-from-dotenv"
    (clean_environment / ".env").write_text(f"NOTIFIER_PORT=9001\nNOTIFIER_JWT_SECRET={dotenv_secret}\n")
    settings = load_settings()
    assert settings.port == 9001
    assert settings.secret == dotenv_secret


def test_the_environment_wins_over_dotenv(monkeypatch: pytest.MonkeyPatch, clean_environment: Path) -> None:
    (clean_environment / ".env").write_text("NOTIFIER_PORT=9001\n")
    monkeypatch.setenv("NOTIFIER_PORT", "9002")
    assert load_settings().port == 9002


def test_command_line_overrides_win_over_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFIER_PORT", "9002")
    monkeypatch.setenv("NOTIFIER_HOST", "0.0.0.0")
    settings = load_settings(host="127.0.0.2", port=9100)
    assert (settings.host, settings.port) == ("127.0.0.2", 9100)


def test_an_absent_override_leaves_the_environment_value(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFIER_PORT", "9002")
    assert load_settings(host=None, port=None).port == 9002


BAD_VALUES = [
    ("NOTIFIER_PORT", "not-a-port"),
    ("NOTIFIER_PORT", "70000"),
    ("NOTIFIER_PORT", "-1"),
    ("NOTIFIER_PORT", "80\n81"),
    ("NOTIFIER_BROKER_URL", "http://cache:6379"),
    ("NOTIFIER_BROKER_URL", "cache:6379"),
    ("NOTIFIER_MAX_CONNECTIONS", "0"),
    ("NOTIFIER_MAX_CONNECTIONS", "many"),
    ("NOTIFIER_MAX_MESSAGE_BYTES", "lots"),
    ("NOTIFIER_MAX_MESSAGE_BYTES", "0"),
    ("NOTIFIER_HISTORY_SIZE", "-1"),
    ("NOTIFIER_SEND_QUEUE_BYTES", "0"),
    ("NOTIFIER_SHUTDOWN_TIMEOUT", "0"),
    ("NOTIFIER_SHUTDOWN_TIMEOUT", "soon"),
    ("NOTIFIER_JWT_SECRET", ""),
    ("NOTIFIER_JWT_SECRET", "x" * 31),
    ("NOTIFIER_MAX_CONNECTIONS_PER_USER", "0"),
    ("NOTIFIER_MAX_CONNECTIONS_PER_USER", "some"),
    ("NOTIFIER_MAX_TOPICS_PER_CONNECTION", "1"),
    ("NOTIFIER_MAX_TOPICS_PER_CONNECTION", "0"),
]


@pytest.mark.parametrize(("variable", "value"), BAD_VALUES)
def test_a_bad_value_is_a_config_error_of_one_line_naming_the_variable(
    monkeypatch: pytest.MonkeyPatch, variable: str, value: str
) -> None:
    monkeypatch.setenv(variable, value)
    with pytest.raises(ConfigError) as info:
        load_settings()
    message = str(info.value)
    assert variable in message
    assert "\n" not in message and message.strip() == message and message


def test_with_several_bad_variables_one_of_them_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("NOTIFIER_PORT", "x")
    monkeypatch.setenv("NOTIFIER_MAX_CONNECTIONS", "y")
    with pytest.raises(ConfigError) as info:
        load_settings()
    assert "NOTIFIER_PORT" in str(info.value) or "NOTIFIER_MAX_CONNECTIONS" in str(info.value)


def test_a_bad_override_names_the_variable_too() -> None:
    with pytest.raises(ConfigError, match="NOTIFIER_PORT"):
        load_settings(port=123456)


# -- `notifier serve` with bad configuration ---------------------------------------------------


def _serve(env: dict[str, str], tmp_path: Path, *args: str) -> subprocess.CompletedProcess[str]:
    base = {k: v for k, v in os.environ.items() if not k.upper().startswith("NOTIFIER_")}
    base["PYTHONPATH"] = os.pathsep.join(filter(None, [str(ROOT), base.get("PYTHONPATH")]))
    # A free port, so that a configuration wrongly taken as good serves harmlessly until the timeout.
    secret = "serve-test-secret-0123456789abcdef"  # 34 bytes: long enough
    defaults = {"NOTIFIER_JWT_SECRET": secret, "NOTIFIER_PORT": str(free_port())}
    return subprocess.run(
        [sys.executable, "-m", "notifier", "serve", *args],
        env={**base, **defaults, **env},
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=20,
    )


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("NOTIFIER_PORT", "not-a-port"),
        ("NOTIFIER_PORT", "70000"),
        ("NOTIFIER_BROKER_URL", "http://cache:6379"),
        ("NOTIFIER_BROKER_URL", "redis://localhost:notaport/0"),
        ("NOTIFIER_MAX_CONNECTIONS", "0"),
        ("NOTIFIER_JWT_SECRET", "a-31-byte-secret-0123456789abcd"),
        ("NOTIFIER_MAX_CONNECTIONS_PER_USER", "0"),
        ("NOTIFIER_MAX_TOPICS_PER_CONNECTION", "1"),
    ],
)
def test_serve_with_bad_configuration_exits_with_one_line_and_no_traceback(
    tmp_path: Path, variable: str, value: str
) -> None:
    result = _serve({variable: value}, tmp_path)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert variable in lines[0]


def test_serve_with_a_bad_port_flag_exits_with_one_line_and_no_traceback(tmp_path: Path) -> None:
    result = _serve({}, tmp_path, "--port", "99999")
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr
    assert "port" in lines[0].lower()
