/*
 * sprox-loadgen: a small HTTP/1.1 load generator that is not the bottleneck.
 *
 * Why not wrk: wrk reads responses 8 KiB per read() and copies every byte, so it caps
 * near 1.3 GB/s on this kind of machine; h2load's HTTP/1.1 path does the same. This one
 * reads response heads into a small buffer and then either discards the body inside
 * the kernel (recv with MSG_TRUNC: TCP drops the bytes without copying them to user
 * space) or copies it into one large buffer (-m copy, what a real client pays).
 *
 * Model: -c connections, keep-alive, one request in flight per connection (no
 * pipelining: S3 clients do not pipeline), a single thread driving epoll. Requests
 * are precomputed bytes (already signed), read from a file and sent round-robin, so
 * the generator never formats or signs anything while it measures.
 *
 * Request file: records of [u32 length][u32 flags=0][i64 expected body length or -1]
 * [length bytes], little-endian. A response whose status is not 2xx, or whose body
 * length differs from the expected one, counts as an error.
 *
 * Bounded: stops after -n requests or -d seconds, whichever comes first; responses
 * in flight at the deadline get -g seconds to finish, then are abandoned.
 *
 * Output: one JSON object on stdout.
 */
#define _GNU_SOURCE
#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#define HEAD_CAP 16384
#define MAX_CONNS 1024
#define NBUCKETS (64 + 40 * 32)

typedef struct {
    const char *data;
    uint32_t len;
    int64_t expect;
} request_t;

enum { ST_IDLE, ST_CONNECTING, ST_SENDING, ST_HEAD, ST_BODY };

typedef struct {
    int fd;
    int state;
    uint64_t req_index;
    const request_t *req;
    uint32_t sent;
    char head[HEAD_CAP];
    uint32_t head_len;
    uint64_t body_left;
    uint64_t body_total;
    int close_after;
    int64_t t_start;
} conn_t;

static request_t *requests;
static size_t nrequests;
static conn_t conns[MAX_CONNS];
static int nconns = 8;
static int epfd;
static struct sockaddr_in addr;

static int copy_mode = 0;
static char *copy_buf;
static size_t copy_buf_size = 4 << 20;
static char trunc_dummy[64];

static uint64_t max_requests = UINT64_MAX;
static double duration_s = 2.0, grace_s = 10.0;

static uint64_t issued, completed, errors, incomplete, reconnects;
static uint64_t body_bytes;
static uint64_t status_counts[600];
static uint64_t xcache_hit, xcache_miss, xcache_partial, xcache_bypass, xcache_other, xcache_none;
static uint64_t hist[NBUCKETS];
static double lat_sum_us;
static uint64_t lat_max_us;
static int64_t t0, t_last_done;
static char first_error[512];

static int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (int64_t)ts.tv_sec * 1000000000LL + ts.tv_nsec;
}

static void note_error(const char *fmt, const char *detail) {
    errors++;
    if (!first_error[0]) snprintf(first_error, sizeof first_error, fmt, detail ? detail : "");
}

/* Log-linear histogram of microseconds: exact below 64, then 32 steps per power of 2. */
static int bucket_of(uint64_t us) {
    if (us < 64) return (int)us;
    int exp = 63 - __builtin_clzll(us); /* >= 6 */
    int sub = (int)((us >> (exp - 5)) & 31);
    int idx = 64 + (exp - 6) * 32 + sub;
    return idx < NBUCKETS ? idx : NBUCKETS - 1;
}

static uint64_t bucket_high(int idx) {
    if (idx < 64) return (uint64_t)idx;
    int exp = (idx - 64) / 32 + 6, sub = (idx - 64) % 32;
    return ((uint64_t)(32 + sub + 1) << (exp - 5)) - 1;
}

static uint64_t percentile(double p) {
    uint64_t total = 0, seen = 0;
    for (int i = 0; i < NBUCKETS; i++) total += hist[i];
    if (!total) return 0;
    uint64_t want = (uint64_t)(p * (double)total);
    if (want >= total) want = total - 1;
    for (int i = 0; i < NBUCKETS; i++) {
        seen += hist[i];
        if (seen > want) {
            uint64_t v = bucket_high(i);
            return v < lat_max_us ? v : lat_max_us;
        }
    }
    return lat_max_us;
}

