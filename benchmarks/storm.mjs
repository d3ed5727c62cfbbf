// Load generator of the `storm` scenario (driven by `python -m benchmarks.storm`, not run by hand).
//
//   node benchmarks/storm.mjs '<config JSON>'
//
// Holds N WebSocket clients through nginx, each with its own token (sub storm<i>) on its own
// topic user:storm<i> (plus the shared topic storm.all), publishes open loop over HTTP to the
// surviving instances, kills one instance (cfg.killPid, its own process group) with SIGKILL or
// SIGTERM, and follows every client back: a dropped client reconnects as the shipped clients do
// (delay = min(maxDelay, minDelay * 2^attempt) * (0.5 + random/2), attempt reset by a hello),
// with `since=<topic>:<last id>` for its topics, and must get `recovered: true`. After the storm
// it publishes a little longer, waits for the deliveries to settle, and checks every client got
// every accepted notification of its topics exactly once, in order. Writes one JSON object to
// cfg.resultFile. Progress goes to stderr. Every loop is bounded; `hardTimeout` ends it all.
//
// The WebSocket client is the minimal RFC 6455 client of loadgen.mjs's raw receiver (net
// sockets with `onread`, frames parsed in place), extended with handshake status reporting.

import crypto from 'node:crypto';
import fs from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import { performance } from 'node:perf_hooks';
import { cpuSeconds as procCpuSeconds, runWait, statFields } from './procstat.mjs';

const cfg = JSON.parse(process.argv[2]);
const N = cfg.clients;
const CLK_TCK = cfg.clkTck || 100;
const SHARED = cfg.shared === false ? null : 'storm.all';
// Clients 0..PRESENCE_LISTENERS-1 ask `presence=1`: the join and leave events of storm.all's (and
// their own topic's) other users, counted, not checked.
const PRESENCE_LISTENERS = Math.min(N, cfg.presenceListeners || 0);
const MIN_DELAY = cfg.minDelay ?? 500; // ms: notifier.js's and client.py's defaults
const MAX_DELAY = cfg.maxDelay ?? 30000;
// A handshake given up (and retried with backoff) when no hello came within this: notifier.js
// has no such limit (a browser waits), client.py's open_timeout is 10 s (until the 101).
const HELLO_TIMEOUT_S = cfg.helloTimeoutS ?? 30;

const t0 = performance.now();
const now = () => performance.now(); // ms, monotonic
const log = (...a) => {
  if (!cfg.quiet) process.stderr.write(`storm ${((now() - t0) / 1000).toFixed(2)}s: ${a.join(' ')}\n`);
};
const sleep = (ms) => new Promise((r) => setTimeout(r, ms));

function finish(result, code = 0) {
  fs.writeFileSync(cfg.resultFile, JSON.stringify(result) + '\n');
  process.exit(code);
}

const hard = setTimeout(() => {
  process.stderr.write('storm: hard timeout reached, exiting\n');
  finish({ error: 'hard timeout', phase }, 3);
}, (cfg.hardTimeout || 300) * 1000);
hard.unref();

// ---- /proc ---------------------------------------------------------------------------------

const cpuSeconds = (pid) => procCpuSeconds(pid, CLK_TCK);

const sumWait = (pids) => (pids || []).reduce((s, p) => s + runWait(p), 0);
const sumCpu = (pids) => (pids || []).reduce((s, p) => s + cpuSeconds(p), 0);

function dead(pid) {
  try {
    return statFields(pid)[0] === 'Z'; // a zombie: exited, not reaped yet (the suite reaps it)
  } catch {
    return true;
  }
}

function selfCpu() {
  const u = process.cpuUsage();
  return (u.user + u.system) / 1e6;
}

function sample() {
  return {
    at: now(),
    survivors: sumCpu(cfg.survivorPids),
    survivorsWait: sumWait(cfg.survivorPids),
    killed: cpuSeconds(cfg.killPid),
    nginx: sumCpu(cfg.nginxPids),
    redis: sumCpu(cfg.redisPids),
    loadgen: selfCpu(),
  };
}

