"""The demo page and the JavaScript client in a real browser: Debian's headless Chromium driven by
Playwright's Python package (no browser download), against real ``notifier serve`` instances.

Needs ``apt-get install chromium`` and ``pip install playwright``; skipped with the reason when
either is missing. Every wait has a deadline (Playwright's ``expect`` and timeouts inside the
page's own promises).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import httpx
import pytest
from conftest import SECRET, mint_token
from support import Instance, RedisServer, stop_all
from test_faults import Nginx

sync_api = pytest.importorskip(
    "playwright.sync_api", reason="playwright is not installed (pip install playwright)"
)

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]
DEADLINE_MS = 15_000

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        not os.path.exists(CHROMIUM), reason=f"{CHROMIUM} is missing (apt-get install chromium)"
    ),
]

expect = sync_api.expect
Page = sync_api.Page
Browser = sync_api.Browser

# Page-side helper: the next `event` of a NotifierClient that satisfies `test`, or a rejection after `ms`.
NEXT_EVENT = """
window.nextEvent = (client, event, test = () => true, ms = 10000) => new Promise((resolve, reject) => {
  const timer = setTimeout(() => reject(new Error(`no ${event} within ${ms} ms`)), ms);
  const handler = (value) => {
    if (!test(value)) return;
    clearTimeout(timer);
    client.off(event, handler);
    resolve(value);
  };
  client.on(event, handler);
});
"""


# -- fixtures ---------------------------------------------------------------------------------


def instance_env(broker_url: str = "memory://") -> dict[str, str]:
    return {
        "NOTIFIER_BROKER_URL": broker_url,
        "NOTIFIER_JWT_SECRET": SECRET,
        "NOTIFIER_SHUTDOWN_TIMEOUT": "2",
    }


def cleanup(instance: Instance) -> None:
    instance.stop()
    instance.log.close()
    os.unlink(instance.log.name)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    playwright = sync_api.sync_playwright().start()
    try:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield chromium
        finally:
            chromium.close()
    finally:
        playwright.stop()


@pytest.fixture(scope="module")
def server() -> Iterator[Instance]:
    instance = Instance(instance_env())
    try:
        yield instance.start()
    finally:
        cleanup(instance)


class Pages:
    """New pages, each in its own browser context; uncaught errors in any page fail the test."""

    def __init__(self, browser: Any) -> None:
        self.browser = browser
        self.contexts: list[Any] = []
        self.errors: list[str] = []

    def open(self, url: str | None = None, width: int = 1000, height: int = 760) -> Any:
        context = self.browser.new_context(viewport={"width": width, "height": height})
        context.set_default_timeout(DEADLINE_MS)
        self.contexts.append(context)
        page = context.new_page()
        page.on("pageerror", lambda error: self.errors.append(str(error)))
        page.add_init_script(NEXT_EVENT)
        if url is not None:
            page.goto(url)
        return page

    def close(self) -> None:
        for context in self.contexts:
            context.close()


@pytest.fixture
def pages(browser: Any) -> Iterator[Pages]:
    opened = Pages(browser)
    try:
        yield opened
        assert opened.errors == [], f"uncaught errors in the page: {opened.errors}"
    finally:
        opened.close()


def post(url: str, topic: str, data: Any, sub: str = "backend") -> dict[str, Any]:
    token = mint_token(sub, ("publish",))
    response = httpx.post(
        url + "/v1/notifications",
        json={"topic": topic, "data": data},
        headers={"authorization": f"Bearer {token}"},
        timeout=10,
    )
    assert response.status_code == 202, response.text
    answer: dict[str, Any] = response.json()
    return answer


def demo(url: str, sub: str, topics: str = "") -> str:
    fragment = f"#token={mint_token(sub)}" + (f"&topics={topics}" if topics else "")
    return f"{url}/{fragment}"


def connected(page: Any) -> None:
    expect(page.locator("#state")).to_have_text("connected", timeout=DEADLINE_MS)


def feed_ids(page: Any) -> list[str]:
    ids: list[str] = page.locator("#feed .note[data-id]").evaluate_all(
        "(notes) => notes.map((n) => n.dataset.id)"
    )
    return ids


# -- the demo page ----------------------------------------------------------------------------


def test_demo_page_shows_a_posted_notification(server: Instance, pages: Pages) -> None:
    page = pages.open(demo(server.url, "alice"))
    connected(page)
    expect(page.locator("#who")).to_have_text("as alice")
    answer = post(server.url, "user:alice", {"text": "hello from the backend"})
    note = page.locator(f'#feed .note[data-id="{answer["id"]}"]')
    expect(note).to_be_visible(timeout=DEADLINE_MS)
    expect(note.locator(".body")).to_have_text("hello from the backend")
    expect(note.locator(".topic")).to_have_text("user:alice")


def test_markup_in_a_payload_shows_as_text_and_never_runs(server: Instance, pages: Pages) -> None:
    page = pages.open(demo(server.url, "alice"))
    connected(page)
    payloads = [
        "<img src=x onerror=window.__pwned=1>",
        {"text": "<script>window.__pwned=2</script><b>bold?</b>", "from": "<i>mallory</i>"},
        {"<svg onload=window.__pwned=3>": "<a href=javascript:window.__pwned=4>x</a>"},
    ]
    answers = [post(server.url, "user:alice", data) for data in payloads]
    expect(page.get_by_text("<img src=x onerror=window.__pwned=1>", exact=True)).to_be_visible()
    expect(page.get_by_text("<script>window.__pwned=2</script><b>bold?</b>", exact=True)).to_be_visible()
    expect(page.get_by_text("<i>mallory</i>", exact=True)).to_be_visible()
    expect(page.locator(f'#feed .note[data-id="{answers[2]["id"]}"] pre')).to_contain_text("<svg onload=")
    assert page.locator("#feed img, #feed script, #feed b, #feed i, #feed svg, #feed a").count() == 0
    assert page.evaluate("window.__pwned") is None


def test_two_pages_chat_through_the_publish_form(server: Instance, pages: Pages) -> None:
    alice = pages.open(demo(server.url, "alice"))
    bob = pages.open(demo(server.url, "bob"), width=390, height=844)  # a phone
    for page in (alice, bob):
        connected(page)
        page.fill("#join-topic", "room:lobby")
        page.click("#join-form button")
        expect(page.locator("#topics .chip", has_text="room:lobby")).to_be_visible()

    alice.fill("#publish-topic", "room:lobby")
    alice.fill("#publish-text", "hi bob <3")
    alice.press("#publish-text", "Enter")
    for page in (alice, bob):
        note = page.locator("#feed .note", has_text="hi bob <3")
        expect(note).to_be_visible()
        expect(note.locator(".from")).to_have_text("alice")
    expect(alice.locator("#feed .note.mine", has_text="hi bob <3")).to_be_visible()
    expect(alice.locator("#publish-text")).to_have_value("")

    # Leaving a topic: nothing more from it.
    bob.locator("#topics .chip", has_text="room:lobby").get_by_role("button").click()
    expect(bob.locator("#topics .chip", has_text="room:lobby")).to_have_count(0)
    post(server.url, "room:lobby", {"text": "after bob left"})
    expect(alice.get_by_text("after bob left")).to_be_visible()
    page_width = bob.evaluate("document.documentElement.scrollWidth")
    assert page_width <= 390, "no horizontal scrolling on a phone"
    assert bob.get_by_text("after bob left").count() == 0


@pytest.mark.redis
def test_demo_page_survives_an_instance_restart_and_shows_what_was_published_meanwhile(
    pages: Pages, redis_server: RedisServer
) -> None:
    first, other = Instance(instance_env(redis_server.url)), Instance(instance_env(redis_server.url))
    try:
        first.start()
        other.start()
        page = pages.open(demo(first.url, "carol", topics="room:restart"))
        connected(page)
        before = post(other.url, "room:restart", {"text": "before the restart"})
        expect(page.get_by_text("before the restart")).to_be_visible()

        first.stop()  # SIGTERM: the page is closed with 1001 and starts reconnecting
        expect(page.locator("#state")).not_to_have_text("connected")
        away = [post(other.url, "room:restart", {"text": f"while away {n}"}) for n in range(3)]
        first.start()  # the same port

        # The page retries with backoff (doubling from 0.5 s): allow for a late attempt.
        expect(page.locator("#state")).to_have_text("connected", timeout=2 * DEADLINE_MS)
        for n in range(3):
            expect(page.get_by_text(f"while away {n}", exact=True)).to_be_visible()
        after = post(first.url, "room:restart", {"text": "after the restart"})
        expect(page.get_by_text("after the restart")).to_be_visible()
        expect(page.get_by_text("Reconnected: caught up on everything missed.")).to_be_visible()
        ids = [before["id"], *(a["id"] for a in away), after["id"]]
        assert feed_ids(page) == ids, "each exactly once, in order"
    finally:
        cleanup(first)
        cleanup(other)


def test_demo_page_without_a_token_asks_for_one(server: Instance, pages: Pages) -> None:
    page = pages.open(server.url + "/")
    expect(page.locator("#connection")).to_have_attribute("open", "")
    expect(page.locator("#state")).to_have_text("disconnected")
    page.fill("#token", mint_token("dora"))
    page.click("#connect-form button[type=submit]")
    connected(page)
    assert "#token=" in page.url, "a reload keeps the token"


# -- the JavaScript client --------------------------------------------------------------------


def test_js_client_requests_settle_by_ref_and_error_frames_reject_with_their_code(
    server: Instance, pages: Pages
) -> None:
    page = pages.open(server.url + "/")  # the demo without a token: NotifierClient, nothing connected
    result = page.evaluate(
        """async (token) => {
            const client = new NotifierClient({ token, url: location.origin, pingInterval: 0 });
            const hello = nextEvent(client, "hello");
            client.connect();
            await hello;
            const outcome = async (promise) => promise.then(
                (reply) => ({ ok: reply }), (err) => ({ code: err.code, message: err.message }));
            const live = nextEvent(client, "notification", (n) => n.topic === "js:ref");
            const subscribed = await outcome(client.subscribe(["js:ref"]));
            const published = await outcome(client.publish("js:ref", { n: 1 }));
            const notification = await live;
            const forbidden = await outcome(client.subscribe(["user:somebody-else"]));
            const bad = await outcome(client.publish("not a topic", 1));
            const topics = [...client.topics];
            client.close();
            const closed = await outcome(client.publish("js:ref", 2));
            return { subscribed, published, notification, forbidden, bad, closed, topics,
                     lastId: client.lastId, state: client.state };
        }""",
        mint_token("erin"),
    )
    assert result["subscribed"]["ok"]["type"] == "subscribed"
    assert result["subscribed"]["ok"]["topics"] == ["js:ref"]
    published = result["published"]["ok"]
    assert published["type"] == "published" and published["topic"] == "js:ref" and published["id"].isdigit()
    assert result["notification"]["id"] == published["id"] and result["notification"]["data"] == {"n": 1}
    assert result["lastId"] == published["id"]
    assert result["forbidden"]["code"] == "forbidden"
    assert result["bad"]["code"] == "bad_request"
    assert result["closed"]["code"] == "closed"
    assert result["topics"] == ["js:ref"], "a refused topic is not kept"
    assert result["state"] == "disconnected"


def test_js_client_with_a_refused_token_stops_with_an_unauthorized_error(
    server: Instance, pages: Pages
) -> None:
    page = pages.open(server.url + "/")  # the demo without a token: NotifierClient, nothing connected
    result = page.evaluate(
        """async (token) => {
            const client = new NotifierClient({ token, url: location.origin });
            const states = [];
            client.on("state", (s) => states.push(s));
            const error = nextEvent(client, "error");
            client.connect();
            const err = await error;
            return { code: err.code, fatal: err.fatal, states, stopped: client.stopped,
                     timers: Object.keys(client.timers) };
        }""",
        mint_token("erin", secret="not-the-secret-0123456789abcdef0123"),
    )
    assert result == {
        "code": "unauthorized",
        "fatal": True,
        "states": ["connecting", "disconnected"],
        "stopped": True,
        "timers": [],  # no reconnect pending
    }


def test_js_client_refreshes_its_token_through_get_token_before_exp(server: Instance, pages: Pages) -> None:
    page = pages.open(server.url + "/")  # the demo without a token: NotifierClient, nothing connected
    page.expose_function("mintToken", lambda: mint_token("erin", ttl=3600))
    result = page.evaluate(
        """async (token) => {
            const exp = NotifierClient.jwtClaims(token).exp * 1000;
            let calls = 0;
            const client = new NotifierClient({
                token, url: location.origin, getToken: async () => { calls++; return await mintToken(); } });
            const hello = nextEvent(client, "hello");
            client.connect();
            const session = (await hello).session;
            // Outlive the first token's exp: without a refresh the server closes with 1008.
            await new Promise((resolve) => setTimeout(resolve, Math.max(0, exp - Date.now()) + 1000));
            const reply = await client.publish("js:refresh", "still here");
            const same = client.session === session && client.state === "connected";
            client.close();
            return { calls, same, published: reply.type };
        }""",
        mint_token("erin", ttl=3),
    )
    assert result == {"calls": 1, "same": True, "published": "published"}


def test_js_client_queues_requests_made_while_connecting_and_sends_them_in_order(
    server: Instance, pages: Pages
) -> None:
    page = pages.open(server.url + "/")
    result = page.evaluate(
        """async (token) => {
            const client = new NotifierClient({ token, url: location.origin });
            const seen = [];
            client.on("notification", (n) => seen.push(n.topic));
            client.connect();  // "connecting": the requests below wait for hello
            const joined = client.subscribe(["js:queued", "js:kept"]);
            const left = client.unsubscribe(["js:queued"]);
            const replies = [(await joined).type, (await left).type];
            const topics = [...client.topics];
            const last = nextEvent(client, "notification", (n) => n.topic === "user:fred");
            await client.publish("js:queued", "not for us any more");
            await client.publish("js:kept", "for us");
            await client.publish("user:fred", "the end");
            await last;
            client.close();
            return { replies, topics, seen };
        }""",
        mint_token("fred"),
    )
    assert result == {
        "replies": ["subscribed", "unsubscribed"],
        "topics": ["js:kept"],
        "seen": ["js:kept", "user:fred"],
    }


# -- presence: who is online ------------------------------------------------------------------


def online(page: Any, topic: str) -> Any:
    """The users of ``topic`` in the demo page's online list."""
    return page.locator(f'#online .online[data-topic="{topic}"] .user')


