/* wsrecv: the receiving side of the benchmark's load generator, in C.
 *
 * benchmarks/loadgen.mjs (Node.js) publishes, paces and measures; this process holds the
 * subscribers' WebSockets and counts what they receive, at a fraction of the CPU a JavaScript
 * client needs per frame (one epoll loop, frames parsed in place, no allocation per frame), so
 * that the load generator's core is not what limits a fan-out. Built by `python -m benchmarks`
 * with the system C compiler (cc -O2); loadgen.mjs falls back to its own JavaScript client when
 * it is missing.
 *
 *   wsrecv HOST PORT PATHS_FILE MAX_SEQ [USER_TOPICS]
 *
 * PATHS_FILE: one request target per line (/v1/ws?topics=...&token=...), subscriber i uses
 * line i. USER_TOPICS 1 (the per-user scenarios): subscriber i is user bench<i> and must only
 * receive notifications of topic user:bench<i>; any other is counted as "misrouted".
 * The handshake scenario drives a loop instead of holding subscribers:
 *   hs CONC MAX            keep CONC handshakes going: connect, upgrade with the next line of
 *                          PATHS_FILE (in a cycle), wait for the first frame (hello), send a close
 *                          frame, wait for the server to close; at most MAX in all. "received"
 *                          (in m/n answers) counts hellos; connect->hello latency is recorded for
 *                          handshakes started after "mark"; failures are counted by kind
 *   hsstop                 start no more Commands, one per line on stdin; answers, one per line on stdout:
 *   open K CONC TIMEOUT_S  open the next K subscribers, CONC handshakes at a time; a subscriber
 *                          counts once its first frame (hello) arrived -> "opened OPEN FAILED"
 *   mark SEQ               latency is recorded for notifications with seq >= SEQ -> "m RECEIVED READS"
 *   drop                   close every subscriber (the idle scenario's warm-up) -> "dropped"
 *   count                  -> "n RECEIVED READS" (READS: socket reads so far)
 *   skip SEQ               expect nothing of SEQ (its publish failed)
 *   result                 -> one JSON object: counters and the latency histogram; then exits
 * Unprompted: "d SEQ" each time every notification up to SEQ has reached every open subscriber
 * (the publisher's window), "x CODE" when the server closes an open subscriber.
 * A notification frame is {"type":"notification","id":"<id>","topic":...,"data":{"seq":<seq>,...},"ts":<ms>}:
 * seq says which notification it is, id gives the order (ids must increase per subscriber), ts
 * the acceptance time (latency = receipt - ts, wall clock, sub-millisecond).
 * Exits when stdin closes (the controller is gone) and after "result".
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/epoll.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

#define HIST_STEP_MS 0.05
#define HIST_BINS 1200001 /* 60 s */
#define READ_SIZE (256 * 1024)
#define STDIN_TAG UINT64_MAX

enum { IDLE, CONNECTING, HANDSHAKE, OPEN, CLOSED };

typedef struct {
    int fd;
    int state;
    int ready; /* got its first frame */
    int64_t last_id;
    char *buf; /* bytes of an incomplete handshake response or frame */
    size_t len, cap;
    char *frag; /* a fragmented message being assembled */
    size_t frag_len, frag_cap;
} Conn;

static struct sockaddr_in addr;
static char **paths;
static int npaths;
static Conn *conns;
static int nconns; /* subscribers started so far */
static int ep;
static uint32_t *recv_count;
static uint8_t *skipped;
static int64_t max_seq;
static uint32_t *hist;
static double lat_max;
static uint64_t lat_count, received, out_of_order, reads, frame_bytes, frame_samples, misrouted;
static int user_topics;
static int64_t measure_from = INT64_MAX, done_upto = 0, highest_seq = 0;
static int open_count, failed_count;
/* the handshake loop (command "hs"): its own slots, tagged in epoll data with HS_TAG */
#define HS_TAG (1ULL << 62)
#define HS_TIMEOUT_S 10.0
enum { HS_FREE, HS_CONNECTING, HS_UPGRADING, HS_CLOSING };
typedef struct {
    int fd, state;
    int64_t k; /* the k-th handshake: line k % npaths of PATHS_FILE */
    double started, deadline;
    char buf[1024];
    size_t len;
} HsConn;
static HsConn *hs;
static int hs_conc, hs_running;
static int64_t hs_max, hs_started;
static double hs_mark = -1; /* mono seconds of "mark": latency of handshakes started after it */
/* failures by kind: "timeout", "close_timeout", "closed_before_hello", "connect_error", "http_<status>" */
#define HS_KINDS 32
static char hs_kind[HS_KINDS][32];
static uint64_t hs_fail[HS_KINDS];
static char rbuf[READ_SIZE];
/* the batch being opened: subscribers [batch_start, batch_end) */
static int batch_start, batch_end, open_conc, opening, dropping;
static double open_deadline;

