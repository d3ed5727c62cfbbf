// Load generator of the notifier benchmark suite (driven by `python -m benchmarks`, not run by hand).
//
//   node benchmarks/loadgen.mjs '<config JSON>'
//
// Holds N WebSocket subscribers on one topic, publishes ~256-byte notifications over HTTP
// (keep-alive) and counts what every subscriber receives. Modes:
//   fanout  windowed publishing: notification k is posted once k-window has reached every
//           subscriber, so the server always has work queued but never an unbounded backlog;
//   steady  open-loop publishing at a fixed rate (notifications/s), whatever the server does;
//   idle    opens connections in steps and reads the server's RSS after each step, then sends
//           one notification that must reach all of them;
//   personal  one WebSocket per user (user bench<i>, on its own topic user:bench<i>); one POST per
//           notification to the next user's topic (round robin) over cfg.publishSockets raw
//           keep-alive HTTP connections with cfg.pipeline requests in flight on each, as fast as
//           the server answers; each must reach its user exactly once;
//   multi   the same users; each POST is {"topics": [every user's topic], "data"}, windowed as
//           in fanout (every user receives each notification once);
//   handshake  cfg.concurrency connectors, each in a loop: open a WebSocket as a distinct user
//           (tokens pre-minted), wait for the first frame (hello), close; connect->hello latency.
//           With receiver "c" the loop runs in wsrecv (command "hs"), else here on raw sockets.
//           cfg.handshakeTopic: each also asks for that shared topic (`topics=`), cfg.presence
//           with `presence=1` (join and leave events of the topic's other users);
//   presence  cfg.subscribers listeners on TOPIC with `presence=1` (users bench<i>) held open;
//           cfg.concurrency churners (users churn<k>, distinct from theirs) each in a loop: open a
//           WebSocket on TOPIC, hold it cfg.holdMs, close; counts the join and leave frames the
//           listeners receive (events/s, per server CPU-second) and the listeners' lag behind them.
// Receivers (cfg.receiver):
//   c    benchmarks/.build/wsrecv (wsrecv.c): the subscribers live in a C epoll loop, a child
//        of this process on the same core; this process publishes, paces and measures;
//   raw  a minimal RFC 6455 client in this process (net sockets with `onread`, frames parsed in
//        place);
//   ws   the `ws` package (the only one that negotiates permessage-deflate: cfg.deflate);
//   sse  the same subscribers over GET /v1/sse (Server-Sent Events) on a raw HTTP/1.1 socket:
//        chunked transfer decoded, events split on blank lines, each `notification` event's data
//        (the WebSocket frame's JSON) counted as a frame (fanout, steady).
// It reads the CPU time (utime+stime, /proc/<pid>/stat) and run-queue wait (/proc/<pid>/schedstat)
// of the server processes and of itself (plus wsrecv) at the start and end of the measurement
// window, and the servers' RSS (/proc/<pid>/status VmRSS); prints one JSON object on stdout.
// Progress goes to stderr. Every loop is bounded in count and time; `hardTimeout` ends it all.

import { spawn } from 'node:child_process';
import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { performance } from 'node:perf_hooks';
import readline from 'node:readline';
import { cpuSeconds as procCpuSeconds, runWait, rssKiB, statFields } from './procstat.mjs';

const cfg = JSON.parse(process.argv[2]);
const CLK_TCK = cfg.clkTck || 100;
const HIST_STEP_MS = 0.05; // latency histogram resolution (as in wsrecv.c)
const HIST_BINS = 1200001; // up to 60 s
const TOPIC = cfg.topic || 'bench';

const log = (...a) => { if (!cfg.quiet) process.stderr.write(`loadgen: ${a.join(' ')}\n`); };
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));
const nowMs = () => performance.timeOrigin + performance.now(); // wall clock, sub-ms resolution

let receiver = null;
const hard = setTimeout(() => {
  process.stderr.write('loadgen: hard timeout reached, exiting\n');
  receiver?.kill();
  process.stdout.write(JSON.stringify({ error: 'hard timeout' }) + '\n', () => process.exit(3));
}, (cfg.hardTimeout || 120) * 1000);
hard.unref();

// ---- /proc ---------------------------------------------------------------------------------

const cpuSeconds = (pid) => procCpuSeconds(pid, CLK_TCK);

const groups = cfg.pids || {}; // {"server": [pid...], "nginx": [...], "redis": [...]}
const selfPids = () => (receiver?.pid ? ['self', receiver.pid] : ['self']);
const sum = (pids, f) => pids.reduce((s, p) => s + f(p), 0);
function sample() {
  // loadgen: this process plus wsrecv; node and wsrecv also apart (both on the load generator's core).
  const cpu = { loadgen: sum(selfPids(), cpuSeconds), node: cpuSeconds('self') };
  const wait = { node: runWait('self') };
  if (receiver?.pid) {
    cpu.wsrecv = cpuSeconds(receiver.pid);
    wait.wsrecv = runWait(receiver.pid);
  }
  for (const [name, pids] of Object.entries(groups)) {
    cpu[name] = sum(pids, cpuSeconds);
    wait[name] = sum(pids, runWait);
  }
  const split = selfPids().map(statFields).reduce(
    (a, f) => [a[0] + Number(f[11]) / CLK_TCK, a[1] + Number(f[12]) / CLK_TCK], [0, 0]);
  return { cpu, wait, split };
}
const serverRss = () => sum(groups.server || [], rssKiB);

// ---- tokens and URLs -----------------------------------------------------------------------

const b64url = (s) => Buffer.from(s).toString('base64url');
function jwt(claims) {
  const head = b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const body = b64url(JSON.stringify({ exp: Math.floor(Date.now() / 1000) + 3600, ...claims }));
  const sig = crypto.createHmac('sha256', cfg.secret).update(`${head}.${body}`).digest('base64url');
  return `${head}.${body}.${sig}`;
}

// User i of the per-user scenarios (cfg.userTopics) is bench<i>: notifier subscribes it to its
// own topic user:bench<i> from its token; a baseline (no secret) is asked for it with ?topics=.
const userTopic = (i) => `user:bench${i}`;

function subscriberUrl(i) {
  const url = new URL(cfg.wsUrl);
  if (!cfg.userTopics) url.searchParams.set('topics', TOPIC);
  else if (cfg.handshakeTopic) url.searchParams.set('topics', cfg.handshakeTopic);
  else if (!cfg.secret) url.searchParams.set('topics', userTopic(i));
  if (cfg.presence) url.searchParams.set('presence', '1');
  if (cfg.secret) url.searchParams.set('token', jwt({ sub: `bench${i}`, scope: 'subscribe' }));
  return url;
}

// ---- what was received ---------------------------------------------------------------------

const maxSeq = cfg.maxNotifications || 1000; // seqs 1..maxSeq
const expectCount = new Uint32Array(maxSeq + 1); // subscribers open when seq was published
const stats = {
  hist: new Uint32Array(HIST_BINS), latMax: 0, latCount: 0, outOfOrder: 0, frameBytes: 0, frameSamples: 0,
  reads: 0, misrouted: 0,
};
const USER_TOPIC = Buffer.from('"topic":"user:bench');
const PRESENCE_JOIN = Buffer.from('{"type":"join"');
const PRESENCE_LEAVE = Buffer.from('{"type":"leave"');
const presenceStats = { joins: 0, leaves: 0 };
const CHURN_USER = Buffer.from('"user":"churn');
const churnHelloAt = new Map(); // churner k -> wall-clock ms of its latest hello
let presenceMeasuring = false;
let closedEarly = 0;