function delta(a, b) {
  const out = { seconds: (b.at - a.at) / 1000 };
  for (const k of ['survivors', 'survivorsWait', 'killed', 'nginx', 'redis', 'loadgen']) out[k] = +(b[k] - a[k]).toFixed(3);
  return out;
}

// ---- tokens --------------------------------------------------------------------------------

const b64url = (s) => Buffer.from(s).toString('base64url');
function jwt(claims) {
  const head = b64url(JSON.stringify({ alg: 'HS256', typ: 'JWT' }));
  const body = b64url(JSON.stringify({ exp: Math.floor(Date.now() / 1000) + 3600, ...claims }));
  const sig = crypto.createHmac('sha256', cfg.secret).update(`${head}.${body}`).digest('base64url');
  return `${head}.${body}.${sig}`;
}

// ---- clients -------------------------------------------------------------------------------

const wsUrl = new URL(cfg.wsUrl);
const MAX_ALL = Math.max(1, Math.ceil((cfg.allRate || 0) * (cfg.maxPublishS || 600)) + 1);

class Client {
  constructor(i) {
    this.i = i;
    this.topic = `user:storm${i}`;
    this.token = jwt({ sub: `storm${i}`, scope: 'subscribe' });
    // Positions: id of the last notification received per topic. Nothing is published before
    // every client has its first hello, so 0 ("everything retained", i.e. nothing) is exact.
    this.posUser = '0';
    this.posAll = '0';
    this.lastUser = 0; // numeric ids, for the order check
    this.lastAll = 0;
    this.userSeqs = []; // seqs received on user:storm<i>
    this.open = false;
    this.socket = null;
    this.attempt = 0;
    this.attempts = 0; // handshakes tried after the kill
    this.connections = 0; // hellos received
    this.dropped = false; // lost its socket after the kill
    this.dropAt = 0;
    this.dropCode = 0;
    this.backAt = 0;
    this.recovered = null; // of the last hello
    this.timer = null;
  }

  url() {
    const since = [`${this.topic}:${this.posUser}`];
    if (SHARED) since.push(`${SHARED}:${this.posAll}`);
    const q = new URLSearchParams({ token: this.token, since: since.join(',') });
    if (SHARED) q.set('topics', SHARED);
    if (this.i < PRESENCE_LISTENERS) q.set('presence', '1');
    return `${wsUrl.pathname}?${q}`;
  }
}

const clients = Array.from({ length: N }, (_, i) => new Client(i));
let openCount = 0;
let handshaking = 0; // handshakes under way
let droppedCount = 0; // clients that lost their socket after the kill
let stormEnd = 0; // ms when every client was back
let killAt = 0; // ms (performance.now) of the kill, 0 before
let stopping = false;
const presenceEvents = { join: 0, leave: 0 }; // frames received by the presence listeners
const counters = {
  handshakeFailures: {}, // by HTTP status or kind, after the kill
  initialFailures: {}, // the same while the clients first connect
  closeCodes: {}, // of the sockets dropped after the kill
  recoveredFalse: 0,
  recoveredFalseClients: [],
  recoveredMissing: 0, // a reconnect hello without `recovered`
  reconnects: 0, // hellos after the kill
  outOfOrder: 0,
  unexpected: 0, // a notification nobody published (or published unaccepted)
  framesReceived: 0,
  closedBeforeKill: 0,
  lateDrops: [], // sockets dropped after everyone was back
  dropsAgain: 0, // a reconnected client dropped again
  dropsAgainSamples: [],
};
const bump = (obj, key) => { obj[key] = (obj[key] || 0) + 1; };
const allCounts = new Uint8Array(N * MAX_ALL); // receipts of storm.all seq s by client i

function scheduleReconnect(c) {
  if (stopping) return;
  const ceiling = Math.min(MAX_DELAY, MIN_DELAY * 2 ** c.attempt++);
  const delay = Math.round(ceiling * (0.5 + Math.random() / 2)); // jitter, as notifier.js
  c.timer = setTimeout(() => { c.timer = null; connect(c); }, delay);
}

