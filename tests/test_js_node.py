"""The JavaScript client on Node, loaded from the file every instance serves, against a real
``notifier serve``.

Node < 22 has no global WebSocket: the client takes one as its ``WebSocket`` option (the ``ws``
package, which ``scripts/test`` installs with ``npm ci --prefix benchmarks``), and without one it
says so at once (``no_websocket``). Skipped when ``node`` is not installed.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import SECRET, mint_token
from support import ROOT, Instance, memory_instance

NODE = shutil.which("node")
CLIENT = ROOT / "notifier" / "static" / "notifier.js"
NODE_MODULES = ROOT / "benchmarks" / "node_modules"
HAS_WS = (NODE_MODULES / "ws" / "package.json").exists()
DEADLINE = 20.0  # seconds a node script may run; each script also stops itself sooner

pytestmark = [pytest.mark.slow, pytest.mark.skipif(NODE is None, reason="node is not installed")]
needs_ws = pytest.mark.skipif(
    not HAS_WS, reason="the ws package is not installed (npm ci --prefix benchmarks)"
)

# Prints each event as one JSON line; exits by itself after 15 s at the latest.
PRELUDE = """
const out = (event) => console.log(JSON.stringify(event));
setTimeout(() => { out({ event: "timeout" }); process.exit(3); }, 15000).unref();
"""

SUBSCRIBE_PUBLISH_RECEIVE = """
const { NotifierClient } = require(process.env.NOTIFIER_JS);
const client = new NotifierClient({
  url: process.env.NOTIFIER_URL,
  token: process.env.NOTIFIER_TOKEN,
  topics: ["news"],
  WebSocket: require("ws"),
});
let received = 0; // the notification and the reply to the publish, in whichever order
const done = () => ++received === 2 && client.close();
client.on("error", (err) => out({ event: "error", code: err.code, message: err.message }));
client.on("notification", (n) => {
  out({ event: "notification", frame: n });
  done();
});
client.on("hello", async (hello) => {
  out({ event: "hello", user: hello.user, topics: hello.topics });
  const joined = await client.subscribe(["room:1"]);
  out({ event: "subscribed", topics: joined.topics });
  const published = await client.publish("room:1", { text: "from node" });
  out({ event: "published", reply: published });
  done();
});
client.connect();
"""

REFUSED_TOKEN = """
const { NotifierClient } = require(process.env.NOTIFIER_JS);
const client = new NotifierClient({
  url: process.env.NOTIFIER_URL,
  token: process.env.NOTIFIER_TOKEN,
  WebSocket: require("ws"),
});
client.on("error", (err) => {
  out({ event: "error", code: err.code, message: err.message, fatal: Boolean(err.fatal) });
  client.close();
});
client.connect();
"""

NO_WEBSOCKET = """
delete globalThis.WebSocket; // Node >= 22 has one built in: this is what Node < 22 looks like
const { NotifierClient, NotifierError } = require(process.env.NOTIFIER_JS);
try {
  new NotifierClient({ url: process.env.NOTIFIER_URL, token: process.env.NOTIFIER_TOKEN });
  out({ event: "constructed" });
} catch (err) {
  out({ event: "thrown", code: err.code, message: err.message, notifierError: err instanceof NotifierError });
}
"""

PRESENCE = """
const { NotifierClient } = require(process.env.NOTIFIER_JS);
const [aliceToken, bobToken] = process.env.NOTIFIER_TOKEN.split(" ");
const make = (token, options) => new NotifierClient({
  url: process.env.NOTIFIER_URL, token, WebSocket: require("ws"), pingInterval: 0, ...options });