function quantile(q) {
  if (stats.latCount === 0) return null;
  const rank = Math.max(1, Math.ceil(q * stats.latCount));
  let acc = 0;
  for (let b = 0; b < HIST_BINS; b++) {
    acc += stats.hist[b];
    if (acc >= rank) return +Math.min(stats.latMax, (b + 1) * HIST_STEP_MS).toFixed(3);
  }
  return +stats.latMax.toFixed(3);
}

function latencyCdf() {
  // [percentile, ms] points for a CDF plot: every 1% plus the tail.
  const qs = [];
  for (let p = 1; p <= 99; p++) qs.push(p / 100);
  qs.push(0.995, 0.999, 0.9999);
  const points = qs.map((q) => [+(q * 100).toFixed(2), quantile(q)]);
  points.push([100, stats.latCount ? +stats.latMax.toFixed(3) : null]);
  return points;
}

// ---- receiver: JavaScript ------------------------------------------------------------------

// The fixed parts of a notification frame as notifier and the baselines write it:
// {"type":"notification","id":"<id>","topic":"<topic>","data":{"seq":<seq>,...},"ts":<ts>}
const HEAD_LEN = '{"type":"notification","id":"'.length;
const MID_LEN = `","topic":${JSON.stringify(TOPIC)},"data":{"seq":`.length;
const SEQ = Buffer.from('"seq":');
const ID = Buffer.from('"id":"');
const TS = Buffer.from('"ts":');
let intEnd = 0; // where the digits read by the last readInt ended

function readInt(buf, pos) {
  while (buf[pos] === 32) pos++;
  let n = 0;
  for (let c = buf[pos]; c >= 48 && c <= 57; c = buf[++pos]) n = n * 10 + (c - 48);
  intEnd = pos;
  return n;
}

// [id, seq, ts] of a notification frame: at their known offsets (a few byte checks), else by search.
function fields(buf) {
  const len = buf.length;
  if (len > 64 && buf[len - 1] === 125 && buf[9] === 110 && buf[24] === 105 && buf[28] === 34) {
    const id = readInt(buf, HEAD_LEN);
    const m = intEnd;
    // `"seq":` where a frame of TOPIC has it (another topic of another length falls through).
    const q = m + MID_LEN;
    if (buf[m] === 34 && buf[m + 3] === 116 && buf[q - 5] === 115 && buf[q - 4] === 101 && buf[q - 3] === 113
      && buf[q - 2] === 34 && buf[q - 1] === 58) {
      const seq = readInt(buf, m + MID_LEN);
      let t = len - 2;
      while (t > 0 && buf[t] >= 48 && buf[t] <= 57) t--;
      if (buf[t] === 58 && buf[t - 1] === 34 && buf[t - 2] === 115 && buf[t - 3] === 116) {
        return [id, seq, readInt(buf, t + 1)];
      }
    }
  }
  const s = buf.indexOf(SEQ);
  if (s < 0) return null; // a reply or anything else that is not one of our notifications
  const a = buf.indexOf(ID);
  const t = buf.lastIndexOf(TS);
  const seq = readInt(buf, s + SEQ.length);
  return [a >= 0 ? readInt(buf, a + ID.length) : -1, seq, t >= 0 ? readInt(buf, t + TS.length) : -1];
}

class JsReceiver {
  constructor(kind) {
    this.kind = kind;
    this.pid = null;
    this.subs = [];
    this.open = 0;
    this.failed = 0;
    this.received = 0;
    this.recvCount = new Uint32Array(maxSeq + 1);
    this.skipped = new Uint8Array(maxSeq + 1);
    this.doneUpTo = 0;
    this.measureFrom = Infinity;
    this.onDone = null; // (doneUpTo) => void
    this.accepting = true;
    this.next = 0;
  }

  complete(seq) {
    return this.skipped[seq] || this.recvCount[seq] >= expectCount[seq];
  }

  advance() {
    let d = this.doneUpTo;
    while (d < maxSeq && d < published && this.complete(d + 1)) d++;
    if (d !== this.doneUpTo) {
      this.doneUpTo = d;
      this.onDone?.(d);
    }
  }

  message(sub, buf) {
    const recvAt = nowMs();
    const f = fields(buf);
    if (f === null) {
      if (buf.indexOf(PRESENCE_JOIN) === 0) {
        presenceStats.joins++;
        // Lag: from the joining client's hello to this listener's join frame.
        const u = buf.indexOf(CHURN_USER);
        const at = u < 0 ? 0 : churnHelloAt.get(readInt(buf, u + CHURN_USER.length));
        if (at && presenceMeasuring) {
          const lat = Math.max(0, recvAt - at);
          stats.hist[Math.min(HIST_BINS - 1, Math.floor(lat / HIST_STEP_MS))]++;
          if (lat > stats.latMax) stats.latMax = lat;
          stats.latCount++;
        }
      } else if (buf.indexOf(PRESENCE_LEAVE) === 0) presenceStats.leaves++;
      return;
    }
    const [id, seq, ts] = f;
    if (seq < 1 || seq > maxSeq) return;
    if (cfg.userTopics) {
      const u = buf.indexOf(USER_TOPIC);
      if (u < 0 || readInt(buf, u + USER_TOPIC.length) !== sub.i || buf[intEnd] !== 34) stats.misrouted++;
    }
    // Order is the server's: ids increase in acceptance order (concurrent POSTs may be accepted
    // in another order than they were sent, so seq says nothing about order).
    if (id >= 0) {
      if (id <= sub.last) stats.outOfOrder++;
      sub.last = id;
    }
    this.recvCount[seq]++;
    this.received++;
    if (seq >= this.measureFrom && ts >= 0) {
      const lat = Math.max(0, recvAt - ts);
      stats.hist[Math.min(HIST_BINS - 1, Math.floor(lat / HIST_STEP_MS))]++;
      if (lat > stats.latMax) stats.latMax = lat;
      stats.latCount++;
    }
    if (stats.frameSamples < 1000) { stats.frameBytes += buf.length; stats.frameSamples++; }
    if (seq === this.doneUpTo + 1) this.advance();
  }

  // One subscriber: resolves to it once its first frame (hello) arrived, or to null.
  connect(i) {
    return new Promise((resolve) => {
      const sub = { i, last: 0, ready: false, deflate: false, closing: false, close: null, terminate: null };
      let settled = false;
      const done = (ok, why) => {
        if (settled) return;
        settled = true;
        clearTimeout(timer);
        if (!ok && why) log(`subscriber ${i}: ${why}`);
        resolve(ok ? sub : null);
      };
      const events = {
        message: (buf, deflate) => {
          if (sub.ready) { this.message(sub, buf); return; }
          sub.ready = true; // the first frame: hello
          sub.deflate = deflate;
          this.open++;
          done(true);
        },
        close: (code) => {
          if (sub.ready) {
            this.open--;
            if (this.accepting && !sub.closing) {
              closedEarly++;
              log(`subscriber ${i} closed by the server with ${code}`);
              this.advance();
            }
          }
          done(false, `closed (${code}) before its first frame`);
        },
        error: (why) => done(false, why),
      };
      const timer = setTimeout(() => { sub.terminate(); done(false, 'no first frame within 15 s'); }, 15000);
      ({ ws: openWs, sse: openSse }[this.kind] || openRaw)(subscriberUrl(i), sub, events, this);
    });
  }

