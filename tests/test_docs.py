"""The documentation in the repository covers the interface the code has, and `/docs` works offline.

- every setting, metric, close code and error code the code defines is in its page of ``docs/``;
- the README and ``docs/*.md`` link only inside the repository, and every link resolves;
- ``/docs`` loads Swagger UI from the instance itself, never from a CDN;
- the OpenAPI schema has user-facing descriptions and a typed ``limit``.

Plus, when Debian's Chromium and playwright are present, a headless browser that may reach only
127.0.0.1 opens ``/docs`` of a real instance and sees the operations listed.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlsplit

import httpx
import pytest
from conftest import SECRET, Mint, make_settings
from fastapi.testclient import TestClient
from prometheus_client.metrics_core import Metric

from notifier.app import create_app
from notifier.errors import CloseCode, ErrorCode
from notifier.metrics import Metrics
from notifier.settings import ClientSettings, Settings

ROOT = Path(__file__).resolve().parent.parent
DOCS = ROOT / "docs"
CONFIGURATION = DOCS / "configuration.md"
METRICS = DOCS / "metrics.md"
WEBSOCKET = DOCS / "websocket.md"
API = DOCS / "api.md"

# [text](target) and ![alt](target); a target may carry a "title" after a space.
LINK = re.compile(r"!?\[(?:[^\[\]]|\[[^\]]*\])*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
HEADING = re.compile(r"^(#{1,6})\s+(.*?)\s*#*\s*$")
FENCE = re.compile(r"^\s*(```|~~~)")


def markdown_pages() -> list[Path]:
    return [ROOT / "README.md", *sorted(DOCS.glob("*.md"))]


def prose(path: Path) -> list[str]:
    """The lines of a Markdown file outside fenced code blocks."""
    lines, fenced = [], False
    for line in path.read_text().splitlines():
        if FENCE.match(line):
            fenced = not fenced
            continue
        if not fenced:
            lines.append(line)
    return lines


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"!?\[([^\]]*)\]\([^)]*\)", r"\1", heading)  # a link keeps its text
    text = text.replace("`", "").strip().lower()
    text = re.sub(r"[^\w\- ]", "", text)
    return text.replace(" ", "-")


def anchors(path: Path) -> set[str]:
    found: set[str] = set()
    counts: dict[str, int] = {}
    for line in prose(path):
        match = HEADING.match(line)
        if match:
            base = slug(match.group(2))
            n = counts.get(base, 0)
            counts[base] = n + 1
            found.add(base if n == 0 else f"{base}-{n}")
    return found


def links(path: Path) -> list[str]:
    targets = []
    for line in prose(path):
        line = re.sub(r"`[^`]*`", "", line)  # code spans are not links
        targets += LINK.findall(line)
    return targets


def table_rows(path: Path, name: str) -> list[str]:
    """The table rows of ``path`` whose first cell names ``name`` (in backticks)."""
    return [line for line in prose(path) if line.startswith("|") and f"`{name}`" in line.split("|")[1]]


# -- what the code defines is documented ---------------------------------------------------------


def test_every_setting_of_an_instance_and_of_the_cli_is_in_the_configuration_page() -> None:
    text = CONFIGURATION.read_text()
    variables = [f"NOTIFIER_{name.upper()}" for name in Settings.model_fields]
    variables += [f"NOTIFIER_{name.upper()}" for name in ClientSettings.model_fields]
    missing = [v for v in variables if not table_rows(CONFIGURATION, v)]
    assert not missing, f"not in a table row of {CONFIGURATION.name}: {missing}"
    for variable in variables:
        assert f"`{variable}`" in text


def test_a_variable_is_marked_planned_exactly_when_the_code_does_not_define_it() -> None:
    defined = {f"NOTIFIER_{name.upper()}" for name in (*Settings.model_fields, *ClientSettings.model_fields)}
    documented = {
        match
        for line in prose(CONFIGURATION)
        if line.startswith("|")
        for match in re.findall(r"`(NOTIFIER_[A-Z_]+)`", line.split("|")[1])
    }
    assert defined <= documented
    for variable in sorted(documented):
        planned = any("**planned**" in row for row in table_rows(CONFIGURATION, variable))
        if variable in defined:
            assert not planned, f"{variable} is defined by the code now: drop 'planned' from its row"
        else:
            assert planned, f"{variable} is not a setting of the code: mark its row **planned**"


def exposed_names(family: Metric) -> list[str]:
    """How a metric family shows in /metrics: counters with ``_total``."""
    return [family.name + "_total"] if family.type == "counter" else [family.name]


def test_every_metric_an_instance_registers_is_in_the_metrics_page() -> None:
    text = METRICS.read_text()
    families = list(Metrics().registry.collect())
    assert len(families) >= 8
    for family in families:
        for name in exposed_names(family):
            rows = table_rows(METRICS, name)
            assert rows, f"{name} ({family.type}) has no row in {METRICS.name}"
            assert family.type in rows[0], f"{name}: its row does not say it is a {family.type}"
            for sample in family.samples:
                for label in sample.labels:
                    if label not in ("le",):
                        assert f"`{label}`" in rows[0], f"{name}: label {label} not documented"
    assert "notifier_notifications_dropped_total" in text and "slow_consumer" in text


def test_every_close_code_and_error_code_is_in_the_websocket_page() -> None:
    rows = [line for line in prose(WEBSOCKET) if line.startswith("|")]
    cells = {line.split("|")[1].strip() for line in rows}
    for code in CloseCode:
        assert str(int(code)) in cells, f"close code {int(code)} ({code.name}) has no row"
    for name, value in vars(ErrorCode).items():
        if name.isupper():
            assert f"`{value}`" in cells, f"error code {value} has no row"


def test_every_frame_type_and_route_is_documented() -> None:
    websocket = WEBSOCKET.read_text()
    for kind in ("hello", "notification", "subscribed", "unsubscribed", "published", "pong", "refreshed",
                 "error", "subscribe", "unsubscribe", "publish", "ping", "refresh",
                 "join", "leave"):  # fmt: skip
        assert f'"type": "{kind}"' in websocket, kind
    api = API.read_text()
    for route in create_app(make_settings()).routes:
        path = getattr(route, "path", "")
        if path in ("/openapi.json", "/static", "/v1/ws") or path.startswith("/static"):
            continue
        for method in sorted(getattr(route, "methods", None) or {"GET"}):
            if method == "HEAD":
                continue
            assert f"`{method} {path}`" in api or f"{method} {path}" in api, f"{method} {path}"


# -- the docs stay inside the repository -----------------------------------------------------------


@pytest.mark.parametrize("page", markdown_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_no_page_names_a_path_outside_the_repository(page: Path) -> None:
    text = page.read_text()
    for outside in ("../shared", "/work/", "CONTRACT.md"):
        assert outside not in text, f"{page.name} mentions {outside}"


@pytest.mark.parametrize("page", markdown_pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_resolves_inside_the_repository(page: Path) -> None:
    for target in links(page):
        parts = urlsplit(target)
        if parts.scheme or target.startswith("//"):
            assert parts.scheme in ("http", "https", "mailto"), f"{page.name}: odd link {target}"
            continue
        assert not target.startswith("/"), f"{page.name}: absolute path {target}"
        file = (page.parent / unquote(parts.path)).resolve() if parts.path else page
        assert file.is_relative_to(ROOT), f"{page.name}: {target} leaves the repository"
        assert file.exists(), f"{page.name}: {target} does not exist"
        if parts.fragment and file.suffix == ".md":
            assert parts.fragment in anchors(file), (
                f"{page.name}: no heading #{parts.fragment} in {file.name}"
            )


def test_the_readme_points_to_the_interface_docs() -> None:
    readme = links(ROOT / "README.md")
    for page in ("api.md", "websocket.md", "configuration.md", "metrics.md", "operations.md"):
        assert f"docs/{page}" in readme, page


# -- /docs offline ---------------------------------------------------------------------------------


class Assets(HTMLParser):
    """Every URL a page loads by itself: scripts, stylesheets, icons, images."""

    def __init__(self) -> None:
        super().__init__()
        self.urls: list[str] = []

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        values = dict(attrs)
        for name in ("src", "href"):
            value = values.get(name)
            if value is not None and (tag != "a"):
                self.urls.append(value)


def test_docs_loads_swagger_ui_from_the_instance_itself(client: TestClient) -> None:
    page = client.get("/docs")
    assert page.status_code == 200
    assert page.headers["content-type"].startswith("text/html")
    assert "http://" not in page.text and "https://" not in page.text
    parser = Assets()
    parser.feed(page.text)
    kinds = {url.rsplit(".", 1)[-1] for url in parser.urls}
    assert {"js", "css"} <= kinds, parser.urls
    for url in parser.urls:
        assert url.startswith("/") and not url.startswith("//"), url
        asset = client.get(url)
        assert asset.status_code == 200, url
        assert len(asset.content) > 100, url
    assert "url: '/openapi.json'" in page.text
    assert client.get("/openapi.json").status_code == 200


def test_redoc_is_not_served_from_a_cdn_either(client: TestClient) -> None:
    answer = client.get("/redoc")
    assert answer.status_code == 404 or "cdn." not in answer.text


def test_the_bundled_swagger_ui_comes_with_its_license() -> None:
    bundled = ROOT / "notifier" / "static" / "swagger"
    for name in ("swagger-ui-bundle.js", "swagger-ui.css", "favicon-32x32.png", "LICENSE", "NOTICE"):
        assert (bundled / name).is_file(), name
    assert "Apache License" in (bundled / "LICENSE").read_text()


# -- the OpenAPI schema ----------------------------------------------------------------------------


def walk(node: Any) -> Iterator[tuple[str, Any]]:
    if isinstance(node, dict):
        for key, value in node.items():
            yield key, value
            yield from walk(value)
    elif isinstance(node, list):
        for item in node:
            yield from walk(item)


@pytest.fixture
def schema(client: TestClient) -> dict[str, Any]:
    answer = client.get("/openapi.json")
    assert answer.status_code == 200
    spec: dict[str, Any] = answer.json()
    return spec


def test_no_description_leaks_an_internal_docstring(schema: dict[str, Any]) -> None:
    texts = [
        value for key, value in walk(schema) if key in ("description", "summary") and isinstance(value, str)
    ]
    assert texts
    for text in texts:
        for internal in ("NotifierApp", "Declares the route", "publish_endpoint", "``"):
            assert internal not in text, text


def test_every_operation_has_a_summary_a_description_and_its_error_answers(schema: dict[str, Any]) -> None:
    for path, operations in schema["paths"].items():
        for method, operation in operations.items():
            assert operation.get("summary"), (method, path)
            assert operation.get("description"), (method, path)
            assert "200" in operation["responses"] or "202" in operation["responses"], (method, path)
    publish = schema["paths"]["/v1/notifications"]["post"]
    assert {"202", "401", "403", "413", "422", "503"} <= set(publish["responses"])
    body = publish["requestBody"]["content"]["application/json"]
    assert all(
        "topic" in example["value"] and "data" in example["value"] for example in body["examples"].values()
    )
    accepted = publish["responses"]["202"]["content"]["application/json"]["schema"]
    assert accepted["$ref"].endswith("/PublishAnswer")


def test_limit_is_an_integer_and_since_a_non_negative_id(schema: dict[str, Any]) -> None:
    operation = schema["paths"]["/v1/topics/{topic}/notifications"]["get"]
    parameters = {p["name"]: p for p in operation["parameters"]}
    assert set(parameters) == {"topic", "since", "limit"}
    limit = parameters["limit"]["schema"]
    assert limit["type"] == "integer"
    assert (limit["minimum"], limit["maximum"], limit["default"]) == (1, 1000, 100)
    since = parameters["since"]["schema"]
    assert {"type": "integer", "minimum": 0} in since["anyOf"]
    assert all(s.get("type") != "string" or s.get("pattern") == "^[0-9]{1,20}$" for s in since["anyOf"])
    assert not parameters["since"]["required"] and not parameters["limit"]["required"]
    # The answers of the route are those the schema promises: 422 with a one-line detail.
    assert "HTTPValidationError" not in str(schema.get("components", {}))
    errors = operation["responses"]["422"]["content"]["application/json"]["schema"]
    assert errors["$ref"].endswith("/ErrorAnswer")


@pytest.mark.parametrize("query", ["limit=x", "limit=0", "limit=1.5", "since=-1", "since=abc", "since="])
def test_a_malformed_since_or_limit_is_still_422_with_one_detail_line(
    client: TestClient, mint: Mint, query: str
) -> None:
    answer = client.get(
        f"/v1/topics/news/notifications?{query}", headers={"authorization": f"Bearer {mint()}"}
    )
    assert answer.status_code == 422
    assert isinstance(answer.json()["detail"], str)


def test_integer_since_and_limit_as_the_schema_describes_them_are_answered(
    client: TestClient, mint: Mint
) -> None:
    token = mint()
    headers = {"authorization": f"Bearer {token}"}
    ids = []
    for n in range(3):
        posted = client.post("/v1/notifications", json={"topic": "news", "data": n}, headers=headers)
        assert posted.status_code == 202
        ids.append(posted.json()["id"])
    answer = client.get("/v1/topics/news/notifications", params={"since": 0, "limit": 2}, headers=headers)
    assert answer.status_code == 200
    assert [n["id"] for n in answer.json()["notifications"]] == ids[:2]
    assert answer.json()["more"] is False


# -- a real browser with no network but 127.0.0.1 ------------------------------------------------


CHROMIUM = "/usr/bin/chromium"


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is missing (apt-get install chromium)")
def test_a_browser_without_internet_access_sees_the_operations_on_docs() -> None:
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is not installed")
    from support import Instance

    instance = Instance({"NOTIFIER_JWT_SECRET": SECRET, "NOTIFIER_SHUTDOWN_TIMEOUT": "2"})
    blocked: list[str] = []
    errors: list[str] = []

    def only_loopback(route: Any) -> None:
        url = route.request.url
        if urlsplit(url).hostname == "127.0.0.1":
            route.continue_()
        else:
            blocked.append(url)
            route.abort()

    try:
        instance.start()
        spec = httpx.get(instance.url + "/openapi.json", timeout=5).json()
        count = sum(len(operations) for operations in spec["paths"].values())
        with sync_api.sync_playwright() as playwright:
            browser = playwright.chromium.launch(
                executable_path=CHROMIUM,
                args=["--headless", "--no-sandbox", "--disable-gpu", "--no-first-run"],
            )
            try:
                context = browser.new_context()
                context.set_default_timeout(15_000)
                context.route("**/*", only_loopback)
                page = context.new_page()
                page.on("pageerror", lambda error: errors.append(str(error)))
                page.goto(instance.url + "/docs")
                operations = page.locator(".opblock")
                sync_api.expect(operations).to_have_count(count)
                for path in ("/v1/notifications", "/v1/topics/{topic}/notifications", "/readyz"):
                    sync_api.expect(
                        page.locator(".opblock-summary-path", has_text=path).first
                    ).to_be_visible()
                sync_api.expect(page.locator(".btn.authorize")).to_be_visible()
            finally:
                browser.close()
    finally:
        instance.stop()
        os.unlink(instance.log.name)
    assert blocked == [], f"/docs tried to reach beyond the instance: {blocked}"
    assert errors == [], errors
