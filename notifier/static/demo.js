// The demo page at "/": a small chat on top of notifier.js.
// Every payload goes into the page through textContent, never as HTML.
(function () {
  "use strict";

  const $ = (id) => document.getElementById(id);
  const MAX_ITEMS = 500;
  const TOPIC = /^[A-Za-z0-9_.:-]{1,128}$/;
  const fragment = new URLSearchParams(location.hash.slice(1));
  let client = null;
  let autoTopics = [];
  let wasConnected = false;
  // Who is online, per joined topic: the users of the last presence() answer, kept live by join
  // and leave events. Events that arrive while a query is out are applied again on its answer.
  const online = new Map(); // topic -> { users: Set, during: events seen while asking, or null, asked }

  function el(tag, className, text) {
    const node = document.createElement(tag);
    if (className) node.className = className;
    if (text !== undefined) node.textContent = text;
    return node;
  }

  function append(item) {
    const feed = $("feed");
    const atBottom = feed.scrollHeight - feed.scrollTop - feed.clientHeight < 40;
    feed.append(item);
    while (feed.children.length > MAX_ITEMS) feed.firstElementChild.remove();
    if (atBottom) feed.scrollTop = feed.scrollHeight;
  }

  function system(text, bad) {
    append(el("li", "note system" + (bad ? " bad" : ""), text));
  }

  function showNotification(n) {
    const data = n.data;
    const isChat = data !== null && typeof data === "object" && typeof data.text === "string";
    const from = isChat && typeof data.from === "string" ? data.from : null;
    const item = el("li", "note" + (from !== null && client && from === client.user ? " mine" : ""));
    item.dataset.id = n.id;
    item.dataset.topic = n.topic;
    item.title = "id " + n.id;
    const meta = el("div", "meta");
    meta.append(el("span", "topic", n.topic));
    if (from !== null) meta.append(el("span", "from", from));
    const time = el("time", "", new Date(n.ts).toLocaleTimeString());
    time.dateTime = new Date(n.ts).toISOString();
    meta.append(time);
    let body;
    if (isChat) body = el("div", "body", data.text);
    else if (typeof data === "string") body = el("div", "body", data);
    else body = el("pre", "body", JSON.stringify(data, null, 2));
    item.append(meta, body);
    append(item);
  }

  function renderTopics() {
    const list = $("topics");
    const options = $("topic-options");
    list.replaceChildren();
    options.replaceChildren();
    const joined = client ? [...client.topics] : [];
    for (const topic of [...autoTopics.filter((t) => !joined.includes(t)), ...joined]) {
      const chip = el("li", "chip" + (joined.includes(topic) ? "" : " auto"));
      const name = el("span", "name", topic);
      name.title = "publish to " + topic;
      name.onclick = () => { $("publish-topic").value = topic; $("publish-text").focus(); };
      chip.append(name);
      if (joined.includes(topic)) {
        const leave = el("button", "", "×");
        leave.type = "button";
        leave.setAttribute("aria-label", "leave " + topic);
        leave.onclick = () => {
          client.unsubscribe([topic]).catch((err) => system("Could not leave " + topic + ": " + err.message, true));
          renderTopics();
        };
        chip.append(leave);
      }
      list.append(chip);
      options.append(el("option", "", topic));
    }
    for (const topic of online.keys()) if (!joined.includes(topic)) online.delete(topic);
    renderOnline();
  }

  function renderOnline() {
    const box = $("online");
    box.replaceChildren();
    for (const [topic, entry] of online) {
      // Events never report this connection's own user: it is online wherever it joined.
      const users = [...new Set([...entry.users, ...(client && client.user ? [client.user] : [])])].sort();
      const row = el("div", "online");
      row.dataset.topic = topic;
      row.append(el("span", "topic", topic), el("span", "count", String(users.length)));
      const list = el("ul", "users");
      for (const user of users) {
        const item = el("li", "user" + (client && user === client.user ? " me" : ""), user);
        item.dataset.user = user;
        list.append(item);
      }
      row.append(list);
      box.append(row);
    }
    $("online-card").hidden = online.size === 0;
  }

  function askOnline(topic) {
    const entry = online.get(topic) || { users: new Set(), during: null, asked: 0 };
    online.set(topic, entry);
    const asked = ++entry.asked;
    const asking = client;
    entry.during = [];
    const current = () => asking === client && online.get(topic) === entry && entry.asked === asked;
    asking.presence(topic).then(
      (state) => {
        if (!current()) return;
        entry.users = new Set(state.users.map((u) => u.user));
        for (const event of entry.during) applyPresence(entry, event);
        entry.during = null;
        renderOnline();
      },
      (err) => {
        if (!current()) return;
        entry.during = null;
        system("Could not tell who is online in " + topic + ": " + err.message, true);
      },
    );
    renderOnline();
  }

  function applyPresence(entry, event) {
    if (event.type === "join") entry.users.add(event.user);
    else entry.users.delete(event.user);
  }

  function onPresence(event) {
    const entry = online.get(event.topic);
    if (!entry) return;
    applyPresence(entry, event);
    if (entry.during) entry.during.push(event);
    renderOnline();
  }

  function setState(state, detail) {
    const badge = $("state");
    badge.dataset.state = state;
    badge.textContent = state;
    if (state === "connected") {
      const via = detail && detail.transport === "sse" ? " · via SSE" : "";
      $("who").textContent = client && client.user ? "as " + client.user + via : "";
    } else if (state === "disconnected" && wasConnected && detail && detail.retryIn !== undefined) {
      wasConnected = false;
      system(`Connection lost${detail.code ? " (" + detail.code + ")" : ""}; reconnecting…`);
    }
  }

  function connect(token) {
    if (client) client.close();
    wasConnected = false;
    const topics = (fragment.get("topics") || "").split(",").filter((t) => TOPIC.test(t));
    online.clear();
    client = new NotifierClient({
      token,
      topics,
      since: fragment.get("since") || undefined,
      presence: true,
      transport: fragment.get("transport") || undefined,
    });
    client.on("state", setState);
    client.on("notification", showNotification);
    client.on("join", onPresence);
    client.on("leave", onPresence);
    client.on("transport", (transport, reason) => system(`Using ${transport === "sse" ? "Server-Sent Events" : transport}: ${reason}.`));
    client.on("hello", (hello) => {
      autoTopics = hello.topics.filter((t) => !client.topics.has(t));
      // Changes made while disconnected are not replayed as events: ask again on every hello.
      for (const topic of client.topics) askOnline(topic);
      renderTopics();
      if (hello.recovered === true && !wasConnected) system("Reconnected: caught up on everything missed.");
      if (hello.recovered === false) system("Reconnected, but some notifications were no longer retained.", true);
      wasConnected = true;
    });
    client.on("error", (err) => system((err.fatal ? "Stopped: " : "") + err.message + " (" + err.code + ")", true));
    client.connect();
    $("connection").open = false;
  }

  $("connect-form").onsubmit = (event) => {
    event.preventDefault();
    const token = $("token").value.trim();
    const keep = new URLSearchParams(fragment);
    keep.set("token", token);
    history.replaceState(null, "", "#" + keep); // a reload keeps the token
    connect(token);
  };

  $("disconnect").onclick = () => { if (client) client.close(); };

  $("join-form").onsubmit = (event) => {
    event.preventDefault();
    const topic = $("join-topic").value.trim();
    if (!client) return system("Connect first.", true);
    client.subscribe([topic]).then(
      () => { $("join-topic").value = ""; askOnline(topic); renderTopics(); },
      (err) => system("Could not join " + topic + ": " + err.message, true),
    );
  };

  $("publish-form").onsubmit = (event) => {
    event.preventDefault();
    const topic = $("publish-topic").value.trim();
    const text = $("publish-text").value;
    if (!client) return system("Connect first.", true);
    client.publish(topic, { text, from: client.user }).then(
      () => { if ($("publish-text").value === text) $("publish-text").value = ""; },
      (err) => system("Not sent to " + topic + ": " + err.message, true),
    );
  };

  const token = fragment.get("token");
  if (token) {
    $("token").value = token;
    connect(token);
  } else {
    $("connection").open = true;
  }

  // For tests and the curious: the live client.
  window.notifierDemo = { get client() { return client; } };
})();
