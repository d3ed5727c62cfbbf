/*
 * notifier.js: the JavaScript client of notifier. No build step, no dependency.
 *
 *   <script src="/static/notifier.js"></script>
 *   <script>
 *     const client = new NotifierClient({ token, topics: ["room:lobby"] });
 *     client.on("notification", (n) => console.log(n.topic, n.data));
 *     client.on("state", (state) => console.log(state));   // connecting | connected | disconnected
 *     client.connect();
 *     await client.publish("room:lobby", { text: "hi" });  // resolves with {type: "published", id, topic, ts}
 *   </script>
 *
 * Also usable as `globalThis.NotifierClient` (a worker, Node) and through `require()` or `import`. On
 * Node < 22, which has no built-in WebSocket, pass one:
 *
 *   const { NotifierClient } = require("./notifier.js");
 *   const client = new NotifierClient({ url, token, WebSocket: require("ws") });
 *
 * What it does for you:
 * - subscribe / unsubscribe / publish return promises settled by the server's reply with the
 *   same `ref`; an `error` frame rejects with a NotifierError carrying its `code` and `message`.
 *   Requests made while disconnected wait for the next connection (up to `requestTimeout`).
 * - Reconnects with exponential backoff and jitter after any close (1001 drain, 1013 too slow,
 *   1006 network...), resuming with its per-topic positions (`since=<topic>:<last id seen of
 *   it>,...`, `client.positions`) so nothing retained is missed, and with the topics it had joined. It gives up only on authentication failures: a 1008 close
 *   (token expired) without `getToken`, or a refused handshake that an HTTP probe shows to be a
 *   401 (bad token) or 403 (no subscribe scope). A topic the server now refuses is dropped.
 * - With `getToken` (async, returns a fresh JWT), it refreshes the token before its `exp` and
 *   sends it as a `refresh` frame, so the connection outlives the token.
 * - Presence: `client.presence(topic)` resolves with `GET /v1/topics/<topic>/presence`
 *   ({topic, count, users: [{user, connections}]}). With the `presence: true` option every topic
 *   the client joins (the `topics` option, every `subscribe`; not `broadcast` nor `user:<sub>`)
 *   asks for `join` / `leave` events (`presence=1` on every (re)connect, `"presence": true` in
 *   subscribe frames). Events only report changes, never the client's own user: read the state
 *   with presence() after subscribing, and again after each reconnect (`hello`), since changes
 *   made while disconnected are not replayed.
 * - Server-Sent Events fallback (`transport`, default "auto"): when `new WebSocket()` throws, or
 *   3 handshakes in a row fail before `open` while the HTTP API answers (a proxy or firewall that
 *   lets HTTP through but not WebSockets), the client switches to `EventSource` on `/v1/sse`
 *   (token in the query, its topics, per-topic `since`, `presence=1`) for the rest of its life
 *   (until close(); connect() tries the WebSocket again); `transport: "sse"` uses it from the
 *   start, `"websocket"` never. The same events arrive (hello, notification, join, leave). A
 *   stream is read-only, so: `publish` is a POST /v1/notifications (resolves with the same
 *   {type: "published", id, topic, ts}); `subscribe` / `unsubscribe` reopen the stream with the
 *   new topic list and every topic's position (nothing is missed in between; a topic just
 *   joined starts live) and resolve once the new stream's `hello` arrived; a subscribe whose
 *   stream is still refused after `requestTimeout` is undone. A token refresh reopens the stream
 *   with the new token. The client closes the EventSource on any error and reconnects itself,
 *   with backoff and its per-topic positions (EventSource's own retry would only send one
 *   Last-Event-ID). There is no ping on a stream. `client.transport` says which one is in use.
 *   Browsers only: Node has no EventSource (pass one as the `EventSource` option if you must).
 * - Events: "state" (state, detail), "hello" (frame), "notification" (frame), "join" (frame),
 *   "leave" (frame), "transport" ("sse", reason), "error" (NotifierError).
 */