  async openMany(count, conc, timeoutS) {
    const deadline = performance.now() + timeoutS * 1000;
    const end = this.next + count;
    const worker = async () => {
      while (this.next < end && performance.now() < deadline) {
        const sub = await this.connect(this.next++);
        if (sub) this.subs.push(sub); else this.failed++;
      }
    };
    await Promise.all(Array.from({ length: Math.max(1, Math.min(conc, count)) }, worker));
    if (this.next < end) { this.failed += end - this.next; this.next = end; }
  }

  async drop() {
    for (const s of this.subs.splice(0)) { s.closing = true; s.close(); }
    await sleep(100);
  }

  async mark(seq) { this.measureFrom = seq; return this.received; }
  get reads() { return stats.reads; }
  async count() { return this.received; }
  skip(seq) { this.skipped[seq] = 1; this.advance(); }
  get deflate() { return this.subs.some((s) => s.deflate); }
  async result() { return {}; }
  kill() {
    this.accepting = false;
    for (const s of this.subs) s.terminate();
  }
}

// With cfg.deflate (offering permessage-deflate, as browsers do) or receiver "ws": the ws package.
async function openWs(url, sub, events) {
  const { default: WebSocket } = await import('ws');
  const ws = new WebSocket(url, { perMessageDeflate: !!cfg.deflate, handshakeTimeout: 15000 });
  sub.close = () => ws.close();
  sub.terminate = () => ws.terminate();
  ws.on('message', (buf) => events.message(buf, ws.extensions.includes('permessage-deflate')));
  ws.on('close', (code) => events.close(code));
  ws.on('error', (err) => events.error(err.message));
}

// Receiver "raw": a minimal RFC 6455 client on a plain socket (no extensions). The socket reads
// into one shared buffer and calls back (`onread`: no stream, no Buffer per read); frames are
// parsed in place and only an incomplete tail is copied.
const READ_BUFFER = Buffer.allocUnsafe(256 * 1024);
const CRLF2 = Buffer.from('\r\n\r\n');

function sendFrame(socket, opcode, payload) {
  // A client frame: masked with a zero key (which leaves the payload as it is); control frames < 126 bytes.
  if (!socket.destroyed) socket.write(Buffer.concat([Buffer.from([0x80 | opcode, 0x80 | payload.length, 0, 0, 0, 0]), payload]));
}

function openRaw(url, sub, events, owner) {
  let closed = false;
  let upgraded = false;
  let pending = null; // bytes of an incomplete handshake response or frame (copied)
  let fragments = null; // payloads of a fragmented message
  const finish = (code) => { if (!closed) { closed = true; events.close(code); } };
  const fail = (why) => { closed = true; sock.destroy(); events.error(why); };

  // Frames in buf: returns where the incomplete tail starts, or -1 once closed.
  const frames = (buf) => {
    let pos = 0;
    const len = buf.length;
    while (len - pos >= 2) {
      const b0 = buf[pos];
      const b1 = buf[pos + 1];
      let size = b1 & 0x7f;
      let hdr = 2;
      if (size === 126) {
        if (len - pos < 4) break;
        size = buf.readUInt16BE(pos + 2);
        hdr = 4;
      } else if (size === 127) {
        if (len - pos < 10) break;
        size = Number(buf.readBigUInt64BE(pos + 2));
        hdr = 10;
      }
      if (b1 & 0x80) { sock.destroy(); finish(1002); return -1; } // a server never masks
      if (len - pos < hdr + size) break;
      const payload = buf.subarray(pos + hdr, pos + hdr + size);
      pos += hdr + size;
      const opcode = b0 & 0x0f;
      const fin = (b0 & 0x80) !== 0;
      if (opcode <= 0x2) {
        if (fin && fragments === null && opcode !== 0) { events.message(payload, false); continue; }
        (fragments ??= []).push(Buffer.from(payload));
        if (!fin) continue;
        const whole = Buffer.concat(fragments);
        fragments = null;
        events.message(whole, false);
      } else if (opcode === 0x9) {
        sendFrame(sock, 0xa, payload);
      } else if (opcode === 0x8) {
        const code = payload.length >= 2 ? payload.readUInt16BE(0) : 1005;
        sendFrame(sock, 0x8, payload.subarray(0, 2));
        sock.end();
        finish(code);
        return -1;
      }
    }
    return pos;
  };

  const keep = (buf, tail) => { if (tail >= 0 && tail < buf.length) pending = Buffer.from(buf.subarray(tail)); };

  const handshake = (buf) => {
    const end = buf.indexOf(CRLF2);
    if (end < 0) { pending = Buffer.from(buf); return; }
    const status = Number(buf.toString('latin1', 9, 12));
    if (status !== 101) { fail(`handshake answered HTTP ${status}`); return; }
    upgraded = true;
    const rest = buf.subarray(end + 4);
    keep(rest, frames(rest));
  };

  const sock = net.connect({
    host: url.hostname, port: Number(url.port), noDelay: true,
    onread: {
      buffer: READ_BUFFER,
      callback(nread, buf) {
        stats.reads++;
        if (closed) return;
        let data = buf.subarray(0, nread);
        if (pending !== null) { data = Buffer.concat([pending, data]); pending = null; }
        if (!upgraded) { handshake(data); return; }
        keep(data, frames(data));
      },
    },
  });
  sock.on('connect', () => {
    sock.write(`GET ${url.pathname}${url.search} HTTP/1.1\r\nHost: ${url.host}\r\nConnection: Upgrade\r\n`
      + 'Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n');
  });
  sock.on('close', () => {
    if (upgraded) finish(1006);
    else if (!closed) { closed = true; events.error('connection closed during the handshake'); }
  });
  sock.on('error', (err) => { if (!upgraded && !closed) { closed = true; events.error(err.message); } });
  sub.close = () => { sendFrame(sock, 0x8, Buffer.from([0x03, 0xe8])); sock.end(); };
  sub.terminate = () => sock.destroy();
}

// Receiver "sse": GET /v1/sse?topics=..&token=.. on a raw HTTP/1.1 socket (as openRaw: one shared
// read buffer, `onread`). The body is chunked (uvicorn streams without a length) or not; events
// end with a blank line; a comment (`: ping`) is skipped; the first event (`hello`) is the first
// frame, every other event's `data:` line (the last of an event) is a message, as a WebSocket
// frame's payload would be. A close is the end of the response (no code: 1006).
const LF2 = Buffer.from('\n\n');
const CRLF = Buffer.from('\r\n');
const SSE_DATA = Buffer.from('\ndata: ');