function onHello(c, msg) {
  c.open = true;
  c.attempt = 0;
  c.connections++;
  openCount++;
  if (killAt) {
    if (c.dropped && !c.backAt) c.backAt = now();
    counters.reconnects++;
    if (msg.recovered === false) {
      counters.recoveredFalse++;
      if (counters.recoveredFalseClients.length < 50) {
        counters.recoveredFalseClients.push({ client: c.i, since: c.sentSince, hello: msg });
      }
    } else if (msg.recovered !== true) {
      counters.recoveredMissing++;
    }
  }
  c.recovered = msg.recovered;
}

function onNotification(c, msg) {
  counters.framesReceived++;
  const id = Number(msg.id);
  const seq = msg.data && msg.data.seq;
  if (msg.topic === c.topic) {
    if (id <= c.lastUser) counters.outOfOrder++;
    c.lastUser = Math.max(c.lastUser, id);
    c.posUser = msg.id;
    c.userSeqs.push(seq);
  } else if (msg.topic === SHARED) {
    if (id <= c.lastAll) counters.outOfOrder++;
    c.lastAll = Math.max(c.lastAll, id);
    c.posAll = msg.id;
    if (Number.isInteger(seq) && seq >= 1 && seq < MAX_ALL) {
      const k = c.i * MAX_ALL + seq;
      if (allCounts[k] < 255) allCounts[k]++;
    } else counters.unexpected++;
  } else {
    counters.unexpected++;
  }
}

function onClosed(c, code) {
  // The socket of an open client ended (close frame, or the connection dropped: 1006).
  c.open = false;
  c.socket = null;
  openCount--;
  if (stopping) return;
  if (killAt) {
    if (stormEnd && counters.lateDrops.length < 20) {
      counters.lateDrops.push({ client: c.i, code, after_kill_s: +((now() - killAt) / 1000).toFixed(3), first: !c.dropped });
    }
    if (!c.dropped) {
      c.dropped = true;
      droppedCount++;
      c.dropAt = now();
      c.dropCode = code;
    }
    else {
      counters.dropsAgain++;
      if (counters.dropsAgainSamples.length < 20) {
        counters.dropsAgainSamples.push({ client: c.i, code, after_kill_s: +((now() - killAt) / 1000).toFixed(3) });
      }
    }
    bump(counters.closeCodes, code);
  } else {
    counters.closedBeforeKill++;
    log(`client ${c.i} closed with ${code} before the kill`);
  }
  scheduleReconnect(c);
}

function onFailed(c, why) {
  // A handshake that did not give a hello: retried with backoff, as the shipped clients do.
  c.socket = null;
  bump(killAt ? counters.handshakeFailures : counters.initialFailures, why);
  scheduleReconnect(c);
}

const READ_BUFFER = Buffer.allocUnsafe(256 * 1024);
const CRLF2 = Buffer.from('\r\n\r\n');

function sendFrame(socket, opcode, payload) {
  // A client frame, masked with a zero key (the payload stays as it is); control frames only.
  if (!socket.destroyed) socket.write(Buffer.concat([Buffer.from([0x80 | opcode, 0x80 | payload.length, 0, 0, 0, 0]), payload]));
}