@pytest.mark.redis
def test_demo_pages_on_two_instances_see_each_other_come_and_go_in_the_online_list(
    pages: Pages, redis_server: RedisServer
) -> None:
    """Behind the repository's nginx.conf (least_conn: alice's socket on one instance, bob's
    stream on the other, as each instance's own count shows)."""
    first, second = Instance(instance_env(redis_server.url)), Instance(instance_env(redis_server.url))
    nginx = Nginx([first, second])
    try:
        first.start()
        second.start()
        nginx.start()
        topic = "room:presence"
        alice = pages.open(demo(nginx.url, "alice", topics=topic))
        connected(alice)
        expect(online(alice, topic)).to_have_text(["alice"])  # herself, from hello.user
        expect(alice.locator(f'#online .online[data-topic="{topic}"] .user.me')).to_have_text("alice")

        # Bob on the other instance, over Server-Sent Events: he reads alice from presence();
        # alice learns of him from a join event only (her query was answered before he came).
        bob = pages.open(demo(nginx.url, "bob", topics=topic) + "&transport=sse")
        connected(bob)
        expect(bob.locator("#who")).to_have_text("as bob · via SSE")
        assert [first.metric("notifier_connections"), second.metric("notifier_connections")] == [1, 1]
        expect(online(bob, topic)).to_have_text(["alice", "bob"])
        expect(online(alice, topic)).to_have_text(["alice", "bob"])

        # Carol joins through the form: a join event for both (bob's over his event stream).
        carol = pages.open(demo(nginx.url, "carol"))
        connected(carol)
        carol.fill("#join-topic", topic)
        carol.click("#join-form button")
        expect(online(carol, topic)).to_have_text(["alice", "bob", "carol"])
        for page in (alice, bob):
            expect(online(page, topic)).to_have_text(["alice", "bob", "carol"])

        carol.close()  # her WebSocket goes: a leave event on both instances
        for page in (alice, bob):
            expect(online(page, topic)).to_have_text(["alice", "bob"])
        bob.close()  # his event stream ends
        expect(online(alice, topic)).to_have_text(["alice"])
        assert alice.locator("#feed .note.system.bad").count() == 0
    finally:
        nginx.stop()
        stop_all([first, second])


