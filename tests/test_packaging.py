"""What a new user runs first: the README's two command lines, the package and its command."""

from __future__ import annotations

import shutil
import subprocess
import tomllib
from importlib.metadata import PackageNotFoundError, requires

import jwt
import pytest
from conftest import make_settings
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from support import ROOT

from notifier.cli import _dev_secret

RUN_LINE = "pip install . && notifier serve"
TEST_LINE = "bash scripts/test"


def readme_commands() -> list[str]:
    """The indented command lines of the README before its first section."""
    head = (ROOT / "README.md").read_text().split("\n## ", 1)[0]
    return [line.strip() for line in head.splitlines() if line.startswith("    ") and line.strip()]


def test_the_readme_opens_with_the_run_line_and_the_test_line() -> None:
    assert readme_commands() == [RUN_LINE, TEST_LINE]


def test_ci_runs_the_readmes_test_line() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert "exec bash scripts/test" in ci


def test_the_package_needs_python_3_11_and_installs_the_notifier_command() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["requires-python"] == ">=3.11"
    assert project["scripts"] == {"notifier": "notifier.cli:main"}


@pytest.mark.skipif(shutil.which("notifier") is None, reason="the package is not installed")
def test_the_installed_notifier_command_runs() -> None:
    done = subprocess.run(["notifier", "--help"], capture_output=True, text=True, timeout=30)
    assert done.returncode == 0
    for command in ("serve", "token", "publish", "subscribe"):
        assert command in done.stdout


def pins() -> dict[str, str]:
    """constraints.txt as {canonical name: exact version}."""
    found: dict[str, str] = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            name, sep, version = line.partition("==")
            assert sep and version, f"constraints.txt: not an exact pin: {line!r}"
            found[canonicalize_name(name)] = version
    return found


def named_requirements() -> list[Requirement]:
    """Every requirement pyproject.toml names: dependencies, every extra, and what their own
    extras (``uvicorn[standard]``, ``PyJWT[crypto]``...) add, as far as it is installed here."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    named = [Requirement(r) for r in project["dependencies"]]
    named += [Requirement(r) for extra in project["optional-dependencies"].values() for r in extra]
    for requirement in [r for r in named if r.extras]:
        try:
            declared = requires(requirement.name) or []
        except PackageNotFoundError:
            continue
        for added in map(Requirement, declared):
            if added.marker and any(added.marker.evaluate({"extra": x}) for x in requirement.extras):
                named.append(Requirement(added.name))
    return named


def test_every_dependency_and_test_extra_is_pinned_in_constraints_txt_within_its_bounds() -> None:
    pinned = pins()
    for requirement in named_requirements():
        name = canonicalize_name(requirement.name)
        assert name in pinned, f"{requirement} is not pinned in constraints.txt"
        assert requirement.specifier.contains(pinned[name], prereleases=True), (
            f"constraints.txt pins {name}=={pinned[name]}, outside pyproject.toml's {requirement}"
        )


def test_scripts_test_installs_with_the_constraints() -> None:
    script = (ROOT / "scripts" / "test").read_text()
    assert "-c constraints.txt -e '.[test]'" in script


def test_the_dev_url_names_127_0_0_1_when_listening_on_all_interfaces(
    capsys: pytest.CaptureFixture[str],
) -> None:
    settings = _dev_secret(make_settings(jwt_secret=None, host="0.0.0.0", port=8123))
    out = capsys.readouterr()
    token = out.out.split("#token=", 1)[1].strip()
    assert f"http://127.0.0.1:8123/#token={token}" in out.out
    assert "NOTIFIER_JWT_SECRET" in out.err  # the warning goes to stderr
    claims = jwt.decode(token, settings.secret, algorithms=["HS256"])
    assert claims["sub"] == "dev" and set(claims["scope"].split()) == {"subscribe", "publish"}
    assert "topics" not in claims
