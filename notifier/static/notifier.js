// notifier JavaScript client: plain <script> usable, no build step.
// new NotifierClient({token, url}) -> .connect(), .subscribe(topics), .unsubscribe(topics),
// .publish(topic, data), .on(event, fn) with events "state", "notification", "hello", "error".
(function (global) {
  "use strict";
  class NotifierClient {
    constructor({ token, url, topics = [] } = {}) {
      const base = url || (location.protocol === "https:" ? "wss://" : "ws://") + location.host;
      this.url = base.replace(/\/$/, "") + "/v1/ws";
      this.token = token;
      this.topics = new Set(topics);
      this.lastId = null;
      this.handlers = {};
      this.pending = new Map();
      this.nextRef = 1;
      this.closed = false;
      this.attempt = 0;
    }
    on(event, fn) { (this.handlers[event] = this.handlers[event] || []).push(fn); return this; }
    emit(event, value) { (this.handlers[event] || []).forEach((fn) => fn(value)); }
    connect() {
      this.closed = false;
      const q = new URLSearchParams({ token: this.token });
      if (this.topics.size) q.set("topics", [...this.topics].join(","));
      if (this.lastId !== null) q.set("since", this.lastId);
      this.emit("state", "connecting");
      const ws = (this.ws = new WebSocket(this.url + "?" + q));
      ws.onmessage = (ev) => this.receive(JSON.parse(ev.data));
      ws.onclose = (ev) => {
        this.emit("state", "disconnected");
        this.pending.forEach(({ reject }) => reject(new Error("connection closed")));
        this.pending.clear();
        if (!this.closed) {
          const delay = Math.min(30000, 500 * 2 ** this.attempt++) * (0.5 + Math.random() / 2);
          setTimeout(() => this.connect(), delay);
        }
      };
    }
    receive(frame) {
      if (frame.type === "hello") { this.attempt = 0; this.emit("state", "connected"); this.emit("hello", frame); return; }
      if (frame.type === "notification") {
        if (this.lastId === null || BigInt(frame.id) > BigInt(this.lastId)) this.lastId = frame.id;
        this.emit("notification", frame);
        return;
      }
      const waiter = frame.ref !== undefined && this.pending.get(frame.ref);
      if (waiter) {
        this.pending.delete(frame.ref);
        frame.type === "error" ? waiter.reject(Object.assign(new Error(frame.message), frame)) : waiter.resolve(frame);
      } else if (frame.type === "error") {
        this.emit("error", frame);
      }
    }
    request(frame) {
      return new Promise((resolve, reject) => {
        if (!this.ws || this.ws.readyState !== 1) return reject(new Error("not connected"));
        const ref = this.nextRef++;
        this.pending.set(ref, { resolve, reject });
        this.ws.send(JSON.stringify({ ...frame, ref }));
      });
    }
    subscribe(topics) { topics.forEach((t) => this.topics.add(t)); return this.request({ type: "subscribe", topics }); }
    unsubscribe(topics) { topics.forEach((t) => this.topics.delete(t)); return this.request({ type: "unsubscribe", topics }); }
    publish(topic, data) { return this.request({ type: "publish", topic, data }); }
    close() { this.closed = true; if (this.ws) this.ws.close(1000); }
  }
  global.NotifierClient = NotifierClient;
})(typeof window !== "undefined" ? window : globalThis);