(function (global) {
  "use strict";

  const CLOSE_NORMAL = 1000;
  const CLOSE_TOKEN_EXPIRED = 1008;
  const CLOSE_PING_TIMEOUT = 4000; // ours: the server stopped answering pings
  const MAX_TIMER = 2147483647; // setTimeout's largest delay
  const WS_FAILURES_BEFORE_SSE = 3; // handshakes failing before `open` while HTTP answers
  const SSE_EVENTS = ["hello", "notification", "join", "leave", "message"];
  const TOPIC = /^[A-Za-z0-9_.:-]{1,128}$/;
  const TRANSPORTS = ["auto", "websocket", "sse"];
  const HTTP_CODES = {
    400: "bad_request", 401: "unauthorized", 403: "forbidden", 404: "not_found", 413: "too_large",
    422: "bad_request", 429: "rate_limited", 503: "unavailable",
  };

  /** An error frame, a refused request or a connection problem: `code` says which. */
  class NotifierError extends Error {
    constructor(code, message, extra) {
      super(message);
      this.name = "NotifierError";
      this.code = code;
      Object.assign(this, extra || {});
    }
  }

  /** The claims of a JWT, or null (the signature is the server's business, not ours). */
  function jwtClaims(token) {
    try {
      const part = String(token).split(".")[1].replace(/-/g, "+").replace(/_/g, "/");
      const bytes = Uint8Array.from(atob(part + "===".slice((part.length + 3) % 4)), (c) => c.charCodeAt(0));
      return JSON.parse(new TextDecoder().decode(bytes));
    } catch (_) {
      return null;
    }
  }

  /** Ids are decimal strings of any length: compare them as integers, never as strings. */
  function idAfter(a, b) {
    return b === null || b === undefined || BigInt(a) > BigInt(b);
  }

  function topicList(topics) {
    return (typeof topics === "string" ? [topics] : Array.from(topics || [])).map(String);
  }

  function defaultBase() {
    if (typeof location === "undefined") throw new TypeError("NotifierClient: the `url` option is required here");
    return location.origin;
  }

  class NotifierClient {
    /**
     * @param {object} options
     * @param {string} [options.token] the JWT (needs the `subscribe` scope; `publish` to publish)
     * @param {string} [options.url] server base URL, http(s):// or ws(s)://; default: this page's origin
     * @param {string[]} [options.topics] topics to join on connect (beside `broadcast` and `user:<sub>`)
     * @param {() => Promise<string>} [options.getToken] returns a fresh token; called before `exp`
     * @param {string|Object<string, string>} [options.since] resume after this notification id
     *   (every topic), or each topic after its own position: `{topic: id}` (e.g. a saved
     *   `client.positions`; a topic without one starts live, without recovery)
     * @param {number} [options.minDelay=500] first reconnect delay, ms (doubles each failure)
     * @param {number} [options.maxDelay=30000] longest reconnect delay, ms
     * @param {number} [options.pingInterval=25000] keepalive ping period, ms (0: none)
     * @param {number} [options.requestTimeout=10000] how long a request waits for its reply, ms
     * @param {Function} [options.WebSocket] the WebSocket class; default: the global one (browsers,
     *   workers, Node >= 22). On Node < 22 pass one, e.g. `require("ws")`
     * @param {boolean} [options.presence=false] ask for `join` / `leave` events of every topic joined
     * @param {string} [options.transport="auto"] "auto" (WebSocket, Server-Sent Events when WebSockets
     *   do not get through), "websocket" (never SSE) or "sse" (only SSE)
     * @param {Function} [options.EventSource] the EventSource class; default: the global one (browsers)
     * @throws {NotifierError} code `no_websocket` when there is no WebSocket class to use (nor an
     *   EventSource with transport "auto"), `no_eventsource` for transport "sse" without one,
     *   `bad_option` for an unknown transport
     */
    constructor(options = {}) {
      const base = String(options.url || defaultBase()).replace(/\/+$/, "");
      this.httpBase = base.replace(/^ws(s?):/i, "http$1:");
      this.wsUrl = this.httpBase.replace(/^http(s?):/i, "ws$1:") + "/v1/ws";
      this.token = options.token || null;
      this.getToken = options.getToken || null;
      this.topics = new Set(topicList(options.topics));
      // Per topic, the id of the newest notification of it seen (or the position it was last
      // resumed from): sent as `since=<topic>:<id>,...` on every reconnect.
      this.positions = Object.create(null); // topic names may be "__proto__"
      this.lastId = null; // the newest id seen on any topic (or the one `since` given)
      this.firstSince = null; // the one id of the first connection's `since`
      this.resumedFrom = Object.create(null); // the positions the current connection was opened with
      this.helloTopics = []; // every topic of the last `hello`, automatic ones included
      this.connections = 0; // connections that reached `hello`
      if (typeof options.since === "string" && options.since.includes(":")) {
        // "<topic>:<id>,...", as the query has it: the id follows the last ":".
        for (const item of options.since.split(",")) {
          const colon = item.lastIndexOf(":"); // none: "" as the topic, which the server refuses
          this.positions[colon < 0 ? "" : item.slice(0, colon)] = item.slice(colon + 1);
        }
      } else if (options.since != null && typeof options.since === "object") {
        for (const [topic, id] of Object.entries(options.since)) this.positions[topic] = String(id);
      } else if (options.since != null) {
        this.lastId = this.firstSince = String(options.since);
      }
      this.minDelay = options.minDelay ?? 500;
      this.maxDelay = options.maxDelay ?? 30000;
      this.pingInterval = options.pingInterval ?? 25000;
      this.requestTimeout = options.requestTimeout ?? 10000;
      this.wantPresence = Boolean(options.presence);
      this.transportOption = options.transport || "auto";
      if (!TRANSPORTS.includes(this.transportOption)) {
        throw new NotifierError("bad_option", `transport must be one of ${TRANSPORTS.join(", ")}, not ${this.transportOption}`);
      }
      this.WebSocket = options.WebSocket || global.WebSocket;
      this.EventSource = options.EventSource || global.EventSource || null;
      const sseOnly = this.transportOption === "sse" ||
        (this.transportOption === "auto" && !options.WebSocket && typeof this.WebSocket !== "function" &&
         typeof this.EventSource === "function");
      if (sseOnly && typeof this.EventSource !== "function") {
        throw new NotifierError(
          "no_eventsource",
          "no EventSource implementation here (Node has none): pass one as the `EventSource` option, or use a WebSocket",
        );
      }
      if (!sseOnly && typeof this.WebSocket !== "function") {
        // Thrown, not emitted: nothing could ever connect, and an "error" event nobody listens
        // to yet would leave the client silent.
        throw new NotifierError(
          "no_websocket",
          options.WebSocket
            ? "the `WebSocket` option is not a WebSocket class (pass the class, e.g. require(\"ws\"))"
            : "no WebSocket implementation here: pass one as the `WebSocket` option " +
              "(on Node < 22: new NotifierClient({url, token, WebSocket: require(\"ws\")}), after npm install ws)",
        );
      }
      this.initialTransport = sseOnly ? "sse" : "websocket";
      this.transport = this.initialTransport; // "websocket" or "sse": what the client uses now
      this.wsFailures = 0; // WebSocket handshakes failed in a row while the HTTP API answered
      this.es = null; // the EventSource, on transport "sse"
      this.liveTopics = new Set(); // joined over SSE, not yet in a hello: started live, not recovered
      this.streamWaiters = []; // subscribe / unsubscribe over SSE, settled by the next stream's hello
      this.state = "disconnected";
      this.session = null; // of the current connection, from `hello`
      this.user = null;
      this.recovered = null; // `hello.recovered` of the last resumed connection
      this.ws = null;
      this.stopped = true;
      this.generation = 0; // bumped by open(), close() and fail(): stale async steps bail out
      this.attempt = 0;
      this.nextRef = 1;
      this.pending = new Map(); // ref -> request waiting for its reply
      this.intents = new Map(); // topic -> the latest subscribe/unsubscribe call about it
      this.lastIntent = 0;
      this.handlers = {};
      this.timers = {};
      this.onOnline = () => this.timers.reconnect && this.reconnectNow();
    }

    // -- events ---------------------------------------------------------------------------------

    /**
     * Listen to "state", "hello", "notification", "join", "leave", "transport" or "error";
     * returns the client (chainable).
     */
    on(event, fn) {
      (this.handlers[event] = this.handlers[event] || []).push(fn);
      return this;
    }

    off(event, fn) {
      this.handlers[event] = (this.handlers[event] || []).filter((h) => h !== fn);
      return this;
    }

    emit(event, ...args) {
      for (const fn of this.handlers[event] || []) {
        try {
          fn(...args);
        } catch (err) {
          setTimeout(() => { throw err; }); // a broken handler must not break the client
        }
      }
    }

    setState(state, detail) {
      if (state === this.state) return;
      this.state = state;
      this.emit("state", state, detail || {});
    }

    // -- connection -----------------------------------------------------------------------------

    /** Open the connection (and keep it open until close()). */
    connect() {
      if (!this.stopped) return this;
      this.stopped = false;
      this.attempt = 0;
      this.transport = this.initialTransport;
      this.wsFailures = 0;
      if (typeof addEventListener === "function") addEventListener("online", this.onOnline);
      this.open();
      return this;
    }

    /** Close for good: no reconnect; waiting requests reject with code "closed". */
    close() {
      this.stopped = true;
      this.generation++;
      if (typeof removeEventListener === "function") removeEventListener("online", this.onOnline);
      for (const name of Object.keys(this.timers)) this.clearTimer(name);
      this.drop();
      this.failPending(() => true, "closed", "the client was closed");
      this.settleWaiters(() => true, new NotifierError("closed", "the client was closed"));
      this.setState("disconnected", { closed: true });
      return this;
    }

    /** Skip the current backoff delay and reconnect at once (if waiting to reconnect). */
    reconnectNow() {
      if (this.stopped || this.ws || this.es) return;
      this.clearTimer("reconnect");
      this.open();
    }

    async open() {
      const generation = ++this.generation;
      this.clearTimer("reconnect");
      this.setState("connecting");
      if (this.getToken && this.tokenExpired()) {
        const renewed = await this.renewToken();
        if (generation !== this.generation) return;
        if (!renewed) return this.fail("token_expired", "the token expired and getToken gave no valid one");
      }
      if (this.transport === "sse") return this.openStream();
      let ws;
      try {
        ws = new this.WebSocket(this.wsUrl + "?" + this.handshakeQuery());
      } catch (err) {
        // Blocked (a policy, an extension, a sandbox): the event stream may still get through.
        if (!this.canUseSse()) return this.fail("bad_url", String(err && err.message));
        this.useSse("new WebSocket() threw: " + (err && err.message));
        return this.openStream();
      }
      this.ws = ws;
      let opened = false;
      ws.onopen = () => { opened = true; this.wsFailures = 0; };
      ws.onmessage = (ev) => ws === this.ws && this.receive(ev.data);
      ws.onerror = () => {}; // always followed by a close
      ws.onclose = (ev) => ws === this.ws && this.closed(ev.code, ev.reason, opened);
    }

    /** Token, topics, positions and presence: the query of a WebSocket or event stream handshake. */
    handshakeQuery() {
      const query = new URLSearchParams();
      if (this.token) query.set("token", this.token);
      if (this.topics.size) query.set("topics", [...this.topics].join(","));
      const since = this.resumeSince();
      if (since !== null) query.set("since", since);
      if (this.wantPresence) query.set("presence", "1");
      return query;
    }

    /** Open the event stream (`/v1/sse`): the same handshake and events, read-only. */
    openStream() {
      let es;
      try {
        es = new this.EventSource(this.httpBase + "/v1/sse?" + this.handshakeQuery());
      } catch (err) {
        return this.fail("bad_url", String(err && err.message));
      }
      this.es = es;
      let opened = false;
      es.onopen = () => { opened = true; };
      const deliver = (ev) => es === this.es && this.receive(ev.data);
      for (const type of SSE_EVENTS) es.addEventListener(type, deliver);
      es.onerror = () => {
        if (es !== this.es) return;
        // Refused, cut or ended by the server: reconnect ourselves, with every topic's position
        // (EventSource's own retry would send one Last-Event-ID for all of them).
        es.close();
        this.closed(null, "the event stream ended", opened);
      };
    }

    canUseSse() {
      return this.transportOption === "auto" && typeof this.EventSource === "function";
    }

    useSse(reason) {
      this.transport = "sse";
      this.emit("transport", "sse", reason);
    }

    /**
     * The `since` of the next handshake: the one id given, for the first connection; else
     * `<topic>:<id>,...`, a position for each topic of the connection. A topic with none of its
     * own (nothing received on it yet) resumes from the newest id seen on any topic, exact when
     * ids increase across topics (one broker); with no id at all it is joined live. Null: none.
     */
    resumeSince() {
      this.resumedFrom = Object.create(null);
      if (this.firstSince !== null && !this.connections) return this.firstSince;
      const topics = this.connections ? new Set([...this.helloTopics, ...this.topics]) : Object.keys(this.positions);
      for (const topic of topics) {
        const position = this.positions[topic] ?? (this.connections && !this.liveTopics.has(topic) ? this.lastId : null);
        if (position != null) this.resumedFrom[topic] = position;
      }
      const entries = Object.entries(this.resumedFrom);
      return entries.length ? entries.map(([topic, id]) => `${topic}:${id}`).join(",") : null;
    }

    detach() {
      if (this.ws) this.ws.onopen = this.ws.onmessage = this.ws.onclose = this.ws.onerror = null;
      if (this.es) this.es.onopen = this.es.onerror = null; // its listeners check `this.es`
      this.ws = null;
      this.es = null;
      this.clearTimer("ping");
      this.clearTimer("pong");
      this.clearTimer("refresh");
    }

    /** Detach and close the current WebSocket or event stream, if any (no `closed()` step). */
    drop() {
      const { ws, es } = this;
      this.detach();
      if (ws) ws.close(CLOSE_NORMAL);
      if (es) es.close();
    }

    async closed(code, reason, opened) {
      const generation = this.generation;
      this.detach();
      this.session = null;
      // A request already sent may or may not have been carried out: the caller decides.
      this.failPending((r) => r.sent, "disconnected", "the connection closed before the reply");
      if (this.stopped) return this.setState("disconnected", { code, reason });
      if (code === CLOSE_TOKEN_EXPIRED) {
        const renewed = this.getToken ? await this.renewToken() : false;
        if (generation !== this.generation) return;
        if (!renewed) return this.fail("token_expired", reason || "the token expired", { closeCode: code });
      } else if (!opened) {
        // A browser hides why a handshake failed (it reports 1006): ask the HTTP API.
        const problem = await this.diagnose();
        if (generation !== this.generation) return;
        if (problem && problem.fatal) return this.fail(problem.code, problem.message, { status: problem.status });
        if (problem && problem.code) this.emit("error", new NotifierError(problem.code, problem.message, problem));
        if (this.transport === "websocket" && problem && problem.reachable &&
            ++this.wsFailures >= WS_FAILURES_BEFORE_SSE && this.canUseSse()) {
          this.useSse(`${this.wsFailures} WebSocket handshakes failed while the HTTP API answers`);
          this.attempt = 0;
          return this.open();
        }
      }
      this.scheduleReconnect(code, reason);
    }

    scheduleReconnect(code, reason) {
      if (this.stopped) return;
      const ceiling = Math.min(this.maxDelay, this.minDelay * 2 ** this.attempt++);
      const delay = Math.round(ceiling * (0.5 + Math.random() / 2)); // jitter: no thundering herd
      this.setState("disconnected", { code, reason, retryIn: delay });
      this.setTimer("reconnect", delay, () => this.open());
    }

    /**
     * Why the handshake was refused, as far as the HTTP API tells: reading one notification of
     * each topic needs the same token and scope. Null when it looks transient (down, 503...);
     * `{reachable: true}` when every probe was answered 200 (WebSockets may be what is blocked).
     */
    async diagnose() {
      if (typeof fetch !== "function") return null;
      for (const topic of ["broadcast", ...this.topics]) {
        let response;
        try {
          response = await fetch(`${this.httpBase}/v1/topics/${topic}/notifications?limit=1`, {
            headers: this.token ? { authorization: "Bearer " + this.token } : {},
            cache: "no-store",
          });
        } catch (_) {
          return null; // unreachable (or cross-origin without CORS): keep trying
        }
        if (response.status !== 401 && response.status !== 403) {
          if (response.ok) continue;
          return null;
        }
        let detail = "";
        try { detail = (await response.json()).detail || ""; } catch (_) { /* no JSON body */ }
        const status = response.status;
        if (status === 401) {
          const refused = this.token;
          if (this.getToken && (await this.renewToken()) && this.token !== refused) return null; // try the new one
          return { code: "unauthorized", message: detail || "the token was refused", status, fatal: true };
        }
        if (topic === "broadcast") return { code: "forbidden", message: detail || "the token may not subscribe", status, fatal: true };
        this.topics.delete(topic); // the server refuses this topic now: join the rest
        const message = detail || `not allowed to subscribe to ${topic}`;
        this.settleWaiters((waiter) => waiter.topics.includes(topic), new NotifierError("forbidden", message, { status, topic }));
        return { code: "forbidden", message, status, topic };
      }
      return { reachable: true };
    }

    fail(code, message, extra) {
      this.stopped = true;
      this.generation++;
      this.drop();
      for (const name of Object.keys(this.timers)) this.clearTimer(name);
      this.failPending(() => true, code, message);
      this.settleWaiters(() => true, new NotifierError(code, message));
      this.setState("disconnected", { code, reason: message, fatal: true });
      this.emit("error", new NotifierError(code, message, { fatal: true, ...(extra || {}) }));
    }

    // -- frames ---------------------------------------------------------------------------------

    receive(text) {
      let frame;
      try {
        frame = JSON.parse(text);
      } catch (_) {
        return;
      }
      if (frame.type === "notification") {
        if (idAfter(frame.id, this.lastId)) this.lastId = frame.id;
        if (idAfter(frame.id, this.positions[frame.topic])) this.positions[frame.topic] = frame.id;
        this.emit("notification", frame);
      } else if (frame.type === "join" || frame.type === "leave") {
        this.emit(frame.type, frame);
      } else if (frame.type === "hello") {
        this.attempt = 0;
        this.session = frame.session;
        this.user = frame.user;
        this.connections++;
        this.helloTopics = Array.from(frame.topics || []);
        // Every topic now resumes from where this connection started it (positions of topics no
        // longer held are dropped), until a notification of it moves it on.
        const positions = Object.create(null);
        for (const topic of this.helloTopics) {
          const position = this.positions[topic] ?? (this.firstSince ?? this.resumedFrom[topic]);
          if (position != null) positions[topic] = position;
        }
        this.positions = positions;
        this.firstSince = null;
        this.liveTopics.clear();
        if ("recovered" in frame) this.recovered = frame.recovered;
        this.setState("connected", { session: frame.session, transport: this.transport });
        this.emit("hello", frame);
        if (this.ws) this.startPing();
        this.scheduleRefresh();
        if (this.es) this.settleWaiters(() => true); // the stream reopened for them is open
        for (const request of this.pending.values()) if (!request.sent) this.send(request);
      } else if (frame.ref !== undefined && this.pending.has(frame.ref)) {
        const request = this.pending.get(frame.ref);
        this.settle(frame.ref);
        if (frame.type === "error") request.reject(new NotifierError(frame.code, frame.message, { frame }));
        else request.resolve(frame);
      } else if (frame.type === "error") {
        this.emit("error", new NotifierError(frame.code, frame.message, { frame }));
      }
    }

    /** Send any client frame; resolves with the reply that echoes its `ref`. */
    request(frame, timeout = this.requestTimeout) {
      return new Promise((resolve, reject) => {
        if (this.stopped) return reject(new NotifierError("closed", "the client is not connected; call connect()"));
        const ref = this.nextRef++;
        const request = { frame: { ...frame, ref }, resolve, reject, sent: false };
        request.timer = setTimeout(() => {
          this.settle(ref);
          reject(new NotifierError("timeout", `no reply to ${frame.type} within ${timeout} ms`));
        }, Math.min(timeout, MAX_TIMER));
        this.pending.set(ref, request);
        if (this.state === "connected") this.send(request);
      });
    }

    send(request) {
      request.sent = true;
      if (this.transport === "sse") this.sendOverHttp(request);
      else this.ws.send(JSON.stringify(request.frame));
    }

    /**
     * A request while on an event stream, which takes no frames: a publish is a POST; a
     * subscribe or unsubscribe reopens the stream with the new topics (and every position) and
     * is answered by its hello; a ping needs no answer from the server.
     */
    sendOverHttp(request) {
      const { frame, resolve, reject } = request;
      const ref = frame.ref;
      this.pending.delete(ref); // not tied to the stream: a stream that drops does not fail it
      const settle = (fn, value) => { clearTimeout(request.timer); fn(value); };
      if (frame.type === "publish") {
        this.http("POST", "/v1/notifications", "publish to " + frame.topic, { topic: frame.topic, data: frame.data })
          .then((answer) => settle(resolve, { type: "published", ...answer, ref }), (err) => settle(reject, err));
      } else if (frame.type === "subscribe" || frame.type === "unsubscribe") {
        const topics = topicList(frame.topics);
        const subscribe = frame.type === "subscribe";
        const bad = topics.find((topic) => !TOPIC.test(topic));
        if (subscribe && bad !== undefined) return settle(reject, new NotifierError("bad_request", `invalid topic name: ${JSON.stringify(bad)}`));
        const added = [];
        if (subscribe) {
          for (const topic of topics) {
            if (this.topics.has(topic) || this.helloTopics.includes(topic)) continue;
            this.topics.add(topic);
            this.liveTopics.add(topic);
            added.push(topic);
          }
          if (!added.length) return settle(resolve, { type: "subscribed", topics, ref }); // all held already
        }
        const waiter = { topics, request, reply: { type: subscribe ? "subscribed" : "unsubscribed", topics, ref } };
        clearTimeout(request.timer);
        request.timer = setTimeout(() => {
          // Still no stream with them (refused, e.g. too many topics): undo, keep the rest going.
          this.streamWaiters = this.streamWaiters.filter((w) => w !== waiter);
          for (const topic of added) {
            if (!this.helloTopics.includes(topic)) this.topics.delete(topic);
          }
          if (added.length && this.es) this.reopenSoon();
          reject(new NotifierError("timeout", `no event stream with the new topics within ${this.requestTimeout} ms`));
        }, Math.min(this.requestTimeout, MAX_TIMER));
        this.streamWaiters.push(waiter);
        this.reopenSoon();
      } else if (frame.type === "ping") {
        settle(resolve, { type: "pong", ref });
      } else {
        settle(reject, new NotifierError("unsupported", `a ${frame.type} frame cannot be sent over an event stream`));
      }
    }

    /** Resolve the stream waiters that `which` picks, or reject them with `error`. */
    settleWaiters(which, error) {
      for (const waiter of this.streamWaiters.filter(which)) {
        clearTimeout(waiter.request.timer);
        if (error) waiter.request.reject(error);
        else waiter.request.resolve(waiter.reply);
      }
      this.streamWaiters = this.streamWaiters.filter((waiter) => !which(waiter));
    }

    /** Reopen the event stream with the current topics, once the calls of this tick are in. */
    reopenSoon() {
      this.setTimer("reopen", 0, () => {
        // Between two attempts (no stream): the next one takes the new topics anyway.
        if (this.stopped || !this.es) return;
        this.drop();
        this.open();
      });
    }

    /** A request to the HTTP API with the client's token: the JSON answer, or a NotifierError. */
    async http(method, path, what, body) {
      if (typeof fetch !== "function") throw new NotifierError("no_fetch", `${what}: no fetch() here to reach the HTTP API`);
      if (this.getToken && this.tokenExpired()) await this.renewToken();
      const headers = this.token ? { authorization: "Bearer " + this.token } : {};
      if (body !== undefined) headers["content-type"] = "application/json";
      let response;
      try {
        response = await fetch(this.httpBase + path, {
          method, headers, cache: "no-store", body: body === undefined ? undefined : JSON.stringify(body),
        });
      } catch (err) {
        throw new NotifierError("unreachable", `${what}: ${(err && err.message) || err}`, { cause: err });
      }
      let answer = null;
      try { answer = await response.json(); } catch (_) { /* no JSON body */ }
      if (response.ok) return answer;
      let detail = answer && answer.detail !== undefined ? answer.detail : response.statusText;
      if (typeof detail !== "string") detail = JSON.stringify(detail);
      const status = response.status;
      throw new NotifierError(HTTP_CODES[status] || "http_error", `${what}: HTTP ${status}: ${detail}`, { status, detail });
    }

    /**
     * Who is online on `topic`, deployment-wide: resolves with `GET /v1/topics/<topic>/presence`,
     * `{topic, count, users: [{user, connections}, ...]}` (users sorted, at most 1000 listed,
     * `count` all of them); rejects with a NotifierError carrying `status` and the server's
     * `detail` (codes unauthorized, forbidden, bad_request, unavailable...).
     */
    presence(topic) {
      topic = String(topic);
      return this.http("GET", `/v1/topics/${encodeURIComponent(topic)}/presence`, "presence of " + topic);
    }

    settle(ref) {
      const request = this.pending.get(ref);
      if (request) clearTimeout(request.timer);
      this.pending.delete(ref);
    }

    failPending(which, code, message) {
      for (const [ref, request] of [...this.pending]) {
        if (!which(request)) continue;
        this.settle(ref);
        request.reject(new NotifierError(code, message));
      }
    }

    /** Join topics; resolves with the `subscribed` reply once they are active. */
    async subscribe(topics) {
      const list = topicList(topics);
      const intent = this.intend(list);
      const frame = { type: "subscribe", topics: list };
      if (this.wantPresence) frame.presence = true;
      const reply = await this.request(frame);
      // Rejoined on reconnect from now on, unless an unsubscribe came after this subscribe.
      for (const topic of list) if (this.intents.get(topic) === intent) this.topics.add(topic);
      return reply;
    }

    /** Leave topics (not rejoined on reconnect); resolves with the `unsubscribed` reply. */
    async unsubscribe(topics) {
      const list = topicList(topics);
      this.intend(list);
      for (const topic of list) {
        this.topics.delete(topic);
        delete this.positions[topic]; // not held any more: nothing to resume
      }
      this.helloTopics = this.helloTopics.filter((topic) => !list.includes(topic));
      if (this.stopped) return { type: "unsubscribed", topics: list };
      // Queued behind any subscribe still waiting for a connection, so the server ends up right.
      return this.request({ type: "unsubscribe", topics: list });
    }

    intend(topics) {
      const intent = ++this.lastIntent;
      for (const topic of topics) this.intents.set(topic, intent);
      return intent;
    }

    /** Publish `data` (any JSON) to `topic` (needs the `publish` scope); resolves with {id, topic, ts}. */
    publish(topic, data) {
      return this.request({ type: "publish", topic, data: data === undefined ? null : data });
    }

    // -- keepalive and token refresh -------------------------------------------------------------

    startPing() {
      if (!this.pingInterval) return;
      this.setTimer("ping", this.pingInterval, () => {
        // A dead network can leave a socket "open" for minutes: no pong in time means reconnect.
        this.setTimer("pong", this.requestTimeout, () => {
          const ws = this.ws;
          this.closed(CLOSE_PING_TIMEOUT, "no reply to ping", true);
          if (ws) ws.close(CLOSE_PING_TIMEOUT);
        });
        this.request({ type: "ping" }).then(
          () => { this.clearTimer("pong"); this.startPing(); },
          () => {},
        );
      });
    }

    tokenExpired() {
      const claims = this.token && jwtClaims(this.token);
      return Boolean(claims && typeof claims.exp === "number" && claims.exp * 1000 <= Date.now() + 1000);
    }

    /** Ask getToken for a new token; true when it gave one that has not expired. */
    async renewToken() {
      try {
        const token = await this.getToken();
        if (!token) return false;
        this.token = String(token);
        return !this.tokenExpired();
      } catch (err) {
        this.emit("error", new NotifierError("refresh_failed", "getToken failed: " + (err && err.message), { cause: err }));
        return false;
      }
    }

    scheduleRefresh() {
      this.clearTimer("refresh");
      const claims = this.getToken && this.token && jwtClaims(this.token);
      if (!claims || typeof claims.exp !== "number") return;
      const left = claims.exp * 1000 - Date.now();
      const lead = Math.min(60000, Math.max(1000, left / 5)); // refresh well before the server closes
      this.setTimer("refresh", Math.max(0, left - lead), () => this.refresh());
    }

    async refresh() {
      const before = this.token;
      if (!(await this.renewToken()) || this.token === before || this.state !== "connected") {
        // Try again shortly; if exp passes first the server closes with 1008 and we reconnect.
        if (this.state === "connected") this.setTimer("refresh", 5000, () => this.refresh());
        return;
      }
      if (this.es) {
        // A stream takes no refresh frame: reopen it with the new token (positions: nothing lost).
        this.drop();
        this.open();
        return;
      }
      try {
        await this.request({ type: "refresh", token: this.token });
        this.scheduleRefresh();
      } catch (err) {
        this.emit("error", err);
        if (this.state === "connected") this.setTimer("refresh", 5000, () => this.refresh());
      }
    }

    // -- timers -----------------------------------------------------------------------------------

    setTimer(name, delay, fn) {
      this.clearTimer(name);
      this.timers[name] = setTimeout(() => { delete this.timers[name]; fn(); }, Math.min(delay, MAX_TIMER));
    }

    clearTimer(name) {
      clearTimeout(this.timers[name]);
      delete this.timers[name];
    }
  }

  NotifierClient.NotifierError = NotifierError;
  NotifierClient.jwtClaims = jwtClaims;
  global.NotifierClient = NotifierClient;
  global.NotifierError = NotifierError;
  if (typeof module === "object" && module && module.exports) module.exports = { NotifierClient, NotifierError };
})(typeof globalThis !== "undefined" ? globalThis : window);