const alice = make(aliceToken, { topics: ["room:p"], presence: true });
const bob = make(bobToken, {});
const next = (client, event) => new Promise((resolve) => {
  client.on(event, function handler(value) { client.off(event, handler); resolve(value); });
});
const users = (state) => state.users.map((u) => `${u.user}:${u.connections}`);
for (const client of [alice, bob]) {
  client.on("error", (err) => out({ event: "error", code: err.code, message: err.message }));
}
alice.on("join", (e) => out({ event: "alice join", frame: e }));
alice.on("leave", (e) => out({ event: "alice leave", frame: e }));
(async () => {
  const hello = next(alice, "hello");
  alice.connect();
  await hello;
  out({ event: "alone", state: await alice.presence("room:p") });
  const joined = next(alice, "join");
  bob.connect();
  await next(bob, "hello");
  await bob.subscribe(["room:p"]);  // bob asked for no presence events: only a member
  await joined;
  out({ event: "both", users: users(await alice.presence("room:p")) });
  const left = next(alice, "leave");
  bob.close();
  await left;
  out({ event: "after", users: users(await alice.presence("room:p")) });
  for (const topic of ["broadcast", "user:bob"]) {
    await alice.presence(topic).then(
      (state) => out({ event: "refused?", topic, state }),
      (err) => out({ event: "refused", topic, code: err.code, status: err.status, message: err.message }));
  }
  alice.close();
})().catch((err) => { out({ event: "thrown", message: String(err && err.stack) }); process.exit(1); });
"""

TRANSPORT_OPTIONS = """
const { NotifierClient } = require(process.env.NOTIFIER_JS);
const base = { url: process.env.NOTIFIER_URL, token: process.env.NOTIFIER_TOKEN, WebSocket: require("ws") };
for (const transport of ["sse", "carrier-pigeon", "auto", "websocket"]) {
  try {
    const client = new NotifierClient({ ...base, transport });
    out({ transport, uses: client.transport });
  } catch (err) {
    out({ transport, code: err.code, message: err.message });
  }
}
"""

ESM_IMPORT = """
import { NotifierClient, NotifierError } from "NOTIFIER_JS_URL";
console.log(JSON.stringify({ client: typeof NotifierClient, error: typeof NotifierError }));
"""


@pytest.fixture(scope="module")
def server() -> Iterator[Instance]:
    yield from memory_instance(SECRET)


def run_node(
    script: str, tmp_path: Path, url: str, token: str, name: str = "client.js"
) -> list[dict[str, Any]]:
    """Run ``script`` with node (the ``ws`` package on its path); the JSON lines it printed."""
    path = tmp_path / name
    path.write_text(PRELUDE + script if name.endswith(".js") else script)
    assert NODE is not None
    env = {
        **os.environ,
        "NODE_PATH": str(NODE_MODULES),
        "NOTIFIER_JS": str(CLIENT),
        "NOTIFIER_URL": url,
        "NOTIFIER_TOKEN": token,
    }
    done = subprocess.run([NODE, str(path)], env=env, cwd=tmp_path, capture_output=True, text=True,
                          timeout=DEADLINE)  # fmt: skip
    assert done.returncode == 0, f"node exited with {done.returncode}: {done.stdout}{done.stderr}"
    return [json.loads(line) for line in done.stdout.splitlines() if line.strip()]


@needs_ws
def test_node_client_with_the_ws_package_subscribes_publishes_and_receives(
    server: Instance, tmp_path: Path
) -> None:
    token = mint_token("nodeuser", ("subscribe", "publish"))
    events = run_node(SUBSCRIBE_PUBLISH_RECEIVE, tmp_path, server.url, token)
    kinds = [e["event"] for e in events]
    assert "error" not in kinds and "timeout" not in kinds, events
    hello = next(e for e in events if e["event"] == "hello")
    assert hello["user"] == "nodeuser" and "news" in hello["topics"]
    assert next(e for e in events if e["event"] == "subscribed")["topics"] == ["room:1"]
    published = next(e for e in events if e["event"] == "published")["reply"]
    assert published["type"] == "published" and published["topic"] == "room:1"
    assert next(e for e in events if e["event"] == "notification")["frame"] == {
        "type": "notification",
        "id": published["id"],
        "topic": "room:1",
        "data": {"text": "from node"},
        "ts": published["ts"],
    }


@needs_ws
def test_node_client_stops_with_unauthorized_when_the_server_refuses_the_token(
    server: Instance, tmp_path: Path
) -> None:
    bad = mint_token("nodeuser", ("subscribe",), secret="not-the-secret-0123456789abcdef0123")
    events = run_node(REFUSED_TOKEN, tmp_path, server.url, bad)
    assert events[0]["event"] == "error", events
    assert events[0]["code"] == "unauthorized" and events[0]["fatal"] is True
    assert "invalid token" in events[0]["message"]  # the server's own reason, read over fetch()


def test_node_client_without_a_websocket_implementation_says_to_pass_one(
    server: Instance, tmp_path: Path
) -> None:
    events = run_node(NO_WEBSOCKET, tmp_path, server.url, mint_token("nodeuser", ("subscribe",)))
    assert len(events) == 1 and events[0]["event"] == "thrown", events
    assert events[0]["code"] == "no_websocket" and events[0]["notifierError"] is True
    assert "`WebSocket` option" in events[0]["message"] and 'require("ws")' in events[0]["message"]


def test_node_imports_the_client_as_an_es_module_too(tmp_path: Path) -> None:
    script = ESM_IMPORT.replace("NOTIFIER_JS_URL", CLIENT.as_uri())
    events = run_node(script, tmp_path, "http://127.0.0.1:1", "", name="import.mjs")
    assert events == [{"client": "function", "error": "function"}]


@needs_ws
def test_node_client_reads_presence_and_gets_join_and_leave_events(server: Instance, tmp_path: Path) -> None:
    tokens = f"{mint_token('alice', ('subscribe',))} {mint_token('bob', ('subscribe',))}"
    events = run_node(PRESENCE, tmp_path, server.url, tokens)
    kinds = [e["event"] for e in events]
    assert "error" not in kinds and "timeout" not in kinds, events
    # Presence is right within 2 s of a subscribe: alice herself may not be listed yet.
    alone = events[0]["state"]
    assert alone["topic"] == "room:p" and alone["users"] in ([], [{"user": "alice", "connections": 1}])
    assert alone["count"] == len(alone["users"])
    assert kinds[1:] == ["alice join", "both", "alice leave", "after", "refused", "refused"], events
    assert events[1]["frame"] == {"type": "join", "topic": "room:p", "user": "bob"}
    assert events[2]["users"] == ["alice:1", "bob:1"]
    assert events[3]["frame"] == {"type": "leave", "topic": "room:p", "user": "bob"}
    assert events[4]["users"] == ["alice:1"]
    broadcast, other = events[5], events[6]
    assert broadcast["code"] == "bad_request" and broadcast["status"] == 422
    assert broadcast["message"].startswith("presence of broadcast: HTTP 422: ")
    assert other["code"] == "forbidden" and other["status"] == 403


@needs_ws
def test_node_has_no_event_source_so_the_client_stays_on_websockets(server: Instance, tmp_path: Path) -> None:
    events = run_node(TRANSPORT_OPTIONS, tmp_path, server.url, mint_token("nodeuser", ("subscribe",)))
    assert events[0]["code"] == "no_eventsource" and "`EventSource` option" in events[0]["message"]
    assert events[1]["code"] == "bad_option" and "carrier-pigeon" in events[1]["message"]
    assert events[2:] == [
        {"transport": "auto", "uses": "websocket"},
        {"transport": "websocket", "uses": "websocket"},
    ]