function openSse(url, sub, events) {
  const u = new URL(url);
  u.protocol = 'http:';
  u.pathname = u.pathname.replace(/\/ws$/, '/sse');
  let closed = false;
  let head = true; // before the end of the response head
  let chunked = false;
  let left = -1; // chunked: bytes left in this chunk; -1 a size line is next, -2 the CRLF after a chunk
  let pending = null; // undecoded bytes: an incomplete head or chunk framing (copied)
  let text = null; // decoded body bytes not yet a whole event (copied)
  const finish = (code) => { if (!closed) { closed = true; events.close(code); } };
  const fail = (why) => { closed = true; sock.destroy(); events.error(why); };

  const event = (ev) => {
    if (ev.length === 0 || ev[0] === 58) return; // a comment (": ping")
    const d = ev.indexOf(SSE_DATA);
    if (d >= 0) events.message(ev.subarray(d + SSE_DATA.length), false);
    else if (ev.indexOf('data: ') === 0) events.message(ev.subarray(6), false);
  };
  const body = (piece) => {
    const buf = text === null ? piece : Buffer.concat([text, piece]);
    text = null;
    let pos = 0;
    for (;;) {
      const end = buf.indexOf(LF2, pos);
      if (end < 0) break;
      event(buf.subarray(pos, end));
      if (closed) return;
      pos = end + 2;
    }
    if (pos < buf.length) text = Buffer.from(buf.subarray(pos));
  };
  // Chunked framing in buf: returns where an incomplete size line starts.
  const chunks = (buf) => {
    let pos = 0;
    while (pos < buf.length && !closed) {
      if (left > 0) {
        const n = Math.min(left, buf.length - pos);
        body(buf.subarray(pos, pos + n));
        pos += n;
        left -= n;
        if (left === 0) left = -2;
      } else if (left === -2) {
        if (buf.length - pos < 2) break;
        pos += 2;
        left = -1;
      } else {
        const eol = buf.indexOf(CRLF, pos);
        if (eol < 0) break;
        const size = parseInt(buf.toString('latin1', pos, eol), 16);
        pos = eol + 2;
        if (!(size > 0)) { sock.end(); finish(1000); return buf.length; } // the last chunk
        left = size;
      }
    }
    return pos;
  };
  const feed = (data) => {
    if (!chunked) { body(data); return; }
    const tail = chunks(data);
    if (tail < data.length && !closed) pending = Buffer.from(data.subarray(tail));
  };
  const response = (buf) => {
    const end = buf.indexOf(CRLF2);
    if (end < 0) { pending = Buffer.from(buf); return; }
    const status = Number(buf.toString('latin1', 9, 12));
    if (status !== 200) { fail(`event stream answered HTTP ${status}`); return; }
    chunked = /\r\ntransfer-encoding:\s*chunked/i.test(buf.toString('latin1', 0, end));
    head = false;
    feed(buf.subarray(end + 4));
  };

  const sock = net.connect({
    host: u.hostname, port: Number(u.port), noDelay: true,
    onread: {
      buffer: READ_BUFFER,
      callback(nread, buf) {
        stats.reads++;
        if (closed) return;
        let data = buf.subarray(0, nread);
        if (pending !== null) { data = Buffer.concat([pending, data]); pending = null; }
        if (head) response(data); else feed(data);
      },
    },
  });
  sock.on('connect', () => {
    sock.write(`GET ${u.pathname}${u.search} HTTP/1.1\r\nHost: ${u.host}\r\nAccept: text/event-stream\r\n\r\n`);
  });
  sock.on('close', () => {
    if (!head) finish(1006);
    else if (!closed) { closed = true; events.error('connection closed before the response'); }
  });
  sock.on('error', (err) => { if (head && !closed) { closed = true; events.error(err.message); } });
  sub.close = () => sock.end();
  sub.terminate = () => sock.destroy();
}

// ---- receiver: C (wsrecv) ------------------------------------------------------------------

class CReceiver {
  constructor(binary, total) {
    const u = new URL(cfg.wsUrl);
    this.pathsFile = path.join(fs.mkdtempSync(path.join(os.tmpdir(), 'wsrecv-')), 'paths');
    const lines = [];
    for (let i = 0; i < total; i++) {
      const url = subscriberUrl(i);
      lines.push(url.pathname + url.search);
    }
    fs.writeFileSync(this.pathsFile, lines.join('\n') + '\n');
    const args = [u.hostname, u.port || '80', this.pathsFile, String(maxSeq), cfg.userTopics ? '1' : '0'];
    this.proc = spawn(binary, args, {
      stdio: ['pipe', 'pipe', 'inherit'],
    });
    this.pid = this.proc.pid;
    this.total = total;
    this.open = 0;
    this.failed = 0;
    this.reads = 0; // socket reads, as of the last mark or count
    this.doneUpTo = 0;
    this.onDone = null;
    this.accepting = true;
    this.waiters = {}; // answer prefix -> resolve
    this.exited = new Promise((r) => this.proc.on('exit', r));
    this.proc.on('exit', (code) => { if (this.accepting) log(`wsrecv exited with ${code}`); });
    readline.createInterface({ input: this.proc.stdout }).on('line', (line) => this.line(line));
  }

  line(line) {
    const sp = line.indexOf(' ');
    const tag = sp < 0 ? line : line.slice(0, sp);
    const rest = sp < 0 ? '' : line.slice(sp + 1);
    if (tag === 'd') {
      this.doneUpTo = Number(rest);
      this.onDone?.(this.doneUpTo);
    } else if (tag === 'x') {
      this.open--;
      if (this.accepting) { closedEarly++; log(`a subscriber was closed by the server with ${rest}`); }
    } else if (tag === 'opened') {
      const [open, failed] = rest.split(' ').map(Number);
      this.open = open;
      this.failed = failed;
      this.answer('opened', null);
    } else if (tag === 'm' || tag === 'n') {
      const [received, reads] = rest.split(' ').map(Number);
      this.reads = reads;
      this.answer(tag, received);
    } else if (tag === 'dropped') {
      this.open = 0;
      this.answer('dropped', null);
    } else if (line.startsWith('{')) {
      this.answer('result', JSON.parse(line));
    }
  }

  answer(tag, value) {
    const resolve = this.waiters[tag];
    delete this.waiters[tag];
    resolve?.(value);
  }

  ask(command, tag) {
    return new Promise((resolve) => {
      this.waiters[tag] = resolve;
      this.proc.stdin.write(command + '\n');
    });
  }

  openMany(count, conc, timeoutS) { return this.ask(`open ${count} ${conc} ${timeoutS}`, 'opened'); }
  drop() { return this.ask('drop', 'dropped'); }
  mark(seq) { return this.ask(`mark ${seq}`, 'm'); }
  count() { return this.ask('count', 'n'); }
  skip(seq) { this.proc.stdin.write(`skip ${seq}\n`); }
  get deflate() { return false; }

  async result() {
    const r = await this.ask('result', 'result');
    for (const [bin, n] of r.hist) stats.hist[bin] += n;
    stats.latMax = Math.max(stats.latMax, r.lat_max);
    stats.latCount += r.lat_count;
    stats.outOfOrder += r.out_of_order;
    stats.misrouted += r.misrouted || 0;
    stats.frameBytes += r.frame_bytes;
    stats.frameSamples += r.frame_samples;
    this.received = r.received;
    return r;
  }

  kill() {
    this.accepting = false;
    if (this.proc.exitCode === null) this.proc.kill('SIGKILL');
    fs.rmSync(path.dirname(this.pathsFile), { recursive: true, force: true });
  }
}

// ---- publisher -----------------------------------------------------------------------------