function connect(c) {
  if (stopping) return;
  if (killAt) c.attempts++;
  handshaking++;
  c.sentSince = c.url().match(/since=([^&]*)/)[1];
  let upgraded = false;
  let hello = false;
  let done = false;
  let pending = null;
  let fragments = null;
  const end = (code) => {
    if (done) return;
    done = true;
    clearTimeout(timer);
    if (hello) onClosed(c, code);
    else { handshaking--; onFailed(c, `closed ${code}`); }
  };
  const fail = (why) => {
    if (done) return;
    done = true;
    clearTimeout(timer);
    sock.destroy();
    handshaking--;
    onFailed(c, why);
  };
  const message = (payload) => {
    let msg;
    try { msg = JSON.parse(payload.toString('utf8')); } catch { counters.unexpected++; return; }
    if (!hello) {
      if (msg.type !== 'hello') { fail(`first frame ${msg.type}`); return; }
      hello = true;
      handshaking--;
      clearTimeout(timer);
      onHello(c, msg);
      return;
    }
    if (msg.type === 'notification') onNotification(c, msg);
    else if (msg.type === 'join' || msg.type === 'leave') presenceEvents[msg.type]++;
  };
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
      if (b1 & 0x80) { sock.destroy(); end(1002); return -1; }
      if (len - pos < hdr + size) break;
      const payload = buf.subarray(pos + hdr, pos + hdr + size);
      pos += hdr + size;
      const opcode = b0 & 0x0f;
      const fin = (b0 & 0x80) !== 0;
      if (opcode <= 0x2) {
        if (fin && fragments === null && opcode !== 0) { message(payload); if (done) return -1; continue; }
        (fragments ??= []).push(Buffer.from(payload));
        if (!fin) continue;
        const whole = Buffer.concat(fragments);
        fragments = null;
        message(whole);
        if (done) return -1;
      } else if (opcode === 0x9) {
        sendFrame(sock, 0xa, payload);
      } else if (opcode === 0x8) {
        const code = payload.length >= 2 ? payload.readUInt16BE(0) : 1005;
        sendFrame(sock, 0x8, payload.subarray(0, 2));
        sock.end();
        end(code);
        return -1;
      }
    }
    return pos;
  };
  const keep = (buf, tail) => { if (tail >= 0 && tail < buf.length) pending = Buffer.from(buf.subarray(tail)); };
  const handshake = (buf) => {
    const stop = buf.indexOf(CRLF2);
    if (stop < 0) { pending = Buffer.from(buf); return; }
    const status = Number(buf.toString('latin1', 9, 12));
    if (status !== 101) { fail(`HTTP ${status}`); return; }
    upgraded = true;
    const rest = buf.subarray(stop + 4);
    keep(rest, frames(rest));
  };
  const sock = net.connect({
    host: wsUrl.hostname, port: Number(wsUrl.port), noDelay: true,
    onread: {
      buffer: READ_BUFFER,
      callback(nread, buf) {
        if (done) return;
        let data = buf.subarray(0, nread);
        if (pending !== null) { data = Buffer.concat([pending, data]); pending = null; }
        if (!upgraded) { handshake(data); return; }
        keep(data, frames(data));
      },
    },
  });
  c.socket = sock;
  const timer = setTimeout(() => fail(`no hello within ${HELLO_TIMEOUT_S} s`), HELLO_TIMEOUT_S * 1000);
  sock.on('connect', () => {
    sock.write(`GET ${c.url()} HTTP/1.1\r\nHost: ${wsUrl.host}\r\nConnection: Upgrade\r\n`
      + 'Upgrade: websocket\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n');
  });
  sock.on('close', (hadError) => {
    if (hello && !done && cfg.debug) log(`client ${c.i}: socket closed (error ${hadError}, lastErr ${c.lastErr}) bytesRead ${sock.bytesRead}`);
    if (hello) end(1006);
    else fail(upgraded ? 'closed before hello' : 'closed during the handshake');
  });
  sock.on('error', (err) => { c.lastErr = err.code || err.message; if (!hello) fail(err.code || err.message); });
  c.close = () => { sendFrame(sock, 0x8, Buffer.from([0x03, 0xe8])); sock.end(); };
}

// ---- publishing ----------------------------------------------------------------------------

const publishUrls = cfg.publishUrls.map((u) => new URL(u));
const agent = new http.Agent({ keepAlive: true, maxSockets: cfg.publishSockets || 16 });
const publishToken = jwt({ sub: 'storm-publisher', scope: 'publish' });
const userAccepted = Array.from({ length: N }, () => []); // accepted seqs per user topic
const allAccepted = new Uint8Array(MAX_ALL); // 1: storm.all seq accepted; 2: uncertain
const pub = { posted: 0, accepted: 0, failed: 0, uncertain: 0, inFlight: 0, errors: {}, allPosted: 0, userPosted: 0 };
const uncertainUser = new Set(); // "i:seq" of POSTs whose fate is unknown
let seq = 0;
let allSeq = 0;
let rr = 0;