static void load_requests(const char *path) {
    int fd = open(path, O_RDONLY);
    if (fd < 0) { perror(path); exit(2); }
    struct stat st;
    fstat(fd, &st);
    char *buf = malloc((size_t)st.st_size + 1);
    size_t got = 0;
    while (got < (size_t)st.st_size) {
        ssize_t r = read(fd, buf + got, (size_t)st.st_size - got);
        if (r <= 0) { perror("read"); exit(2); }
        got += (size_t)r;
    }
    close(fd);
    size_t cap = 1024, off = 0;
    requests = malloc(cap * sizeof *requests);
    while (off + 16 <= got) {
        uint32_t len, flags;
        int64_t expect;
        memcpy(&len, buf + off, 4);
        memcpy(&flags, buf + off + 4, 4);
        memcpy(&expect, buf + off + 8, 8);
        off += 16;
        if (off + len > got) { fprintf(stderr, "truncated request file\n"); exit(2); }
        if (nrequests == cap) { cap *= 2; requests = realloc(requests, cap * sizeof *requests); }
        requests[nrequests++] = (request_t){buf + off, len, expect};
        off += len;
        (void)flags;
    }
    if (!nrequests) { fprintf(stderr, "no requests in %s\n", path); exit(2); }
}

static void conn_open(conn_t *c) {
    c->fd = socket(AF_INET, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (c->fd < 0) { perror("socket"); exit(2); }
    int one = 1;
    setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    int r = connect(c->fd, (struct sockaddr *)&addr, sizeof addr);
    if (r < 0 && errno != EINPROGRESS) {
        note_error("connect: %s", strerror(errno));
        fprintf(stderr, "loadgen: cannot connect: %s\n", strerror(errno));
        exit(3);
    }
    c->state = ST_IDLE;
    struct epoll_event ev = {.events = EPOLLIN | EPOLLOUT, .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_ADD, c->fd, &ev);
    c->state = ST_CONNECTING;
}

static void conn_reopen(conn_t *c) {
    epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
    close(c->fd);
    reconnects++;
    conn_open(c);
}

static int may_issue(int64_t now) {
    return issued < max_requests && now - t0 < (int64_t)(duration_s * 1e9);
}

static void set_events(conn_t *c, uint32_t events) {
    struct epoll_event ev = {.events = events, .data.ptr = c};
    epoll_ctl(epfd, EPOLL_CTL_MOD, c->fd, &ev);
}

/* Start the next request on an idle connection, or leave it idle when done. */
static void start_request(conn_t *c, int64_t now) {
    if (!may_issue(now)) { c->state = ST_IDLE; return; }
    c->req_index = issued++;
    c->req = &requests[c->req_index % nrequests];
    c->sent = 0;
    c->head_len = 0;
    c->close_after = 0;
    c->t_start = now;
    c->state = ST_SENDING;
    while (c->sent < c->req->len) {
        ssize_t w = send(c->fd, c->req->data + c->sent, c->req->len - c->sent, MSG_NOSIGNAL);
        if (w < 0) {
            if (errno == EAGAIN) { set_events(c, EPOLLIN | EPOLLOUT); return; }
            note_error("send: %s", strerror(errno));
            incomplete++;
            conn_reopen(c);
            return;
        }
        c->sent += (uint32_t)w;
    }
    c->state = ST_HEAD;
}

static void finish_response(conn_t *c, int64_t now) {
    uint64_t us = (uint64_t)((now - c->t_start) / 1000);
    hist[bucket_of(us)]++;
    lat_sum_us += (double)us;
    if (us > lat_max_us) lat_max_us = us;
    completed++;
    body_bytes += c->body_total;
    t_last_done = now;
    if (c->close_after) {
        conn_reopen(c); /* new request starts when the connect completes */
        return;
    }
    start_request(c, now);
}

static int header_is(const char *line, size_t len, const char *name, const char **value, size_t *vlen) {
    size_t n = strlen(name);
    if (len <= n || line[n] != ':' || strncasecmp(line, name, n) != 0) return 0;
    const char *v = line + n + 1;
    const char *end = line + len;
    while (v < end && (*v == ' ' || *v == '\t')) v++;
    while (end > v && (end[-1] == ' ' || end[-1] == '\t')) end--;
    *value = v;
    *vlen = (size_t)(end - v);
    return 1;
}

/* Parse a complete response head; returns bytes of body already in the buffer, or -1. */
static long parse_head(conn_t *c, size_t head_end) {
    char *p = c->head;
    char *end = c->head + head_end;
    if (head_end < 12 || memcmp(p, "HTTP/1.", 7) != 0) { note_error("bad status line%s", NULL); return -1; }
    int status = atoi(p + 9);
    if (status < 100 || status > 599) { note_error("bad status%s", NULL); return -1; }
    status_counts[status]++;
    int64_t content_length = -1;
    int chunked = 0, xcache_seen = 0;
    if (p[7] == '0') c->close_after = 1; /* HTTP/1.0 */
    char *line = memchr(p, '\n', head_end);
    while (line && line + 1 < end) {
        line++;
        char *eol = memchr(line, '\n', (size_t)(end - line));
        if (!eol) break;
        size_t len = (size_t)(eol - line);
        if (len && line[len - 1] == '\r') len--;
        if (!len) break;
        const char *v;
        size_t vl;
        if (header_is(line, len, "content-length", &v, &vl)) {
            content_length = strtoll(v, NULL, 10);
        } else if (header_is(line, len, "transfer-encoding", &v, &vl)) {
            if (vl >= 7 && strncasecmp(v + vl - 7, "chunked", 7) == 0) chunked = 1;
        } else if (header_is(line, len, "connection", &v, &vl)) {
            if (vl == 5 && strncasecmp(v, "close", 5) == 0) c->close_after = 1;
        } else if (header_is(line, len, "x-cache", &v, &vl)) {
            xcache_seen = 1;
            if (vl == 3 && !strncasecmp(v, "HIT", 3)) xcache_hit++;
            else if (vl == 4 && !strncasecmp(v, "MISS", 4)) xcache_miss++;
            else if (vl == 7 && !strncasecmp(v, "PARTIAL", 7)) xcache_partial++;
            else if (vl == 6 && !strncasecmp(v, "BYPASS", 6)) xcache_bypass++;
            else xcache_other++;
        }
        line = eol;
    }
    if (!xcache_seen) xcache_none++;
    if (chunked) { note_error("chunked response bodies are not supported%s", NULL); return -1; }
    int no_body = status == 204 || status == 304 || status < 200 ||
                  (c->req->len >= 5 && memcmp(c->req->data, "HEAD ", 5) == 0);
    if (no_body) content_length = 0;
    if (content_length < 0) { note_error("response without Content-Length%s", NULL); return -1; }
    if (status < 200 || status > 299) {
        char detail[64];
        snprintf(detail, sizeof detail, "%d", status);
        note_error("HTTP status %s", detail);
    } else if (c->req->expect >= 0 && content_length != c->req->expect) {
        char detail[96];
        snprintf(detail, sizeof detail, "%lld, expected %lld", (long long)content_length, (long long)c->req->expect);
        note_error("body length %s", detail);
    }
    c->body_total = (uint64_t)content_length;
    long extra = (long)(c->head_len - head_end);
    if ((uint64_t)extra > c->body_total) { note_error("more bytes than Content-Length%s", NULL); return -1; }
    c->body_left = c->body_total - (uint64_t)extra;
    return extra;
}

static void on_readable(conn_t *c) {
    for (;;) {
        if (c->state == ST_HEAD) {
            ssize_t r = recv(c->fd, c->head + c->head_len, HEAD_CAP - c->head_len, 0);
            if (r < 0) {
                if (errno == EAGAIN) return;
                note_error("recv: %s", strerror(errno));
                incomplete++;
                conn_reopen(c);
                return;
            }
            if (r == 0) { note_error("connection closed by server%s", NULL); incomplete++; conn_reopen(c); return; }
            size_t old = c->head_len;
            c->head_len += (uint32_t)r;
            size_t from = old > 3 ? old - 3 : 0;
            char *hit = memmem(c->head + from, c->head_len - from, "\r\n\r\n", 4);
            if (!hit) {
                if (c->head_len == HEAD_CAP) { note_error("response head too large%s", NULL); incomplete++; conn_reopen(c); return; }
                continue;
            }
            size_t head_end = (size_t)(hit - c->head) + 4;
            if (parse_head(c, head_end) < 0) { incomplete++; conn_reopen(c); return; }
            c->state = ST_BODY;
            if (c->body_left == 0) { finish_response(c, now_ns()); return; }
        } else if (c->state == ST_BODY) {
            size_t want = c->body_left;
            ssize_t r;
            if (copy_mode) {
                if (want > copy_buf_size) want = copy_buf_size;
                r = recv(c->fd, copy_buf, want, 0);
            } else {
                if (want > (1u << 30)) want = 1u << 30;
                /* TCP with MSG_TRUNC discards up to `want` bytes without copying them. */
                r = recv(c->fd, trunc_dummy, want, MSG_TRUNC);
            }
            if (r < 0) {
                if (errno == EAGAIN) return;
                note_error("recv: %s", strerror(errno));
                incomplete++;
                conn_reopen(c);
                return;
            }
            if (r == 0) { note_error("connection closed mid-body%s", NULL); incomplete++; conn_reopen(c); return; }
            c->body_left -= (uint64_t)r;
            if (c->body_left == 0) { finish_response(c, now_ns()); return; }
        } else {
            return;
        }
    }
}

static void on_event(conn_t *c, uint32_t events) {
    if (c->state == ST_CONNECTING) {
        if (events & (EPOLLOUT | EPOLLERR | EPOLLHUP)) {
            int err = 0;
            socklen_t len = sizeof err;
            getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len);
            if (err) { fprintf(stderr, "loadgen: connect failed: %s\n", strerror(err)); exit(3); }
            set_events(c, EPOLLIN);
            start_request(c, now_ns());
        }
        return;
    }
    if (c->state == ST_SENDING && (events & EPOLLOUT)) {
        while (c->sent < c->req->len) {
            ssize_t w = send(c->fd, c->req->data + c->sent, c->req->len - c->sent, MSG_NOSIGNAL);
            if (w < 0) {
                if (errno == EAGAIN) return;
                note_error("send: %s", strerror(errno));
                incomplete++;
                conn_reopen(c);
                return;
            }
            c->sent += (uint32_t)w;
        }
        set_events(c, EPOLLIN);
        c->state = ST_HEAD;
    }
    if (events & (EPOLLIN | EPOLLERR | EPOLLHUP)) {
        if (c->state == ST_HEAD || c->state == ST_BODY) on_readable(c);
        else if (c->state == ST_IDLE) {
            /* Nothing is expected on an idle connection: the server closed it (keep-alive
               timeout after our deadline). Drop it, or level-triggered epoll spins. */
            epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
            close(c->fd);
            c->fd = -1;
            c->state = -1; /* done */
        }
    }
}