const agent = new http.Agent({ keepAlive: true, maxSockets: cfg.publishSockets || 8 });
const publishUrl = new URL(cfg.publishUrl);
const publishToken = cfg.secret ? jwt({ sub: 'bench-publisher', scope: 'publish' }) : null;
// Pad the data so the notification frame (as notifier writes it) is about cfg.frameBytes long.
const FRAME_OVERHEAD = '{"type":"notification","id":"1000000","topic":"","data":{"seq":1000,"pad":""},"ts":1700000000000}'
  .length + (cfg.userTopics ? userTopic(Math.max(0, cfg.subscribers - 1)) : TOPIC).length;
// multi: every user's topic in each POST.
const MULTI_TOPICS = cfg.mode === 'multi'
  ? JSON.stringify(Array.from({ length: cfg.subscribers }, (_, i) => userTopic(i))) : null;
const pad = 'x'.repeat(Math.max(0, (cfg.frameBytes || 256) - FRAME_OVERHEAD));
let published = 0; // seqs 1..published have been posted
let publishErrors = 0;
let lastPublishError = '';

function publish() {
  const seq = ++published;
  expectCount[seq] = receiver.open;
  post(seq, 0);
  return seq;
}

function post(seq, attempt) {
  const data = `{"seq":${seq},"pad":"${pad}"}`;
  const body = MULTI_TOPICS ? `{"topics":${MULTI_TOPICS},"data":${data}}` : `{"topic":${JSON.stringify(TOPIC)},"data":${data}}`;
  const headers = { 'content-type': 'application/json', 'content-length': Buffer.byteLength(body) };
  if (publishToken) headers.authorization = `Bearer ${publishToken}`;
  let settled = false;
  const fail = (why) => {
    if (settled) return;
    settled = true;
    publishErrors++;
    lastPublishError = why;
    expectCount[seq] = 0; // nothing to expect from a notification that was not accepted
    receiver.skip(seq);
  };
  const req = http.request({
    agent, method: 'POST', host: publishUrl.hostname, port: publishUrl.port, path: publishUrl.pathname, headers,
  }, (res) => {
    settled = res.statusCode === 202 || res.statusCode === 200;
    res.resume();
    if (!settled) fail(`POST answered ${res.statusCode}`);
  });
  req.setTimeout(10000, () => req.destroy(new Error('POST timed out')));
  req.on('error', (err) => {
    // A keep-alive connection the server closed just as it was reused: the request never
    // reached the server (Node's documented race), so it is sent again, once.
    if (!settled && req.reusedSocket && err.code === 'ECONNRESET' && attempt === 0) {
      settled = true;
      post(seq, 1);
      return;
    }
    fail(err.message);
  });
  req.end(body);
}

function expectedTotal() {
  let n = 0;
  for (let s = 1; s <= published; s++) n += expectCount[s];
  return n;
}

async function drain(timeoutS) {
  const deadline = performance.now() + timeoutS * 1000;
  let got = await receiver.count();
  while (got < expectedTotal() && performance.now() < deadline) {
    await sleep(20);
    got = await receiver.count();
  }
  return { expected: expectedTotal(), received: got };
}

// personal: a minimal HTTP/1.1 client on raw keep-alive sockets (Node's http client costs the
// load generator's core several times what the server spends accepting one small POST). Each of
// cfg.publishSockets connections keeps cfg.pipeline requests in flight (HTTP/1.1 pipelining:
// the server answers in order); the next request on a connection is sent as an answer arrives.
let accepted = 0; // POSTs answered 2xx

class RawPublisher {
  constructor(nextBody, onAnswer) {
    this.nextBody = nextBody; // () => [seq, body] | null (nothing more to send)
    this.onAnswer = onAnswer; // (seq, ok, why) => void
    this.conns = [];
    this.reconnects = 0;
    this.stopped = false;
    this.auth = publishToken ? `Authorization: Bearer ${publishToken}\r\n` : '';
    this.head = `POST ${publishUrl.pathname} HTTP/1.1\r\nHost: ${publishUrl.host}\r\n`
      + `Content-Type: application/json\r\n${this.auth}Content-Length: `;
  }

  inFlight() { return this.conns.reduce((n, c) => n + c.queue.length, 0); }

  start(sockets, depth) {
    for (let k = 0; k < sockets; k++) this.open(depth);
  }

  open(depth) {
    const c = { queue: [], buf: null, sock: null, depth };
    c.sock = net.connect({ host: publishUrl.hostname, port: Number(publishUrl.port), noDelay: true });
    c.sock.on('connect', () => this.fill(c));
    c.sock.on('data', (chunk) => this.data(c, chunk));
    const gone = (why) => {
      if (c.closed) return;
      c.closed = true;
      this.conns.splice(this.conns.indexOf(c), 1);
      for (const seq of c.queue.splice(0)) this.onAnswer(seq, false, why);
      if (!this.stopped && this.reconnects < 100) { this.reconnects++; this.open(depth); }
    };
    c.sock.on('error', (err) => gone(err.message));
    c.sock.on('close', () => gone('publish connection closed by the server'));
    this.conns.push(c);
  }

  fill(c) {
    let out = '';
    while (!this.stopped && !c.closed && c.queue.length < c.depth) {
      const next = this.nextBody();
      if (next === null) break;
      const [seq, body] = next;
      c.queue.push(seq);
      out += `${this.head}${Buffer.byteLength(body)}\r\n\r\n${body}`;
    }
    if (out) c.sock.write(out);
  }

  data(c, chunk) {
    let buf = c.buf === null ? chunk : Buffer.concat([c.buf, chunk]);
    c.buf = null;
    for (;;) {
      const end = buf.indexOf(CRLF2);
      if (end < 0) break;
      const head = buf.toString('latin1', 0, end);
      const m = /\r\ncontent-length:\s*(\d+)/i.exec(head);
      if (m === null) { c.sock.destroy(new Error('an answer without content-length')); return; }
      const total = end + 4 + Number(m[1]);
      if (buf.length < total) break;
      const status = Number(head.slice(9, 12));
      const seq = c.queue.shift();
      if (seq !== undefined) {
        const ok = status === 202 || status === 200;
        this.onAnswer(seq, ok, ok ? '' : `POST answered ${status}`);
      }
      buf = buf.subarray(total);
    }
    if (buf.length) c.buf = Buffer.from(buf);
    this.fill(c);
  }

  stop() {
    this.stopped = true;
    for (const c of this.conns.splice(0)) { c.closed = true; c.sock.destroy(); }
  }
}