function post(topic, s, onAccepted, onUncertain) {
  const url = publishUrls[rr++ % publishUrls.length];
  const body = `{"topic":"${topic}","data":{"seq":${s}}}`;
  const headers = {
    'content-type': 'application/json', 'content-length': Buffer.byteLength(body), authorization: `Bearer ${publishToken}`,
  };
  pub.posted++;
  pub.inFlight++;
  let settled = false;
  const settle = () => { if (!settled) { settled = true; pub.inFlight--; return true; } return false; };
  const req = http.request({ agent, method: 'POST', host: url.hostname, port: url.port, path: url.pathname, headers }, (res) => {
    res.resume();
    res.on('end', () => {
      if (!settle()) return;
      if (res.statusCode === 202 || res.statusCode === 200) { pub.accepted++; onAccepted(); } else { pub.failed++; bump(pub.errors, `HTTP ${res.statusCode}`); }
    });
  });
  req.setTimeout(10000, () => req.destroy(new Error('timeout')));
  req.on('error', (err) => {
    if (!settle()) return;
    pub.uncertain++;
    bump(pub.errors, err.code || err.message);
    onUncertain();
  });
  req.end(body);
}

function publishUser() {
  const i = Math.floor(Math.random() * N);
  const s = ++seq;
  pub.userPosted++;
  post(`user:storm${i}`, s, () => userAccepted[i].push(s), () => uncertainUser.add(`${i}:${s}`));
}

function publishAll() {
  if (!SHARED || allSeq + 1 >= MAX_ALL) return;
  const s = ++allSeq;
  pub.allPosted++;
  post(SHARED, s, () => { allAccepted[s] = 1; }, () => { allAccepted[s] = 2; });
}

let pubTimer = null;
function startPublishing() {
  const start = now();
  let userDone = 0;
  let allDone = 0;
  pubTimer = setInterval(() => {
    const el = (now() - start) / 1000;
    const userDue = Math.floor(el * cfg.userRate);
    const allDue = Math.floor(el * (cfg.allRate || 0));
    // Open loop, but never more than a second's worth in one tick (a stalled event loop).
    for (let k = 0; userDone < userDue && k < Math.max(1, cfg.userRate); k++) { userDone++; publishUser(); }
    for (let k = 0; allDone < allDue && k < Math.max(1, cfg.allRate); k++) { allDone++; publishAll(); }
  }, 5);
}

async function stopPublishing(timeoutS) {
  clearInterval(pubTimer);
  const deadline = now() + timeoutS * 1000;
  while (pub.inFlight > 0 && now() < deadline) await sleep(10);
}

function httpGet(url) {
  return new Promise((resolve) => {
    const req = http.get(url, { timeout: 5000 }, (res) => {
      const chunks = [];
      res.on('data', (d) => chunks.push(d));
      res.on('end', () => resolve(res.statusCode === 200 ? Buffer.concat(chunks).toString() : null));
    });
    req.on('timeout', () => req.destroy(new Error('timeout')));
    req.on('error', () => resolve(null));
  });
}

async function connectionsOf(url) {
  const text = await httpGet(url);
  const m = text && /^notifier_connections (\S+)$/m.exec(text);
  return m ? Number(m[1]) : null;
}

// ---- checks --------------------------------------------------------------------------------

function expectedFrames() {
  let n = 0;
  for (let i = 0; i < N; i++) n += userAccepted[i].length;
  let all = 0;
  for (let s = 1; s < MAX_ALL; s++) if (allAccepted[s] === 1) all++;
  return n + all * N;
}