static void usage(void) {
    fprintf(stderr,
            "usage: loadgen -p PORT -f REQUESTS [-a 127.0.0.1] [-c CONNECTIONS] [-d SECONDS]\n"
            "               [-n MAX_REQUESTS] [-g GRACE_SECONDS] [-m discard|copy] [-b COPY_BUFFER_BYTES]\n");
    exit(2);
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1", *file = NULL;
    int port = 0, opt;
    while ((opt = getopt(argc, argv, "a:p:f:c:d:n:g:m:b:")) != -1) {
        switch (opt) {
        case 'a': host = optarg; break;
        case 'p': port = atoi(optarg); break;
        case 'f': file = optarg; break;
        case 'c': nconns = atoi(optarg); break;
        case 'd': duration_s = atof(optarg); break;
        case 'n': max_requests = strtoull(optarg, NULL, 10); break;
        case 'g': grace_s = atof(optarg); break;
        case 'm':
            if (!strcmp(optarg, "copy")) copy_mode = 1;
            else if (!strcmp(optarg, "discard")) copy_mode = 0;
            else usage();
            break;
        case 'b': copy_buf_size = strtoull(optarg, NULL, 10); break;
        default: usage();
        }
    }
    if (!port || !file || nconns < 1 || nconns > MAX_CONNS || duration_s <= 0 || duration_s > 3600) usage();
    memset(&addr, 0, sizeof addr);
    addr.sin_family = AF_INET;
    addr.sin_port = htons((uint16_t)port);
    if (inet_pton(AF_INET, host, &addr.sin_addr) != 1) { fprintf(stderr, "bad address %s\n", host); return 2; }
    load_requests(file);
    if (copy_mode) {
        copy_buf = malloc(copy_buf_size);
        memset(copy_buf, 1, copy_buf_size); /* fault the pages in before measuring */
    }
    epfd = epoll_create1(EPOLL_CLOEXEC);
    struct rusage ru0, ru1;
    getrusage(RUSAGE_SELF, &ru0);
    t0 = now_ns();
    t_last_done = t0;
    for (int i = 0; i < nconns; i++) conn_open(&conns[i]);
    struct epoll_event events[MAX_CONNS];
    int64_t hard_stop = t0 + (int64_t)((duration_s + grace_s) * 1e9);
    for (;;) {
        int64_t now = now_ns();
        int busy = 0;
        for (int i = 0; i < nconns; i++) {
            int s = conns[i].state;
            if (s == ST_SENDING || s == ST_HEAD || s == ST_BODY) busy++;
            else if (s == ST_CONNECTING && may_issue(now)) busy++;
        }
        if (!busy && !may_issue(now)) break;
        if (now >= hard_stop) {
            for (int i = 0; i < nconns; i++) {
                int s = conns[i].state;
                if (s == ST_SENDING || s == ST_HEAD || s == ST_BODY) incomplete++;
            }
            break;
        }
        /* Idle connections (deadline not yet reached but nothing issued) cannot exist:
           start_request only idles a connection once may_issue() is false. */
        int n = epoll_wait(epfd, events, MAX_CONNS, 50);
        if (n < 0) {
            if (errno == EINTR) continue;
            perror("epoll_wait");
            return 2;
        }
        for (int i = 0; i < n; i++) on_event(events[i].data.ptr, events[i].events);
    }
    getrusage(RUSAGE_SELF, &ru1);
    double elapsed = (double)(t_last_done - t0) / 1e9;
    if (elapsed <= 0) elapsed = (double)(now_ns() - t0) / 1e9;
    double cpu_user = (ru1.ru_utime.tv_sec - ru0.ru_utime.tv_sec) + (ru1.ru_utime.tv_usec - ru0.ru_utime.tv_usec) / 1e6;
    double cpu_sys = (ru1.ru_stime.tv_sec - ru0.ru_stime.tv_sec) + (ru1.ru_stime.tv_usec - ru0.ru_stime.tv_usec) / 1e6;

    printf("{\"requests\": %llu, \"errors\": %llu, \"incomplete\": %llu, \"reconnects\": %llu, "
           "\"body_bytes\": %llu, \"elapsed_s\": %.6f, \"rps\": %.1f, \"gbps\": %.4f, ",
           (unsigned long long)completed, (unsigned long long)errors, (unsigned long long)incomplete,
           (unsigned long long)reconnects, (unsigned long long)body_bytes, elapsed,
           completed / elapsed, body_bytes / elapsed / 1e9);
    printf("\"latency_us\": {\"mean\": %.1f, \"p50\": %llu, \"p90\": %llu, \"p99\": %llu, \"p999\": %llu, \"max\": %llu}, ",
           completed ? lat_sum_us / completed : 0.0, (unsigned long long)percentile(0.50),
           (unsigned long long)percentile(0.90), (unsigned long long)percentile(0.99),
           (unsigned long long)percentile(0.999), (unsigned long long)lat_max_us);
    printf("\"status\": {");
    int first = 1;
    for (int s = 0; s < 600; s++) {
        if (status_counts[s]) {
            printf("%s\"%d\": %llu", first ? "" : ", ", s, (unsigned long long)status_counts[s]);
            first = 0;
        }
    }
    printf("}, \"x_cache\": {\"HIT\": %llu, \"MISS\": %llu, \"PARTIAL\": %llu, \"BYPASS\": %llu, \"other\": %llu, \"absent\": %llu}, ",
           (unsigned long long)xcache_hit, (unsigned long long)xcache_miss, (unsigned long long)xcache_partial,
           (unsigned long long)xcache_bypass, (unsigned long long)xcache_other, (unsigned long long)xcache_none);
    printf("\"connections\": %d, \"mode\": \"%s\", \"cpu_user_s\": %.4f, \"cpu_sys_s\": %.4f, \"first_error\": \"",
           nconns, copy_mode ? "copy" : "discard", cpu_user, cpu_sys);
    for (const char *e = first_error; *e; e++) {
        if (*e == '"' || *e == '\\') putchar('\\');
        if ((unsigned char)*e >= 0x20) putchar(*e);
    }
    printf("\"}\n");
    return 0;
}