async function runPersonal(result) {
  const users = receiver.open;
  if (users < 1) throw new Error('no user connected');
  let stopAt = Infinity;
  let next = 0;
  const nextBody = () => {
    if (published >= maxSeq || performance.now() >= stopAt) return null;
    const seq = ++published;
    expectCount[seq] = 1;
    const topic = userTopic(next);
    next = (next + 1) % users;
    return [seq, `{"topic":"${topic}","data":{"seq":${seq},"pad":"${pad}"}}`];
  };
  const onAnswer = (seq, ok, why) => {
    if (ok) { accepted++; return; }
    publishErrors++;
    lastPublishError = why;
    expectCount[seq] = 0;
    receiver.skip(seq);
  };
  const pub = new RawPublisher(nextBody, onAnswer);
  const t0 = performance.now();
  pub.start(cfg.publishSockets || 32, cfg.pipeline || 4);
  const warmEnd = t0 + cfg.warmup * 1000;
  while (performance.now() < warmEnd && published < maxSeq) await sleep(10);
  await startMeasure();
  const acceptedAtMark = accepted;
  const endAt = performance.now() + cfg.duration * 1000;
  stopAt = endAt;
  while (performance.now() < endAt && !(published >= maxSeq && pub.inFlight() === 0)) await sleep(20);
  stopAt = 0; // nothing more is sent: wait for the answers in flight, then for their deliveries
  const stoppedAt = performance.now();
  const answersBy = stoppedAt + 15000;
  while (pub.inFlight() > 0 && pub.conns.length > 0 && performance.now() < answersBy) await sleep(5);
  const sendS = (stoppedAt - mark.t) / 1000;
  const acceptedInWindow = accepted - acceptedAtMark;
  await drain(cfg.drainTimeout || 5);
  const m = await endMeasure();
  const unanswered = pub.inFlight();
  pub.stop();
  if (unanswered) log(`${unanswered} POSTs unanswered`);
  result.accepted = accepted;
  result.accepted_in_window = acceptedInWindow;
  result.accepted_per_s = sendS > 0 ? Math.round(acceptedInWindow / sendS) : null;
  result.unanswered = unanswered;
  result.publish_reconnects = pub.reconnects;
  result.in_flight = (cfg.publishSockets || 32) * (cfg.pipeline || 4);
  return m;
}

// handshake: no subscribers held; the "receiver" only counts hellos for the measurement window.
class HandshakeCounter {
  constructor() { this.pid = null; this.open = 0; this.failed = 0; this.hellos = 0; this.reads = 0; }
  async mark() { return this.hellos; }
  async count() { return this.hellos; }
  skip() {}
  get deflate() { return false; }
  async result() { return {}; }
  kill() {}
}

// handshake with wsrecv (cfg.receiver "c"): the loop runs in C (command "hs"); this process
// only marks the window and reads the counts.
async function runHandshakeC(result) {
  const conc = Math.max(1, cfg.concurrency || 64);
  receiver.proc.stdin.write(`hs ${conc} ${maxSeq}\n`);
  const warmEnd = performance.now() + cfg.warmup * 1000;
  while (performance.now() < warmEnd) await sleep(10);
  await startMeasure();
  const endAt = performance.now() + cfg.duration * 1000;
  while (performance.now() < endAt) await sleep(20);
  const m = await endMeasure();
  receiver.proc.stdin.write('hsstop\n');
  result.handshakes_in_window = m.deliveries;
  result.handshakes_per_s = m.seconds > 0 ? Math.round(m.deliveries / m.seconds) : null;
  result.concurrency = conc;
  result.tokens = receiver.total;
  return m;
}

async function runHandshake(result) {
  if (receiver instanceof CReceiver) return runHandshakeC(result);
  const counter = receiver;
  const url = new URL(cfg.wsUrl);
  const host = url.hostname;
  const port = Number(url.port);
  const maxCount = maxSeq;
  // Distinct users, pre-minted: a bounded pool of request heads, reused in a cycle (a user is
  // never connected twice at once unless the pool is smaller than the concurrency).
  const poolSize = Math.max(1, Math.min(cfg.tokens || 20000, maxCount));
  const heads = [];
  for (let i = 0; i < poolSize; i++) {
    const u = subscriberUrl(i);
    heads.push(`GET ${u.pathname}${u.search} HTTP/1.1\r\nHost: ${url.host}\r\nConnection: Upgrade\r\n`
      + 'Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n');
  }
  const CLOSE = Buffer.from([0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe8]); // masked (zero key), code 1000
  const failures = {};
  let measuring = false;
  let started = 0;
  const fail = (kind) => { failures[kind] = (failures[kind] || 0) + 1; };

  // One handshake: connect, upgrade, first frame, close (our close frame, then the server's
  // close and FIN, so the TIME_WAIT stays on the server side). Resolves when the socket is gone.
  const one = (k) => new Promise((resolve) => {
    const t0 = performance.now();
    const inWindow = measuring;
    let buf = null;
    let upgraded = false;
    let hello = false;
    let over = false;
    const sock = net.connect({ host, port, noDelay: true });
    const finish = (kind) => {
      if (over) return;
      over = true;
      clearTimeout(timer);
      if (kind) fail(kind);
      sock.destroy();
      resolve();
    };
    const timer = setTimeout(() => finish(hello ? 'close_timeout' : 'timeout'), 10000);
    sock.on('connect', () => sock.write(heads[k % poolSize]));
    sock.on('data', (chunk) => {
      if (hello) return; // the server's close frame: its FIN follows
      buf = buf === null ? chunk : Buffer.concat([buf, chunk]);
      if (!upgraded) {
        const end = buf.indexOf(CRLF2);
        if (end < 0) return;
        const status = Number(buf.toString('latin1', 9, 12));
        if (status !== 101) { finish(`http_${status}`); return; }
        upgraded = true;
        buf = buf.subarray(end + 4);
      }
      if (buf.length < 2) return;
      let size = buf[1] & 0x7f;
      let hdr = 2;
      if (size === 126) { if (buf.length < 4) return; size = buf.readUInt16BE(2); hdr = 4; }
      else if (size === 127) { if (buf.length < 10) return; size = Number(buf.readBigUInt64BE(2)); hdr = 10; }
      if (buf.length < hdr + size) return;
      if ((buf[0] & 0x0f) === 0x8) { finish('closed_before_hello'); return; }
      hello = true;
      const lat = performance.now() - t0;
      counter.hellos++;
      if (inWindow && measuring) {
        stats.hist[Math.min(HIST_BINS - 1, Math.floor(lat / HIST_STEP_MS))]++;
        if (lat > stats.latMax) stats.latMax = lat;
        stats.latCount++;
      }
      sock.write(CLOSE);
    });
    sock.on('end', () => finish(hello ? null : (upgraded ? 'closed_before_hello' : 'closed_before_upgrade')));
    sock.on('close', () => finish(hello ? null : 'closed_before_hello'));
    sock.on('error', (err) => finish(hello ? null : (err.code || 'socket_error')));
  });

  let stop = false;
  const worker = async () => {
    while (!stop && started < maxCount) await one(started++);
  };
  const t0 = performance.now();
  const workers = Promise.all(Array.from({ length: Math.max(1, cfg.concurrency || 64) }, worker));
  const warmEnd = t0 + cfg.warmup * 1000;
  while (performance.now() < warmEnd && started < maxCount) await sleep(10);
  measuring = true;
  await startMeasure();
  const failedAtMark = Object.values(failures).reduce((a, b) => a + b, 0);
  const endAt = performance.now() + cfg.duration * 1000;
  while (performance.now() < endAt && started < maxCount) await sleep(20);
  const m = await endMeasure();
  measuring = false;
  stop = true;
  await Promise.race([workers, sleep(15000)]);
  result.handshakes = counter.hellos;
  result.handshakes_in_window = m.deliveries;
  result.handshakes_per_s = m.seconds > 0 ? Math.round(m.deliveries / m.seconds) : null;
  result.handshake_failures = failures;
  result.failed_in_window = Object.values(failures).reduce((a, b) => a + b, 0) - failedAtMark;
  result.attempted = started;
  result.tokens = poolSize;
  result.concurrency = cfg.concurrency || 64;
  return m;
}