static double now_ms(void) {
    struct timespec ts;
    clock_gettime(CLOCK_REALTIME, &ts);
    return ts.tv_sec * 1e3 + ts.tv_nsec / 1e6;
}

static double mono_s(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

static void say(const char *fmt, ...) __attribute__((format(printf, 1, 2)));
static void say(const char *fmt, ...) {
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    int n = vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    if (n > 0 && write(1, line, (size_t)n) < 0) exit(1);
}

static void append(char **buf, size_t *len, size_t *cap, const char *data, size_t n) {
    if (*len + n > *cap) {
        size_t c = *cap ? *cap : 1024;
        while (c < *len + n) c *= 2;
        *buf = realloc(*buf, c);
        if (!*buf) exit(2);
        *cap = c;
    }
    memcpy(*buf + *len, data, n);
    *len += n;
}

static void send_frame(Conn *c, int opcode, const char *payload, size_t n) {
    /* A client frame: masked (with a zero key, which leaves the payload as it is); n < 126. */
    char out[2 + 4 + 125];
    if (n > 125) n = 125;
    out[0] = (char)(0x80 | opcode);
    out[1] = (char)(0x80 | n);
    memset(out + 2, 0, 4);
    memcpy(out + 6, payload, n);
    if (send(c->fd, out, 6 + n, MSG_NOSIGNAL) < 0) { /* the close path sees it */ }
}

static void advance_done(void) {
    int64_t d = done_upto;
    while (d < highest_seq && (skipped[d + 1] || recv_count[d + 1] >= (uint32_t)open_count)) d++;
    if (d != done_upto) {
        done_upto = d;
        say("d %lld\n", (long long)d);
    }
}

static void conn_close(Conn *c, int code) {
    if (c->state == CLOSED) return;
    epoll_ctl(ep, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    int was_open = c->ready;
    if (!was_open && !dropping) failed_count++;
    c->state = CLOSED;
    free(c->buf);
    free(c->frag);
    c->buf = c->frag = NULL;
    c->len = c->cap = c->frag_len = c->frag_cap = 0;
    if (was_open) {
        open_count--;
        if (!dropping) {
            say("x %d\n", code);
            advance_done();
        }
    }
}

static int64_t read_int(const char *p, const char *end, const char **after) {
    while (p < end && *p == ' ') p++;
    int64_t n = 0;
    while (p < end && *p >= '0' && *p <= '9') n = n * 10 + (*p++ - '0');
    *after = p;
    return n;
}

static const char HEAD[] = "{\"type\":\"notification\",\"id\":\"";
static const char USER_TOPIC[] = "\"topic\":\"user:bench";

static void on_message(Conn *c, const char *m, size_t n) {
    double at = now_ms();
    if (!c->ready) { /* the first frame: hello */
        c->ready = 1;
        open_count++;
        return;
    }
    const char *end = m + n, *p;
    int64_t id = -1, seq, ts = -1;
    if (n > sizeof HEAD && memcmp(m, HEAD, sizeof HEAD - 1) == 0) {
        id = read_int(m + sizeof HEAD - 1, end, &p);
    } else {
        const char *q = memmem(m, n, "\"id\":\"", 6);
        if (q) id = read_int(q + 6, end, &p);
    }
    const char *s = memmem(m, n, "\"seq\":", 6);
    if (!s) return; /* not one of our notifications */
    seq = read_int(s + 6, end, &p);
    /* ts: the digits just before the final '}' (else search for it) */
    const char *t = end - 2;
    while (t > m && *t >= '0' && *t <= '9') t--;
    if (t - m >= 4 && memcmp(t - 4, "\"ts\":", 5) == 0) {
        ts = read_int(t + 1, end, &p);
    } else {
        const char *q = memmem(m, n, "\"ts\":", 5);
        if (q) ts = read_int(q + 5, end, &p);
    }
    if (seq < 0 || seq > max_seq) return;
    if (user_topics) {
        const char *u = memmem(m, n, USER_TOPIC, sizeof USER_TOPIC - 1);
        const char *after = NULL;
        if (!u || read_int(u + sizeof USER_TOPIC - 1, end, &after) != (int64_t)(c - conns) || after >= end ||
            *after != '"')
            misrouted++;
    }
    if (id >= 0) {
        if (id <= c->last_id) out_of_order++;
        c->last_id = id;
    }
    recv_count[seq]++;
    received++;
    if (seq > highest_seq) highest_seq = seq;
    if (seq >= measure_from && ts >= 0) {
        double lat = at - (double)ts;
        if (lat < 0) lat = 0;
        size_t bin = (size_t)(lat / HIST_STEP_MS);
        if (bin >= HIST_BINS) bin = HIST_BINS - 1;
        hist[bin]++;
        if (lat > lat_max) lat_max = lat;
        lat_count++;
    }
    if (frame_samples < 1000) {
        frame_bytes += n;
        frame_samples++;
    }
    if (seq == done_upto + 1 && recv_count[seq] >= (uint32_t)open_count) advance_done();
}

/* Parse the frames in [data, data+n); returns the bytes consumed, or -1 once the connection closed. */
static ssize_t parse_frames(Conn *c, const char *data, size_t n) {
    size_t pos = 0;
    while (n - pos >= 2) {
        unsigned char b0 = (unsigned char)data[pos], b1 = (unsigned char)data[pos + 1];
        uint64_t size = b1 & 0x7f;
        size_t hdr = 2;
        if (size == 126) {
            if (n - pos < 4) break;
            size = ((uint64_t)(unsigned char)data[pos + 2] << 8) | (unsigned char)data[pos + 3];
            hdr = 4;
        } else if (size == 127) {
            if (n - pos < 10) break;
            size = 0;
            for (int k = 0; k < 8; k++) size = (size << 8) | (unsigned char)data[pos + 2 + k];
            hdr = 10;
        }
        if (b1 & 0x80) { /* a server never masks */
            conn_close(c, 1002);
            return -1;
        }
        if (n - pos < hdr + size) break;
        const char *payload = data + pos + hdr;
        pos += hdr + size;
        int opcode = b0 & 0x0f, fin = (b0 & 0x80) != 0;
        if (opcode <= 2) {
            if (fin && c->frag_len == 0 && opcode != 0) {
                on_message(c, payload, size);
            } else {
                append(&c->frag, &c->frag_len, &c->frag_cap, payload, size);
                if (fin) {
                    on_message(c, c->frag, c->frag_len);
                    c->frag_len = 0;
                }
            }
        } else if (opcode == 9) {
            send_frame(c, 0xA, payload, size);
        } else if (opcode == 8) {
            int code = size >= 2 ? (((unsigned char)payload[0]) << 8 | (unsigned char)payload[1]) : 1005;
            send_frame(c, 0x8, payload, size >= 2 ? 2 : 0);
            conn_close(c, code);
            return -1;
        }
    }
    return (ssize_t)pos;
}

static void on_handshake(Conn *c) {
    char *end = memmem(c->buf, c->len, "\r\n\r\n", 4);
    if (!end) return;
    if (c->len < 12 || memcmp(c->buf + 9, "101", 3) != 0) {
        conn_close(c, 0);
        return;
    }
    c->state = OPEN;
    size_t head = (size_t)(end + 4 - c->buf);
    size_t rest = c->len - head;
    memmove(c->buf, c->buf + head, rest);
    c->len = rest;
    if (rest) {
        ssize_t used = parse_frames(c, c->buf, c->len);
        if (used < 0) return;
        memmove(c->buf, c->buf + used, c->len - (size_t)used);
        c->len -= (size_t)used;
    }
}

static void on_readable(Conn *c) {
    ssize_t got = recv(c->fd, rbuf, READ_SIZE, 0);
    if (got <= 0) {
        if (got < 0 && (errno == EAGAIN || errno == EINTR)) return;
        conn_close(c, 1006);
        return;
    }
    reads++;
    if (c->state == HANDSHAKE) {
        append(&c->buf, &c->len, &c->cap, rbuf, (size_t)got);
        on_handshake(c);
        return;
    }
    if (c->len == 0) { /* the common case: parse in place, keep only an incomplete tail */
        ssize_t used = parse_frames(c, rbuf, (size_t)got);
        if (used >= 0 && used < got) append(&c->buf, &c->len, &c->cap, rbuf + used, (size_t)(got - used));
        return;
    }
    append(&c->buf, &c->len, &c->cap, rbuf, (size_t)got);
    ssize_t used = parse_frames(c, c->buf, c->len);
    if (used < 0) return;
    memmove(c->buf, c->buf + used, c->len - (size_t)used);
    c->len -= (size_t)used;
}

static void on_writable(Conn *c) {
    int err = 0;
    socklen_t len = sizeof err;
    getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
    if (err) {
        conn_close(c, 0);
        return;
    }
    int idx = (int)(c - conns);
    char req[8192];
    int n = snprintf(req, sizeof req,
                     "GET %s HTTP/1.1\r\nHost: %s:%d\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                     "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
                     paths[idx], inet_ntoa(addr.sin_addr), ntohs(addr.sin_port));
    if (n <= 0 || n >= (int)sizeof req || send(c->fd, req, (size_t)n, MSG_NOSIGNAL) != n) {
        conn_close(c, 0);
        return;
    }
    c->state = HANDSHAKE;
    struct epoll_event ev = {.events = EPOLLIN, .data.u64 = (uint64_t)idx};
    epoll_ctl(ep, EPOLL_CTL_MOD, c->fd, &ev);
}

static void start_conn(int idx) {
    Conn *c = &conns[idx];
    memset(c, 0, sizeof *c);
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    if (c->fd < 0) {
        c->state = CLOSED;
        failed_count++;
        return;
    }
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->state = CONNECTING;
    if (connect(c->fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS) {
        close(c->fd);
        c->state = CLOSED;
        failed_count++;
        return;
    }
    struct epoll_event ev = {.events = EPOLLOUT, .data.u64 = (uint64_t)idx};
    epoll_ctl(ep, EPOLL_CTL_ADD, c->fd, &ev);
}

/* Keep `open_conc` handshakes in flight until the batch is done (or timed out). */
static void pump_open(void) {
    if (!opening) return;
    int in_flight = 0;
    for (int i = batch_start; i < nconns; i++)
        if (conns[i].state != CLOSED && !conns[i].ready) in_flight++;
    while (in_flight < open_conc && nconns < batch_end) {
        start_conn(nconns++);
        in_flight++;
    }
    int timed_out = mono_s() > open_deadline;
    if ((in_flight == 0 && nconns >= batch_end) || timed_out) {
        if (timed_out)
            for (int i = batch_start; i < nconns; i++)
                if (conns[i].state != CLOSED && !conns[i].ready) conn_close(&conns[i], 0);
        failed_count += batch_end - nconns; /* never started: out of time */
        nconns = batch_end;
        opening = 0;
        say("opened %d %d\n", open_count, failed_count);
    }
}

static void hs_failed(const char *kind) {
    for (int k = 0; k < HS_KINDS; k++) {
        if (hs_kind[k][0] == 0) snprintf(hs_kind[k], sizeof hs_kind[k], "%s", kind);
        if (strcmp(hs_kind[k], kind) == 0) {
            hs_fail[k]++;
            return;
        }
    }
}

static void hs_end(HsConn *h, const char *failure) {
    if (failure) hs_failed(failure);
    if (h->fd >= 0) {
        epoll_ctl(ep, EPOLL_CTL_DEL, h->fd, NULL);
        close(h->fd);
    }
    h->fd = -1;
    h->state = HS_FREE;
}

static void hs_start(int slot) {
    HsConn *h = &hs[slot];
    h->len = 0;
    h->k = hs_started;
    h->started = mono_s();
    h->deadline = h->started + HS_TIMEOUT_S;
    h->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK, 0);
    hs_started++;
    if (h->fd < 0) {
        hs_end(h, "socket_error");
        return;
    }
    int one = 1;
    setsockopt(h->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    if (connect(h->fd, (struct sockaddr *)&addr, sizeof addr) < 0 && errno != EINPROGRESS) {
        hs_end(h, "connect_error");
        return;
    }
    h->state = HS_CONNECTING;
    struct epoll_event ev = {.events = EPOLLOUT, .data.u64 = HS_TAG | (uint64_t)slot};
    epoll_ctl(ep, EPOLL_CTL_ADD, h->fd, &ev);
}

/* Start handshakes in free slots; time out stuck ones. */
static void hs_pump(void) {
    double now = mono_s();
    for (int i = 0; i < hs_conc; i++) {
        HsConn *h = &hs[i];
        if (h->state != HS_FREE && now > h->deadline) hs_end(h, h->state == HS_CLOSING ? "close_timeout" : "timeout");
        if (h->state == HS_FREE && hs_running && hs_started < hs_max) hs_start(i);
    }
}

static void hs_event(int slot, uint32_t events) {
    HsConn *h = &hs[slot];
    if (h->state == HS_CONNECTING) {
        int err = 0;
        socklen_t len = sizeof err;
        getsockopt(h->fd, SOL_SOCKET, SO_ERROR, &err, &len);
        if (err) {
            hs_end(h, "connect_error");
            return;
        }
        const char *path = paths[h->k % npaths];
        char req[8192];
        int n = snprintf(req, sizeof req,
                         "GET %s HTTP/1.1\r\nHost: %s:%d\r\nConnection: Upgrade\r\nUpgrade: websocket\r\n"
                         "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
                         path, inet_ntoa(addr.sin_addr), ntohs(addr.sin_port));
        if (n <= 0 || n >= (int)sizeof req || send(h->fd, req, (size_t)n, MSG_NOSIGNAL) != n) {
            hs_end(h, "send_error");
            return;
        }
        h->state = HS_UPGRADING;
        struct epoll_event ev = {.events = EPOLLIN, .data.u64 = HS_TAG | (uint64_t)slot};
        epoll_ctl(ep, EPOLL_CTL_MOD, h->fd, &ev);
        return;
    }
    if (!(events & (EPOLLIN | EPOLLHUP | EPOLLERR))) return;
    if (h->state == HS_CLOSING) { /* the server's close frame, then its FIN: done */
        ssize_t got = recv(h->fd, rbuf, READ_SIZE, 0);
        if (got > 0 || (got < 0 && (errno == EAGAIN || errno == EINTR))) return;
        hs_end(h, NULL);
        return;
    }
    ssize_t got = recv(h->fd, h->buf + h->len, sizeof h->buf - h->len, 0);
    if (got < 0 && (errno == EAGAIN || errno == EINTR)) return;
    if (got <= 0) {
        hs_end(h, "closed_before_hello");
        return;
    }
    reads++;
    h->len += (size_t)got;
    char *end = memmem(h->buf, h->len, "\r\n\r\n", 4);
    if (!end) {
        if (h->len == sizeof h->buf) hs_end(h, "bad_answer");
        return;
    }
    if (h->len < 12 || memcmp(h->buf + 9, "101", 3) != 0) {
        char kind[32];
        snprintf(kind, sizeof kind, "http_%.3s", h->len >= 12 ? h->buf + 9 : "???");
        hs_end(h, kind);
        return;
    }
    /* the first frame after the headers: a complete one is the hello */
    const unsigned char *f = (const unsigned char *)end + 4;
    size_t have = h->len - (size_t)((const char *)f - h->buf);
    if (have < 2) return;
    size_t size = f[1] & 0x7f, hdr = 2;
    if (size == 126) {
        if (have < 4) return;
        size = ((size_t)f[2] << 8) | f[3];
        hdr = 4;
    } else if (size == 127) {
        hs_end(h, "bad_answer");
        return;
    }
    if (have < hdr + size) {
        if (h->len == sizeof h->buf) hs_end(h, "bad_answer");
        return;
    }
    if ((f[0] & 0x0f) == 8) {
        hs_end(h, "closed_before_hello");
        return;
    }
    received++; /* a hello */
    if (hs_mark >= 0 && h->started >= hs_mark) {
        double lat = (mono_s() - h->started) * 1e3;
        size_t bin = (size_t)(lat / HIST_STEP_MS);
        if (bin >= HIST_BINS) bin = HIST_BINS - 1;
        hist[bin]++;
        if (lat > lat_max) lat_max = lat;
        lat_count++;
    }
    static const char close_frame[] = {(char)0x88, (char)0x82, 0, 0, 0, 0, 0x03, (char)0xe8};
    if (send(h->fd, close_frame, sizeof close_frame, MSG_NOSIGNAL) != (ssize_t)sizeof close_frame) {
        hs_end(h, NULL); /* the hello counted: the server went first */
        return;
    }
    h->state = HS_CLOSING;
    h->deadline = mono_s() + HS_TIMEOUT_S;
}

static void result(void) {
    /* hist as [[bin, count], ...] of its non-empty bins */
    size_t cap = 1 << 16, len = 0;
    char *out = malloc(cap);
    len += (size_t)snprintf(out, cap,
                            "{\"received\":%llu,\"out_of_order\":%llu,\"misrouted\":%llu,\"lat_count\":%llu,\"lat_max\":%.3f,"
                            "\"reads\":%llu,\"frame_bytes\":%llu,\"frame_samples\":%llu,\"open\":%d",
                            (unsigned long long)received, (unsigned long long)out_of_order,
                            (unsigned long long)misrouted, (unsigned long long)lat_count, lat_max, (unsigned long long)reads,
                            (unsigned long long)frame_bytes, (unsigned long long)frame_samples, open_count);
    len += (size_t)snprintf(out + len, cap - len, ",\"hs_started\":%lld,\"hs_failures\":{", (long long)hs_started);
    for (int k = 0; k < HS_KINDS && hs_kind[k][0]; k++)
        len += (size_t)snprintf(out + len, cap - len, "%s\"%s\":%llu", k ? "," : "", hs_kind[k],
                                (unsigned long long)hs_fail[k]);
    len += (size_t)snprintf(out + len, cap - len, "},\"hist\":[");
    int first = 1;
    for (size_t b = 0; b < HIST_BINS; b++) {
        if (!hist[b]) continue;
        if (cap - len < 64) {
            cap *= 2;
            out = realloc(out, cap);
        }
        len += (size_t)snprintf(out + len, cap - len, "%s[%zu,%u]", first ? "" : ",", b, hist[b]);
        first = 0;
    }
    if (cap - len < 8) out = realloc(out, cap + 8);
    len += (size_t)snprintf(out + len, 8, "]}\n");
    for (size_t off = 0; off < len;) {
        ssize_t w = write(1, out + off, len - off);
        if (w <= 0) break;
        off += (size_t)w;
    }
    exit(0);
}

static char cmd[4096];
static size_t cmd_len;

static void on_command(char *line) {
    long long a = 0;
    int k = 0, conc = 0;
    double timeout = 0;
    if (sscanf(line, "open %d %d %lf", &k, &conc, &timeout) == 3) {
        batch_start = nconns;
        batch_end = nconns + (k > 0 ? k : 0);
        if (batch_end > npaths) batch_end = npaths;
        open_conc = conc > 0 ? conc : 100;
        open_deadline = mono_s() + timeout;
        opening = 1;
        pump_open();
    } else if (strcmp(line, "drop") == 0) {
        dropping = 1;
        for (int i = 0; i < nconns; i++) conn_close(&conns[i], 1000);
        dropping = 0;
        say("dropped\n");
    } else if (sscanf(line, "hs %d %lld", &conc, &a) == 2) {
        hs_conc = conc > 0 ? conc : 1;
        hs_max = a;
        hs = calloc((size_t)hs_conc, sizeof *hs);
        if (!hs || npaths == 0) exit(2);
        for (int i = 0; i < hs_conc; i++) hs[i].fd = -1;
        hs_running = 1;
        hs_pump();
    } else if (strcmp(line, "hsstop") == 0) {
        hs_running = 0;
    } else if (sscanf(line, "mark %lld", &a) == 1) {
        measure_from = a;
        if (hs) hs_mark = mono_s();
        say("m %llu %llu\n", (unsigned long long)received, (unsigned long long)reads);
    } else if (strcmp(line, "count") == 0) {
        say("n %llu %llu\n", (unsigned long long)received, (unsigned long long)reads);
    } else if (sscanf(line, "skip %lld", &a) == 1) {
        if (a >= 1 && a <= max_seq) {
            skipped[a] = 1;
            if (a > highest_seq) highest_seq = a;
            advance_done();
        }
    } else if (strcmp(line, "result") == 0) {
        result();
    }
}

static void on_stdin(void) {
    ssize_t got = read(0, cmd + cmd_len, sizeof cmd - 1 - cmd_len);
    if (got <= 0) {
        if (got < 0 && errno == EAGAIN) return;
        exit(0); /* the controller is gone */
    }
    cmd_len += (size_t)got;
    char *start = cmd, *nl;
    while ((nl = memchr(start, '\n', cmd_len - (size_t)(start - cmd)))) {
        *nl = 0;
        on_command(start);
        start = nl + 1;
    }
    cmd_len -= (size_t)(start - cmd);
    memmove(cmd, start, cmd_len);
    if (cmd_len == sizeof cmd - 1) cmd_len = 0;
}

int main(int argc, char **argv) {
    if (argc != 5 && argc != 6) {
        fprintf(stderr, "usage: wsrecv HOST PORT PATHS_FILE MAX_SEQ [USER_TOPICS]\n");
        return 2;
    }
    user_topics = argc == 6 && atoi(argv[5]) == 1;
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)atoi(argv[2]));
    if (inet_pton(AF_INET, argv[1], &addr.sin_addr) != 1) {
        fprintf(stderr, "wsrecv: HOST must be an IPv4 address\n");
        return 2;
    }
    FILE *f = fopen(argv[3], "r");
    if (!f) {
        perror("wsrecv: PATHS_FILE");
        return 2;
    }
    size_t cap = 1024;
    paths = malloc(cap * sizeof *paths);
    char *line = NULL;
    size_t lcap = 0;
    ssize_t n;
    while ((n = getline(&line, &lcap, f)) > 0) {
        while (n > 0 && (line[n - 1] == '\n' || line[n - 1] == '\r')) line[--n] = 0;
        if (!n) continue;
        if ((size_t)npaths == cap) paths = realloc(paths, (cap *= 2) * sizeof *paths);
        paths[npaths++] = strdup(line);
    }
    fclose(f);
    free(line);
    max_seq = atoll(argv[4]);
    conns = calloc((size_t)npaths + 1, sizeof *conns);
    recv_count = calloc((size_t)max_seq + 2, sizeof *recv_count);
    skipped = calloc((size_t)max_seq + 2, 1);
    hist = calloc(HIST_BINS, sizeof *hist);
    if (!conns || !recv_count || !skipped || !hist) return 2;

    ep = epoll_create1(0);
    fcntl(0, F_SETFL, fcntl(0, F_GETFL) | O_NONBLOCK);
    struct epoll_event sev = {.events = EPOLLIN, .data.u64 = STDIN_TAG};
    epoll_ctl(ep, EPOLL_CTL_ADD, 0, &sev);

    struct epoll_event evs[512];
    for (;;) {
        int got = epoll_wait(ep, evs, 512, opening || hs ? 20 : 200);
        for (int i = 0; i < got; i++) {
            if (evs[i].data.u64 == STDIN_TAG) {
                on_stdin();
                continue;
            }
            if (evs[i].data.u64 & HS_TAG) {
                hs_event((int)(evs[i].data.u64 & ~HS_TAG), evs[i].events);
                continue;
            }
            Conn *c = &conns[evs[i].data.u64];
            if (c->state == CLOSED) continue;
            if (c->state == CONNECTING) {
                on_writable(c);
            } else if (evs[i].events & (EPOLLIN | EPOLLHUP | EPOLLERR)) {
                on_readable(c);
            }
        }
        if (opening) pump_open();
        if (hs) hs_pump();
    }
}