# -- Server-Sent Events fallback ----------------------------------------------------------------

# Page-side: a WebSocket that cannot even be constructed (a policy, an extension, a sandbox).
NO_WEBSOCKET = """
window.WebSocket = function WebSocket() {
  throw new DOMException("WebSockets are blocked here", "SecurityError");
};
"""

# Page-side: a WebSocket whose handshakes all fail before `open` (a proxy that drops upgrades).
FAILING_WEBSOCKET = """
window.webSocketsTried = 0;
window.WebSocket = class {
  constructor(url) {
    window.webSocketsTried++;
    this.url = url;
    setTimeout(() => this.onclose && this.onclose({ code: 1006, reason: "" }), 10);
  }
  send() { throw new Error("never open"); }
  close() {}
};
"""


@pytest.mark.redis
def test_demo_page_without_websockets_reads_the_event_stream_and_misses_nothing_across_a_restart(
    pages: Pages, redis_server: RedisServer
) -> None:
    first, other = Instance(instance_env(redis_server.url)), Instance(instance_env(redis_server.url))
    try:
        first.start()
        other.start()
        page = pages.open()
        page.add_init_script(NO_WEBSOCKET)
        streams: list[str] = []
        page.on("request", lambda request: "/v1/sse?" in request.url and streams.append(request.url))
        page.goto(demo(first.url, "dave", topics="room:sse"))
        connected(page)
        expect(page.locator("#who")).to_have_text("as dave · via SSE")
        expect(page.get_by_text("Using Server-Sent Events: new WebSocket() threw")).to_be_visible()
        before = post(other.url, "room:sse", {"text": "before the restart"})
        expect(page.get_by_text("before the restart")).to_be_visible()

        # Publishing from the page goes over POST /v1/notifications.
        page.fill("#publish-topic", "room:sse")
        page.fill("#publish-text", "from the page")
        page.press("#publish-text", "Enter")
        expect(page.locator("#feed .note.mine", has_text="from the page")).to_be_visible()
        mine = feed_ids(page)[-1]

        first.stop()  # the stream ends; the client reconnects by itself, with backoff
        expect(page.locator("#state")).not_to_have_text("connected")
        away = [post(other.url, "room:sse", {"text": f"while away {n}"}) for n in range(3)]
        first.start()
        expect(page.locator("#state")).to_have_text("connected", timeout=2 * DEADLINE_MS)
        for n in range(3):
            expect(page.get_by_text(f"while away {n}", exact=True)).to_be_visible()
        after = post(first.url, "room:sse", {"text": "after the restart"})
        expect(page.get_by_text("after the restart")).to_be_visible()
        expect(page.get_by_text("Reconnected: caught up on everything missed.")).to_be_visible()
        assert feed_ids(page) == [before["id"], mine, *(a["id"] for a in away), after["id"]]

        # Each reconnect carried every topic's own position, not one Last-Event-ID.
        assert len(streams) >= 2, streams
        assert f"room%3Asse%3A{mine}" in streams[-1] and "presence=1" in streams[-1], streams[-1]
    finally:
        stop_all([first, other])