// presence: cfg.subscribers listeners (presence=1) on TOPIC, held by the JS receiver; churners
// open and close WebSockets on TOPIC as users churn<k> (k cycles over cfg.tokens users, so one
// user comes back only after the others had their turn). Each join and leave the broker sees is
// one frame to every listener: events delivered = join + leave frames received by listeners.
async function runPresence(result) {
  const url = new URL(cfg.wsUrl);
  const conc = Math.max(1, cfg.concurrency || 8);
  const pool = Math.max(conc * 4, cfg.tokens || 1000);
  const holdMs = cfg.holdMs ?? 200;
  const heads = [];
  for (let k = 0; k < pool; k++) {
    const q = new URLSearchParams({ topics: TOPIC, token: jwt({ sub: `churn${k}`, scope: 'subscribe' }) });
    heads.push(`GET ${url.pathname}?${q} HTTP/1.1\r\nHost: ${url.host}\r\nConnection: Upgrade\r\n`
      + 'Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n');
  }
  const CLOSE = Buffer.from([0x88, 0x82, 0, 0, 0, 0, 0x03, 0xe8]);
  const failures = {};
  let started = 0;
  let cycles = 0;
  const maxCycles = maxSeq;
  const one = (n) => new Promise((resolve) => {
    const k = n % pool;
    let buf = null;
    let hello = false;
    let over = false;
    let hold = null;
    const sock = net.connect({ host: url.hostname, port: Number(url.port), noDelay: true });
    const finish = (kind) => {
      if (over) return;
      over = true;
      clearTimeout(timer);
      clearTimeout(hold);
      if (kind) failures[kind] = (failures[kind] || 0) + 1; else cycles++;
      sock.destroy();
      resolve();
    };
    const timer = setTimeout(() => finish(hello ? 'close_timeout' : 'timeout'), 10000 + holdMs);
    sock.on('connect', () => sock.write(heads[k]));
    sock.on('data', (chunk) => {
      if (hello) return;
      buf = buf === null ? chunk : Buffer.concat([buf, chunk]);
      const end = buf.indexOf(CRLF2);
      if (end < 0) return;
      if (Number(buf.toString('latin1', 9, 12)) !== 101) { finish(`http_${buf.toString('latin1', 9, 12)}`); return; }
      if (buf.length < end + 6) return;
      hello = true;
      churnHelloAt.set(k, nowMs());
      hold = setTimeout(() => sock.write(CLOSE), holdMs);
    });
    sock.on('end', () => finish(hello ? null : 'closed_before_hello'));
    sock.on('close', () => finish(hello ? null : 'closed_before_hello'));
    sock.on('error', (err) => finish(hello ? null : (err.code || 'socket_error')));
  });
  let stop = false;
  const worker = async () => { while (!stop && started < maxCycles) await one(started++); };
  const t0 = performance.now();
  const workers = Promise.all(Array.from({ length: conc }, worker));
  while (performance.now() < t0 + cfg.warmup * 1000 && started < maxCycles) await sleep(10);
  const before = presenceStats.joins + presenceStats.leaves;
  const cyclesBefore = cycles;
  presenceMeasuring = true;
  await startMeasure();
  const endAt = performance.now() + cfg.duration * 1000;
  while (performance.now() < endAt && started < maxCycles) await sleep(20);
  const m = await endMeasure();
  const events = presenceStats.joins + presenceStats.leaves - before;
  presenceMeasuring = false;
  stop = true;
  await Promise.race([workers, sleep(15000)]);
  m.deliveries = events;
  result.presence_events = { joins: presenceStats.joins, leaves: presenceStats.leaves, in_window: events };
  result.churn_cycles_per_s = m.seconds > 0 ? Math.round((cycles - cyclesBefore) / m.seconds) : null;
  result.handshake_failures = failures;
  result.concurrency = conc;
  result.hold_ms = holdMs;
  return m;
}

// ---- measurement ---------------------------------------------------------------------------

let mark = null;
let profiler = null; // cfg.profile: a command (py-spy record) run over the measurement window

async function startMeasure() {
  if (cfg.profile) {
    profiler = spawn(cfg.profile[0], cfg.profile.slice(1), { stdio: ['ignore', 'ignore', 'inherit'] });
    profiler.exited = new Promise((r) => profiler.on('exit', r));
  }
  const seq = published + 1;
  const received = await receiver.mark(seq);
  mark = { t: performance.now(), received, reads: receiver.reads, ...sample() };
}

async function endMeasure() {
  const received = await receiver.count();
  const t = performance.now();
  const s = sample();
  if (profiler !== null) {
    profiler.kill('SIGINT'); // py-spy record writes its output on SIGINT
    await Promise.race([profiler.exited, sleep(20000)]);
    profiler = null;
  }
  const seconds = (t - mark.t) / 1000;
  const delta = (a, b) => Object.fromEntries(Object.keys(a).map((k) => [k, +(a[k] - b[k]).toFixed(3)]));
  return {
    seconds, deliveries: received - mark.received, cpu: delta(s.cpu, mark.cpu), wait: delta(s.wait, mark.wait),
    split: { user: +(s.split[0] - mark.split[0]).toFixed(3), sys: +(s.split[1] - mark.split[1]).toFixed(3) },
    reads: receiver.reads - mark.reads,
  };
}

// ---- modes ---------------------------------------------------------------------------------

async function runFanout(result) {
  const window = cfg.window || 8;
  const stallMs = (cfg.stallTimeout || 5) * 1000;
  let lastProgress = performance.now();
  let stopPublishing = false;
  let finished = null;
  const allDone = new Promise((r) => { finished = r; });
  const pump = () => {
    lastProgress = performance.now();
    const done = receiver.doneUpTo;
    if (stopPublishing || published >= maxSeq) {
      if (done >= published) finished();
      return;
    }
    while (published - done < window && published < maxSeq) publish();
  };
  receiver.onDone = pump;

  const t0 = performance.now();
  pump();
  // Warm-up: until `warmup` seconds have passed or a tenth of the notifications are through.
  const warmEnd = t0 + cfg.warmup * 1000;
  const warmSeqs = Math.max(1, Math.floor(maxSeq / 10));
  while (performance.now() < warmEnd && receiver.doneUpTo < warmSeqs) {
    if (performance.now() - lastProgress > stallMs) break;
    await sleep(5);
  }
  await startMeasure();
  const endAt = performance.now() + cfg.duration * 1000;
  let stalled = false;
  while (performance.now() < endAt) {
    const r = await Promise.race([sleep(50).then(() => 'tick'), allDone.then(() => 'done')]);
    if (r === 'done') break;
    if (performance.now() - lastProgress > stallMs) { stalled = true; log('fanout stalled'); break; }
  }
  stopPublishing = true;
  const m = await endMeasure();
  result.stalled = stalled;
  result.window = window;
  result.publish_s = +((performance.now() - t0) / 1000).toFixed(3);
  return m;
}