function verify() {
  let expected = 0;
  let received = 0;
  let lost = 0;
  let duplicates = 0;
  let clientsLosing = 0;
  const lostSamples = [];
  for (const c of clients) {
    let lostHere = 0;
    const got = new Map();
    for (const s of c.userSeqs) got.set(s, (got.get(s) || 0) + 1);
    for (const s of userAccepted[c.i]) {
      expected++;
      const k = got.get(s) || 0;
      if (k === 0) { lostHere++; if (lostSamples.length < 20) lostSamples.push({ client: c.i, topic: c.topic, seq: s }); }
      else { received++; duplicates += k - 1; got.delete(s); }
    }
    for (const [s, k] of got) {
      if (uncertainUser.has(`${c.i}:${s}`)) continue; // published after all, its POST just failed
      counters.unexpected += k;
    }
    if (SHARED) {
      const base = c.i * MAX_ALL;
      for (let s = 1; s <= allSeq; s++) {
        const k = allCounts[base + s];
        if (allAccepted[s] === 1) {
          expected++;
          if (k === 0) { lostHere++; if (lostSamples.length < 20) lostSamples.push({ client: c.i, topic: SHARED, seq: s }); }
          else { received++; duplicates += k - 1; }
        } else if (allAccepted[s] === 0 && k > 0) counters.unexpected += k;
      }
    }
    lost += lostHere;
    if (lostHere) clientsLosing++;
  }
  return { expected, received, lost, duplicates, clientsLosing, lostSamples };
}

function quantile(values, q) {
  if (!values.length) return null;
  const sorted = [...values].sort((a, b) => a - b);
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
}

const round = (x, d = 3) => (x === null ? null : +x.toFixed(d));
let phase = 'connect';

// ---- the run -------------------------------------------------------------------------------