def test_js_client_falls_back_to_sse_after_three_websocket_handshakes_fail_before_open(
    server: Instance, pages: Pages
) -> None:
    page = pages.open()
    page.add_init_script(FAILING_WEBSOCKET)
    page.goto(server.url + "/")
    result = page.evaluate(
        """async (token) => {
            const client = new NotifierClient(
                { token, url: location.origin, minDelay: 50, topics: ["js:fallback"] });
            const reasons = [];
            client.on("transport", (transport, reason) => reasons.push(transport + ": " + reason));
            const hello = nextEvent(client, "hello");
            client.connect();
            const frame = await hello;
            const live = nextEvent(client, "notification", (n) => n.topic === "js:fallback");
            const published = await client.publish("js:fallback", { over: "http" });
            const notification = await live;
            client.close();
            return { reasons, user: frame.user, tried: window.webSocketsTried, transport: client.transport,
                     same: notification.id === published.id, type: published.type };
        }""",
        mint_token("gina"),
    )
    assert result["tried"] == 3 and result["transport"] == "sse", result
    assert result["reasons"] == ["sse: 3 WebSocket handshakes failed while the HTTP API answers"]
    assert result["user"] == "gina" and result["same"] and result["type"] == "published"


def test_js_client_over_sse_subscribes_by_reopening_the_stream_and_publishes_over_http(
    server: Instance, pages: Pages
) -> None:
    page = pages.open(server.url + "/")
    result = page.evaluate(
        """async (token) => {
            const client = new NotifierClient({ token, url: location.origin, transport: "sse" });
            const hello = nextEvent(client, "hello");
            client.connect();
            const first = (await hello).session;
            const outcome = async (promise) => promise.then(
                (reply) => ({ ok: reply }), (err) => ({ code: err.code, message: err.message }));
            const seen = [];
            client.on("notification", (n) => seen.push(n.topic));
            const subscribed = await outcome(client.subscribe(["js:sse"]));
            const session = client.session;
            // The next subscribe reopens the stream: wait for this one first (a topic that has
            // received nothing has no position to resume from, see docs/clients.md).
            const arrived = nextEvent(client, "notification", (n) => n.topic === "js:sse");
            const published = await outcome(client.publish("js:sse", { n: 1 }));
            await arrived;
            const forbidden = await outcome(client.subscribe(["user:somebody-else"]));
            const bad = await outcome(client.subscribe(["not a topic"]));
            const refusedPublish = await outcome(client.publish("not a topic", 1));
            const unsubscribed = await outcome(client.unsubscribe(["js:sse"]));
            await client.publish("js:sse", "not for us any more");
            const last = nextEvent(client, "notification", (n) => n.topic === "user:hana");
            await client.publish("user:hana", "the end");
            await last;
            const topics = [...client.topics];
            client.close();
            return { subscribed, published, forbidden, bad, refusedPublish, unsubscribed, topics, seen,
                     reopened: session !== first, transport: client.transport };
        }""",
        mint_token("hana"),
    )
    assert result["subscribed"] == {"ok": {"type": "subscribed", "topics": ["js:sse"], "ref": 1}}
    assert result["reopened"], "a subscribe on a stream opens a new one"
    assert result["published"]["ok"]["type"] == "published" and result["published"]["ok"]["id"].isdigit()
    assert result["forbidden"]["code"] == "forbidden"
    assert result["bad"]["code"] == "bad_request"
    refused = result["refusedPublish"]
    assert refused["code"] == "bad_request" and "HTTP 422" in refused["message"]
    assert result["unsubscribed"]["ok"]["type"] == "unsubscribed"
    assert result["topics"] == []
    assert result["seen"] == ["js:sse", "user:hana"]
    assert result["transport"] == "sse"


def test_js_client_presence_rejects_with_the_status_and_the_servers_detail(
    server: Instance, pages: Pages
) -> None:
    page = pages.open(server.url + "/")
    result = page.evaluate(
        """async (token) => {
            const client = new NotifierClient({ token, url: location.origin });
            const outcome = async (promise) => promise.then(
                (reply) => ({ ok: reply }),
                (err) => ({ code: err.code, status: err.status, message: err.message }));
            return { broadcast: await outcome(client.presence("broadcast")),
                     other: await outcome(client.presence("user:somebody-else")),
                     empty: await outcome(client.presence("room:nobody")) };
        }""",
        mint_token("ida"),
    )
    assert result["broadcast"]["status"] == 422 and result["broadcast"]["code"] == "bad_request"
    assert result["broadcast"]["message"].startswith("presence of broadcast: HTTP 422: ")
    assert result["other"]["status"] == 403 and result["other"]["code"] == "forbidden"
    assert result["empty"] == {"ok": {"topic": "room:nobody", "count": 0, "users": []}}