async function runSteady(result) {
  const rate = cfg.rate || 20;
  const t0 = performance.now();
  const warmEnd = t0 + cfg.warmup * 1000;
  const end = warmEnd + cfg.duration * 1000;
  let k = 0;
  let measuring = false;
  let late = 0;
  while (published < maxSeq) {
    const due = t0 + (k * 1000) / rate;
    if (due >= end) break;
    if (!measuring && due >= warmEnd) { await startMeasure(); measuring = true; }
    const wait = due - performance.now();
    if (wait > 0) await sleep(wait); else if (wait < -50) late++;
    publish();
    k++;
  }
  if (!measuring) await startMeasure();
  const wait = end - performance.now();
  if (wait > 0 && published < maxSeq) await sleep(wait);
  // Deliveries of the last notifications land after the last publish: the window ends once they
  // are in (or after the drain timeout), so deliveries/s is what was published over the window.
  await drain(cfg.drainTimeout || 5);
  const m = await endMeasure();
  result.rate = rate;
  result.late_publishes = late;
  return m;
}

async function runIdle(result) {
  const conc = cfg.connectConcurrency || 100;
  const timeout = cfg.connectTimeout || 120;
  // Warm-up: a few connections opened and closed (lazy imports, first-use caches), then RSS.
  await receiver.openMany(Math.min(10, cfg.subscribers), conc, timeout);
  await receiver.drop();
  await sleep(cfg.settle * 1000);
  const steps = [{ connections: 0, rss_kib: serverRss() }];
  const total = cfg.subscribers;
  const nSteps = Math.max(1, Math.min(cfg.steps || 10, total));
  let opened = 0;
  let connecting = 0;
  for (let s = 1; s <= nSteps; s++) {
    const target = Math.round((total * s) / nSteps);
    const t = performance.now();
    await receiver.openMany(target - opened, conc, timeout);
    connecting += performance.now() - t;
    opened = target;
    await sleep(cfg.settle * 1000);
    steps.push({ connections: receiver.open, rss_kib: serverRss() });
    log(`idle: ${receiver.open} connections, server RSS ${steps.at(-1).rss_kib} KiB`);
  }
  result.connect_errors = receiver.failed;
  result.connect_s = +(connecting / 1000).toFixed(3);
  result.rss_steps = steps;
  const last = steps.at(-1);
  result.rss_before_kib = steps[0].rss_kib;
  result.rss_after_kib = last.rss_kib;
  result.kib_per_connection = last.connections
    ? +((last.rss_kib - steps[0].rss_kib) / last.connections).toFixed(2) : null;
  // Every one of them is live and subscribed: one notification must reach each.
  await receiver.mark(1);
  publish();
  return drain(cfg.drainTimeout || 5);
}

// ---- main ----------------------------------------------------------------------------------

function makeReceiver() {
  const want = cfg.deflate ? 'ws' : (cfg.receiver || 'raw');
  let total = cfg.subscribers + (cfg.mode === 'idle' ? 10 : 0);
  if (cfg.mode === 'handshake') {
    // wsrecv runs the handshake loop over a pool of distinct users (one token each).
    if (want !== 'c' || !cfg.wsrecv || !fs.existsSync(cfg.wsrecv)) return new HandshakeCounter();
    total = Math.max(1, Math.min(cfg.tokens || 20000, maxSeq));
  }
  if (want === 'c') {
    if (cfg.wsrecv && fs.existsSync(cfg.wsrecv)) return new CReceiver(cfg.wsrecv, total);
    log('wsrecv is not built: using the JavaScript receiver');
  }
  return new JsReceiver(want === 'ws' || want === 'sse' ? want : 'raw');
}

async function main() {
  receiver = makeReceiver();
  const result = { mode: cfg.mode, subscribers: cfg.subscribers, receiver: receiver.pid ? 'c' : receiver.kind };
  const tStart = performance.now();
  const start = sample();
  let counted;
  if (cfg.mode === 'idle') {
    counted = await runIdle(result);
  } else {
    let m;
    if (cfg.mode === 'handshake') {
      result.receiver = receiver instanceof CReceiver ? 'c' : 'raw';
      m = await runHandshake(result);
      counted = { expected: null, received: null };
    } else {
      await receiver.openMany(cfg.subscribers, cfg.connectConcurrency || 100, cfg.connectTimeout || 120);
      result.connect_errors = receiver.failed;
      result.connect_s = +((performance.now() - tStart) / 1000).toFixed(3);
      log(`${receiver.open}/${cfg.subscribers} subscribers connected in ${result.connect_s} s`);
      const run = { fanout: runFanout, multi: runFanout, personal: runPersonal, presence: runPresence }[cfg.mode]
        || runSteady;
      m = await run(result);
      counted = cfg.mode === 'presence' ? { expected: null, received: null } : await drain(cfg.drainTimeout || 5);
    }
    result.measure_s = +m.seconds.toFixed(3);
    result.measured_deliveries = m.deliveries;
    result.deliveries_per_s = m.seconds > 0 ? Math.round(m.deliveries / m.seconds) : null;
    result.cpu_s = m.cpu;
    result.run_queue_wait_s = m.wait;
    result.loadgen_user_sys_s = m.split;
    result.loadgen_cpu_util = m.seconds > 0 ? +(m.cpu.loadgen / m.seconds).toFixed(3) : null;
    result.server_cpu_util = m.seconds > 0 && 'server' in m.cpu ? +(m.cpu.server / m.seconds).toFixed(3) : null;
    // Busy: running or waiting for the core, as a share of the window. Near 1 the process was
    // the limit, or starved by others (run_queue_wait_s says which).
    // The load generator's: the busier of its processes (each waits while the other runs).
    const busy = (k) => (m.seconds > 0 && k in m.cpu ? +((m.cpu[k] + m.wait[k]) / m.seconds).toFixed(3) : null);
    result.loadgen_busy = Math.max(busy('node'), busy('wsrecv') ?? 0);
    result.server_busy = busy('server');
    result.rss_kib = serverRss();
    result.reads_in_window = m.reads;
  }
  result.connected = receiver.open;
  result.closed_early = closedEarly;
  result.deflate = receiver.deflate;
  const end = sample();
  result.loadgen_total_cpu_s = +(end.cpu.loadgen - start.cpu.loadgen).toFixed(3);
  result.loadgen_total_s = +((performance.now() - tStart) / 1000).toFixed(3);
  receiver.accepting = false;
  const last = await receiver.result();
  if (cfg.mode === 'handshake' && last.hs_failures !== undefined) {
    result.handshakes = last.received;
    result.handshake_failures = last.hs_failures;
    result.attempted = last.hs_started;
  }
  result.published = published;
  result.publish_errors = publishErrors;
  if (publishErrors) result.last_publish_error = lastPublishError;
  result.expected = counted.expected;
  result.received = counted.received;
  result.lost = counted.expected === null ? null : counted.expected - counted.received;
  result.out_of_order = stats.outOfOrder;
  result.misrouted = cfg.userTopics && cfg.mode !== 'handshake' ? stats.misrouted : null;
  result.latency_count = stats.latCount;
  result.p50_ms = quantile(0.5);
  result.p90_ms = quantile(0.9);
  result.p99_ms = quantile(0.99);
  result.max_ms = stats.latCount ? +stats.latMax.toFixed(3) : null;
  result.cdf = latencyCdf();
  result.frame_bytes = stats.frameSamples ? Math.round(stats.frameBytes / stats.frameSamples) : null;
  receiver.kill();
  agent.destroy();
  process.stdout.write(JSON.stringify(result) + '\n', () => process.exit(0));
}

main().catch((err) => {
  process.stderr.write(`loadgen: ${err.stack || err}\n`);
  receiver?.kill();
  process.stdout.write(JSON.stringify({ error: String(err) }) + '\n', () => process.exit(2));
});