async function main() {
  const result = { clients: N, signal: cfg.killSignal, shared_topic: SHARED, presence_listeners: PRESENCE_LISTENERS };
  // 1. Everyone connects (through nginx), with backoff on a refusal.
  const connectStart = now();
  let next = 0;
  const conc = cfg.concurrency || 200;
  const deadline = now() + (cfg.connectTimeoutS || 120) * 1000;
  while (openCount < N && now() < deadline) {
    while (next < N && handshaking < conc) connect(clients[next++]);
    await sleep(5);
  }
  if (openCount < N) {
    finish({ error: `only ${openCount} of ${N} clients connected within ${cfg.connectTimeoutS || 120} s`, initial_failures: counters.initialFailures }, 2);
  }
  result.connect_s = round((now() - connectStart) / 1000);
  result.connect_per_s = round(N / result.connect_s, 0);
  result.initial_failures = counters.initialFailures;
  log(`${N} clients connected in ${result.connect_s} s`);

  // 2. Steady publishing, then the kill.
  phase = 'steady';
  startPublishing();
  const steadyFrom = sample();
  await sleep((cfg.steadyS || 3) * 1000);
  const before = sample();
  const steady = delta(steadyFrom, before);
  result.steady_survivors_cpu_per_s = round(steady.survivors / steady.seconds);
  // How many sockets each instance holds (its notifier_connections gauge): the clients the kill
  // must drop, and so when the storm is over.
  const held = await Promise.all(cfg.metricsUrls.map(connectionsOf));
  result.held_before = held;
  const mustDrop = held[held.length - 1];
  phase = 'storm';
  killAt = now();
  try {
    process.kill(-cfg.killPid, cfg.killSignal); // its own process group: the instance alone
  } catch (err) {
    finish({ error: `could not signal the instance: ${err.message}` }, 2);
  }
  log(`${cfg.killSignal} to instance pid ${cfg.killPid}`);

  // 3. Until the instance is gone and every client is back (open) again.
  const backDeadline = killAt + (cfg.backTimeoutS || 60) * 1000;
  let killedGoneAt = 0;
  while (now() < backDeadline) {
    if (!killedGoneAt && dead(cfg.killPid)) killedGoneAt = now();
    const over = mustDrop === null ? now() - killAt > 3000 : droppedCount >= mustDrop;
    if (killedGoneAt && openCount === N && over) break;
    await sleep(5);
  }
  const after = sample();
  stormEnd = now();
  const storm = delta(before, after);
  const dropped = clients.filter((c) => c.dropped);
  const back = dropped.filter((c) => c.backAt);
  const backS = back.map((c) => (c.backAt - killAt) / 1000);
  const gapS = back.map((c) => (c.backAt - c.dropAt) / 1000);
  const dropS = dropped.map((c) => (c.dropAt - killAt) / 1000);
  const attempts = dropped.map((c) => c.attempts);
  const lastBack = back.length ? Math.max(...back.map((c) => c.backAt)) : killAt;
  Object.assign(result, {
    all_back: openCount === N && killedGoneAt > 0,
    clients_open: openCount,
    clients_dropped: dropped.length,
    clients_reconnected: back.length,
    killed_exit_s: killedGoneAt ? round((killedGoneAt - killAt) / 1000) : null,
    storm_s: round((lastBack - killAt) / 1000),
    back_p50_s: round(quantile(backS, 0.5)),
    back_p99_s: round(quantile(backS, 0.99)),
    drop_last_s: round(quantile(dropS, 1)),
    gap_p50_s: round(quantile(gapS, 0.5)),
    gap_p99_s: round(quantile(gapS, 0.99)),
    gap_max_s: round(quantile(gapS, 1)),
    attempts_total: attempts.reduce((a, b) => a + b, 0),
    attempts_max: attempts.length ? Math.max(...attempts) : 0,
    handshake_failures: counters.handshakeFailures,
    close_codes: counters.closeCodes,
    window_s: round(storm.seconds),
    survivors_cpu_s: storm.survivors,
    survivors_wait_s: storm.survivorsWait,
    survivors_cpu_baseline_s: round(result.steady_survivors_cpu_per_s * storm.seconds),
    killed_cpu_s: storm.killed,
    nginx_cpu_s: storm.nginx,
    redis_cpu_s: storm.redis,
    loadgen_storm_cpu_s: storm.loadgen,
  });
  const extra = storm.survivors - result.survivors_cpu_baseline_s;
  result.survivors_extra_cpu_s = round(extra);
  result.handshakes_per_cpu_s = storm.survivors > 0.05 ? round(counters.reconnects / storm.survivors, 0) : null;
  result.handshakes_per_extra_cpu_s = extra > 0.05 ? round(counters.reconnects / extra, 0) : null;
  log(`${back.length}/${dropped.length} dropped clients back; last after ${result.storm_s} s`);

  // 4. Publishing goes on a little, stops; deliveries settle.
  phase = 'settle';
  await sleep((cfg.afterS || 3) * 1000);
  await stopPublishing(15);
  const settleDeadline = now() + (cfg.settleS || 15) * 1000;
  let want = expectedFrames();
  while (counters.framesReceived < want && now() < settleDeadline) {
    await sleep(20);
    want = expectedFrames();
  }
  result.settle_s = round((now() - (settleDeadline - (cfg.settleS || 15) * 1000)) / 1000);
  stopping = true;
  const v = verify();
  Object.assign(result, {
    published: pub.posted,
    accepted: pub.accepted,
    publish_failed: pub.failed,
    publish_uncertain: pub.uncertain,
    publish_errors: pub.errors,
    presence_events: presenceEvents,
    shared_published: SHARED ? [...allAccepted].filter((x) => x === 1).length : 0,
    expected: v.expected,
    received: v.received,
    lost: v.lost,
    duplicates: v.duplicates,
    out_of_order: counters.outOfOrder,
    unexpected: counters.unexpected,
    clients_losing: v.clientsLosing,
    lost_samples: v.lostSamples,
    recovered_false: counters.recoveredFalse,
    recovered_false_samples: counters.recoveredFalseClients,
    recovered_missing: counters.recoveredMissing,
    reconnects: counters.reconnects,
    closed_before_kill: counters.closedBeforeKill,
    dropped_again: counters.dropsAgain,
    late_drops: counters.lateDrops,
    dropped_again_samples: counters.dropsAgainSamples,
    loadgen_cpu_s: round(selfCpu()),
  });
  for (const c of clients) {
    if (c.timer) clearTimeout(c.timer);
    if (c.socket) c.socket.destroy();
  }
  finish(result);
}

main().catch((err) => finish({ error: `storm.mjs: ${err.stack || err}` }, 1));
