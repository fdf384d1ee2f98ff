/*
 * openloop: a single-threaded open-loop HTTP/1.1 load generator (Linux, epoll).
 *
 *   openloop --port P --rate R --duration S [--host 127.0.0.1] [--conns C] [--warmup S]
 *            [--arrival poisson|fixed] [--seed N] [--request-file F] [--timeout S] [--timerfd]
 *
 * The request file holds the raw bytes of one complete HTTP/1.1 keep-alive request (head and
 * body); they are written as-is for every request.
 *
 * Every request's intended send time is fixed before the clock starts (Poisson: exponential gaps
 * from a seeded generator; fixed: 1/R apart). C keep-alive connections (TCP_NODELAY) carry one
 * request each at a time. A due request that finds no idle connection waits in a FIFO backlog
 * and goes on the next connection to come free. Latency runs from the INTENDED send time to the
 * last byte of the answer, so a server stall, a full connection pool or a late client all show
 * up in the percentiles (no coordinated omission).
 *
 * The loop sleeps in epoll_pwait2 with a nanosecond timeout up to the next intended time (1 us
 * timer slack), or, where that syscall is missing (or with --timerfd), in epoll_wait with an
 * absolute CLOCK_MONOTONIC timerfd in the epoll set. It never spins.
 *
 * Answers: status line and headers are parsed; Content-Length is required (no Content-Length,
 * or chunked, is a "parse" error); the body is read and discarded. 2xx is ok; other statuses
 * are errors by class. A connection the server closes with a request in flight fails that
 * request ("conn") and is reopened. A request still unanswered `timeout` seconds after it was
 * sent (or still queued `timeout` seconds after its intended time) fails as "timeout". After
 * the schedule ends the client waits at most `timeout` for outstanding answers; whatever is
 * left fails as "timeout". So the program always ends by itself.
 *
 * Requests intended before start + warmup are sent but not sampled. Every measured latency is
 * kept (int64 ns) and sorted at the end: percentiles are exact (nearest rank).
 *
 * Output: one JSON object on stdout. Exit 0 when the run happened (even with request errors),
 * 2 on bad arguments or when the initial connections fail (message on stderr).
 */
#define _GNU_SOURCE
#include <errno.h>
#include <fcntl.h>
#include <getopt.h>
#include <math.h>
#include <netdb.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <stdarg.h>
#include <stdint.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <strings.h>
#include <sys/epoll.h>
#include <sys/prctl.h>
#include <sys/resource.h>
#include <sys/socket.h>
#include <sys/syscall.h>
#include <sys/timerfd.h>
#include <time.h>
#include <unistd.h>

#define NS_PER_S 1000000000LL
#define HOUSEKEEPING_NS 20000000LL /* expiry checks and reconnects, every 20 ms */
#define RECONNECT_DELAY_NS 50000000LL
#define MAX_HEAD 65536
#define MAX_RESPONSE (16 * 1024 * 1024)
#define TIMER_ID UINT32_MAX
#define MAX_EVENTS 256
#define FAR_FUTURE INT64_MAX

enum { ST_DOWN, ST_CONNECTING, ST_IDLE, ST_BUSY };
enum { E_4XX, E_5XX, E_OTHER, E_CONN, E_TIMEOUT, E_PARSE, E_KINDS };
static const char *ERROR_NAMES[E_KINDS] = {"status_4xx", "status_5xx", "status_other",
                                           "conn",       "timeout",    "parse"};

typedef struct {
    int fd;
    int state;
    int in_idle; /* has an entry in the idle ring (maybe stale) */
    int want_out; /* EPOLLOUT registered */
    int64_t req; /* schedule index in flight, -1 if none */
    int64_t sent_ns;
    size_t wpos;
    char *buf;
    size_t cap, len;
    size_t need; /* whole response once the head is parsed; 0 before */
    int status;
    int close_after; /* "connection: close" */
    int64_t retry_at;
    unsigned gen; /* bumped on every close: tells a reopened connection from the old one */
} conn_t;

/* ------------------------------------------------------------------ state */

static int epfd = -1, tfd = -1, use_pwait2 = 1;
static struct sockaddr_storage addr;
static socklen_t addrlen;
static const char *request;
static size_t request_len;

static conn_t *conns;
static int nconns, conns_down; /* down: waiting to retry a failed connect */
static int *idle_ring, idle_head, idle_count;

static int64_t *sched; /* intended send times, absolute CLOCK_MONOTONIC ns */
static int64_t nsched, m0; /* m0: first measured index */
static int64_t next_due, next_send; /* backlog = [next_send, next_due) */
static int64_t measure_from, sched_end;
static int64_t timeout_ns;

static int64_t *lat, *svc, *lag;
static int64_t nlat, nsvc, nlag;

static int64_t errors[E_KINDS], measured_errors;
static int64_t answered, measured_completed, measured_sent, total_sent;
static int64_t last_measured_send, last_ok_ns, max_backlog, busy;
static int64_t connect_failures, reconnects, stray;
static int64_t timer_armed_for = -1;

static void die(const char *fmt, ...) {
    va_list ap;
    va_start(ap, fmt);
    fputs("openloop: ", stderr);
    vfprintf(stderr, fmt, ap);
    fputc('\n', stderr);
    va_end(ap);
    exit(2);
}

static inline int64_t now_ns(void) {
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec * NS_PER_S + ts.tv_nsec;
}

/* this process's CPU seconds: user, system */
static void cpu_s(double *user, double *sys) {
    struct rusage ru;
    getrusage(RUSAGE_SELF, &ru);
    *user = ru.ru_utime.tv_sec + ru.ru_utime.tv_usec / 1e6;
    *sys = ru.ru_stime.tv_sec + ru.ru_stime.tv_usec / 1e6;
}

/* ------------------------------------------------------------------ schedule */

static uint64_t rng_state;

static uint64_t splitmix64(void) {
    uint64_t z = (rng_state += 0x9E3779B97F4A7C15ULL);
    z = (z ^ (z >> 30)) * 0xBF58476D1CE4E5B9ULL;
    z = (z ^ (z >> 27)) * 0x94D049BB133111EBULL;
    return z ^ (z >> 31);
}

static void build_schedule(int64_t start, double seconds, double rate, int poisson,
                           uint64_t seed) {
    int64_t end = start + (int64_t)(seconds * 1e9);
    int64_t cap = (int64_t)(seconds * rate * 1.2) + 1024;
    sched = malloc(cap * sizeof *sched);
    if (!sched) die("out of memory for %lld send times", (long long)cap);
    nsched = 0;
    if (!poisson) {
        double period = 1e9 / rate;
        int64_t n = (int64_t)(seconds * rate);
        for (int64_t i = 0; i < n; i++) sched[nsched++] = start + (int64_t)(i * period);
    } else {
        rng_state = seed * 1000003ULL + 12345;
        double mean_gap = 1e9 / rate, t = (double)start;
        for (;;) {
            double u = (splitmix64() >> 11) * (1.0 / 9007199254740992.0); /* [0, 1) */
            t += -log1p(-u) * mean_gap;
            if (t >= (double)end) break;
            if (nsched == cap) {
                cap *= 2;
                sched = realloc(sched, cap * sizeof *sched);
                if (!sched) die("out of memory for %lld send times", (long long)cap);
            }
            sched[nsched++] = (int64_t)t;
        }
    }
}

/* ------------------------------------------------------------------ connections */

static void ep_set(conn_t *c, int op, uint32_t events) {
    struct epoll_event ev = {.events = events, .data.u32 = (uint32_t)(c - conns)};
    if (epoll_ctl(epfd, op, c->fd, &ev) < 0) die("epoll_ctl: %s", strerror(errno));
}

static void idle_push(conn_t *c) {
    if (c->in_idle) return; /* its stale entry becomes valid again */
    idle_ring[(idle_head + idle_count) % nconns] = (int)(c - conns);
    idle_count++;
    c->in_idle = 1;
}

static conn_t *idle_pop(void) {
    while (idle_count) {
        conn_t *c = &conns[idle_ring[idle_head]];
        idle_head = (idle_head + 1) % nconns;
        idle_count--;
        c->in_idle = 0;
        if (c->state == ST_IDLE) return c;
    }
    return NULL;
}

static void send_request(conn_t *c, int64_t idx, int64_t now);
static void close_conn(conn_t *c, int64_t now);

/* a failed connect: retry later (housekeeping) */
static void set_down(conn_t *c, int64_t now) {
    c->fd = -1;
    c->state = ST_DOWN;
    c->retry_at = now + RECONNECT_DELAY_NS;
    connect_failures++;
    conns_down++;
}

/* a request that waited too long in the backlog: with every connection failing to connect it
 * could not be sent at all ("conn"); otherwise the connections were just busy ("timeout") */
static int queued_error_kind(void) { return conns_down == nconns ? E_CONN : E_TIMEOUT; }

static void count_error(int kind, int64_t idx) {
    errors[kind]++;
    if (idx >= m0) measured_errors++;
}

/* a connection is free: take the oldest queued request, or wait in the idle ring (LRU) */
static void became_idle(conn_t *c, int64_t now) {
    c->state = ST_IDLE;
    c->req = -1;
    if (next_send < next_due) {
        send_request(c, next_send++, now);
    } else {
        idle_push(c);
    }
}

static void try_write(conn_t *c, int64_t now) {
    while (c->wpos < request_len) {
        ssize_t n = send(c->fd, request + c->wpos, request_len - c->wpos, MSG_NOSIGNAL);
        if (n > 0) {
            c->wpos += (size_t)n;
        } else if (n < 0 && errno == EINTR) {
            continue;
        } else if (n < 0 && (errno == EAGAIN || errno == EWOULDBLOCK)) {
            if (!c->want_out) {
                c->want_out = 1;
                ep_set(c, EPOLL_CTL_MOD, EPOLLIN | EPOLLOUT);
            }
            return;
        } else {
            count_error(E_CONN, c->req);
            c->req = -1;
            close_conn(c, now);
            return;
        }
    }
    if (c->want_out) {
        c->want_out = 0;
        ep_set(c, EPOLL_CTL_MOD, EPOLLIN);
    }
}

static void send_request(conn_t *c, int64_t idx, int64_t now) {
    c->state = ST_BUSY;
    c->req = idx;
    c->sent_ns = now;
    c->wpos = 0;
    c->len = c->need = 0;
    busy++;
    total_sent++;
    if (idx >= m0) {
        measured_sent++;
        last_measured_send = now;
    }
    try_write(c, now);
}

static void start_connect(conn_t *c, int64_t now) {
    c->req = -1;
    c->len = c->need = 0;
    c->wpos = 0;
    c->want_out = 0;
    c->close_after = 0;
    int fd = socket(addr.ss_family, SOCK_STREAM | SOCK_NONBLOCK | SOCK_CLOEXEC, 0);
    if (fd < 0) die("socket: %s", strerror(errno));
    int one = 1;
    setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
    c->fd = fd;
    if (connect(fd, (struct sockaddr *)&addr, addrlen) == 0) {
        /* idle, not sending yet: the loop's dispatch hands it queued requests (no recursion
         * through a send that fails and reconnects again) */
        ep_set(c, EPOLL_CTL_ADD, EPOLLIN);
        c->state = ST_IDLE;
        idle_push(c);
    } else if (errno == EINPROGRESS) {
        c->state = ST_CONNECTING;
        c->want_out = 1;
        ep_set(c, EPOLL_CTL_ADD, EPOLLOUT);
    } else {
        close(fd);
        set_down(c, now);
    }
}

static void on_connected(conn_t *c, int64_t now) {
    int err = 0;
    socklen_t len = sizeof err;
    if (getsockopt(c->fd, SOL_SOCKET, SO_ERROR, &err, &len) < 0) err = errno;
    if (err) {
        epoll_ctl(epfd, EPOLL_CTL_DEL, c->fd, NULL);
        close(c->fd);
        set_down(c, now);
        return;
    }
    c->want_out = 0;
    ep_set(c, EPOLL_CTL_MOD, EPOLLIN);
    became_idle(c, now);
}

/* close (the in-flight request, if any, was already counted) and reopen at once */
static void close_conn(conn_t *c, int64_t now) {
    c->gen++;
    if (c->state == ST_BUSY) busy--;
    if (c->fd >= 0) {
        close(c->fd); /* also removes it from the epoll set */
        c->fd = -1;
    }
    c->state = ST_DOWN;
    reconnects++;
    start_connect(c, now);
}

/* ------------------------------------------------------------------ responses */

static int parse_head(conn_t *c, size_t head_end) {
    const char *b = c->buf;
    const char *eoh = b + head_end; /* points at "\r\n\r\n" */
    if (head_end < 12 || memcmp(b, "HTTP/1.", 7) != 0 || b[8] != ' ') return -1;
    if (b[9] < '0' || b[9] > '9' || b[10] < '0' || b[10] > '9' || b[11] < '0' || b[11] > '9')
        return -1;
    c->status = (b[9] - '0') * 100 + (b[10] - '0') * 10 + (b[11] - '0');
    long long cl = -1;
    c->close_after = 0;
    const char *line = memchr(b, '\n', head_end);
    while (line && line < eoh) {
        line++; /* start of a header line */
        const char *end = memchr(line, '\n', (size_t)(eoh + 2 - line));
        if (!end) end = eoh + 2;
        size_t n = (size_t)(end - line);
        if (n > 15 && strncasecmp(line, "content-length:", 15) == 0) {
            const char *p = line + 15;
            while (p < end && (*p == ' ' || *p == '\t')) p++;
            if (p >= end || *p < '0' || *p > '9') return -1;
            long long v = 0;
            while (p < end && *p >= '0' && *p <= '9') {
                v = v * 10 + (*p++ - '0');
                if (v > MAX_RESPONSE) return -1;
            }
            cl = v;
        } else if (n > 18 && strncasecmp(line, "transfer-encoding:", 18) == 0) {
            return -1; /* chunked: not supported */
        } else if (n > 11 && strncasecmp(line, "connection:", 11) == 0) {
            for (const char *p = line + 11; p + 5 <= end; p++)
                if (strncasecmp(p, "close", 5) == 0) c->close_after = 1;
        }
        line = end < eoh ? end : NULL;
    }
    if (cl < 0) return -1;
    c->need = head_end + 4 + (size_t)cl;
    return 0;
}

static void on_complete(conn_t *c, int64_t now) {
    int64_t idx = c->req;
    int status = c->status;
    answered++;
    busy--;
    if (idx >= m0) measured_completed++;
    if (status >= 200 && status < 300) {
        if (idx >= m0) {
            lat[nlat++] = now - sched[idx];
            svc[nsvc++] = now - c->sent_ns;
            last_ok_ns = now;
        }
    } else {
        count_error(status >= 500 ? E_5XX : status >= 400 ? E_4XX : E_OTHER, idx);
    }
    size_t extra = c->len - c->need;
    c->len = c->need = 0;
    c->req = -1;
    if (extra || c->close_after) {
        if (extra) stray++; /* bytes nobody asked for: start afresh */
        c->state = ST_IDLE;
        close_conn(c, now);
        return;
    }
    became_idle(c, now);
}

static void on_readable(conn_t *c, int64_t now) {
    if (c->cap - c->len < 4096) {
        size_t cap = c->cap * 2;
        if (cap > MAX_RESPONSE + MAX_HEAD) {
            if (c->state == ST_BUSY) count_error(E_PARSE, c->req);
            close_conn(c, now);
            return;
        }
        char *nb = realloc(c->buf, cap);
        if (!nb) die("out of memory");
        c->buf = nb;
        c->cap = cap;
    }
    ssize_t n = recv(c->fd, c->buf + c->len, c->cap - c->len, 0);
    if (n < 0) {
        if (errno == EAGAIN || errno == EWOULDBLOCK || errno == EINTR) return;
    }
    if (n <= 0) { /* closed by the server, or reset */
        if (c->state == ST_BUSY) count_error(E_CONN, c->req);
        close_conn(c, now);
        return;
    }
    if (c->state != ST_BUSY) { /* an answer to nothing */
        stray++;
        close_conn(c, now);
        return;
    }
    c->len += (size_t)n;
    if (!c->need) {
        char *eoh = memmem(c->buf, c->len, "\r\n\r\n", 4);
        if (!eoh) {
            if (c->len > MAX_HEAD) {
                count_error(E_PARSE, c->req);
                close_conn(c, now);
            }
            return;
        }
        if (parse_head(c, (size_t)(eoh - c->buf)) < 0) {
            count_error(E_PARSE, c->req);
            close_conn(c, now);
            return;
        }
    }
    if (c->len >= c->need) on_complete(c, now);
}

/* ------------------------------------------------------------------ schedule keeping */

static void dispatch_due(int64_t now) {
    while (next_due < nsched && sched[next_due] <= now) {
        if (next_due >= m0) lag[nlag++] = now - sched[next_due];
        next_due++;
    }
    while (next_send < next_due) {
        conn_t *c = idle_pop();
        if (!c) break;
        send_request(c, next_send++, now);
    }
    if (now >= measure_from && next_due - next_send > max_backlog)
        max_backlog = next_due - next_send;
}

static void housekeeping(int64_t now) {
    int64_t limit = now - timeout_ns;
    for (int i = 0; i < nconns; i++) {
        conn_t *c = &conns[i];
        if (c->state == ST_BUSY && c->sent_ns < limit) {
            count_error(E_TIMEOUT, c->req);
            c->req = -1;
            close_conn(c, now);
        } else if (c->state == ST_DOWN && c->retry_at <= now) {
            conns_down--;
            start_connect(c, now);
        }
    }
    while (next_send < next_due && sched[next_send] < limit)
        count_error(queued_error_kind(), next_send++);
}

static int wait_events(struct epoll_event *evs, int64_t deadline, int64_t now) {
    int64_t rel = deadline - now;
    if (rel < 0) rel = 0;
#ifdef SYS_epoll_pwait2
    if (use_pwait2) {
        struct timespec ts = {.tv_sec = rel / NS_PER_S, .tv_nsec = rel % NS_PER_S};
        int n = (int)syscall(SYS_epoll_pwait2, epfd, evs, MAX_EVENTS, &ts, NULL, 0);
        if (n >= 0 || errno != ENOSYS) return n;
        use_pwait2 = 0; /* an older kernel: fall back to the timerfd */
    }
#endif
    if (deadline != timer_armed_for) {
        struct itimerspec its = {{0, 0}, {0, 0}};
        int64_t when = deadline > 0 ? deadline : 1;
        its.it_value.tv_sec = when / NS_PER_S;
        its.it_value.tv_nsec = when % NS_PER_S;
        if (timerfd_settime(tfd, TFD_TIMER_ABSTIME, &its, NULL) < 0)
            die("timerfd_settime: %s", strerror(errno));
        timer_armed_for = deadline;
    }
    return epoll_wait(epfd, evs, MAX_EVENTS, -1);
}

/* ------------------------------------------------------------------ output */

static int cmp_i64(const void *a, const void *b) {
    int64_t x = *(const int64_t *)a, y = *(const int64_t *)b;
    return (x > y) - (x < y);
}

static void print_dist(const char *name, int64_t *v, int64_t n) {
    printf("\"%s\":", name);
    if (n == 0) {
        printf("{\"p50\":null,\"p90\":null,\"p99\":null,\"p99.9\":null,\"max\":null,"
               "\"mean\":null,\"n\":0}");
        return;
    }
    qsort(v, (size_t)n, sizeof *v, cmp_i64);
    static const double ps[] = {50, 90, 99, 99.9};
    static const char *pn[] = {"p50", "p90", "p99", "p99.9"};
    double sum = 0;
    for (int64_t i = 0; i < n; i++) sum += (double)v[i];
    putchar('{');
    for (int k = 0; k < 4; k++) {
        int64_t rank = (int64_t)ceil(ps[k] / 100.0 * (double)n); /* nearest rank */
        if (rank < 1) rank = 1;
        printf("\"%s\":%.6f,", pn[k], v[rank - 1] / 1e6);
    }
    printf("\"max\":%.6f,\"mean\":%.6f,\"n\":%lld}", v[n - 1] / 1e6, sum / n / 1e6,
           (long long)n);
}

/* ------------------------------------------------------------------ main */

static void usage(void) {
    fputs("usage: openloop --port P --rate R --duration S [--host H] [--conns C] [--warmup S]\n"
          "                [--arrival poisson|fixed] [--seed N] [--request-file F] "
          "[--timeout S] [--timerfd]\n",
          stderr);
    exit(2);
}

static double parse_double(const char *s, const char *what) {
    char *end;
    errno = 0;
    double v = strtod(s, &end);
    if (errno || end == s || *end) die("bad %s: %s", what, s);
    return v;
}

int main(int argc, char **argv) {
    const char *host = "127.0.0.1", *port = NULL, *request_file = NULL;
    double rate = 0, duration = 0, warmup = 0, timeout = 2.0;
    int poisson = 1;
    uint64_t seed = 0;
    nconns = 16;
    static const struct option opts[] = {
        {"host", required_argument, 0, 'h'},     {"port", required_argument, 0, 'p'},
        {"conns", required_argument, 0, 'c'},    {"rate", required_argument, 0, 'r'},
        {"duration", required_argument, 0, 'd'}, {"warmup", required_argument, 0, 'w'},
        {"arrival", required_argument, 0, 'a'},  {"seed", required_argument, 0, 's'},
        {"request-file", required_argument, 0, 'f'},
        {"timeout", required_argument, 0, 't'},  {"timerfd", no_argument, 0, 'T'},
        {"help", no_argument, 0, '?'},           {0, 0, 0, 0}};
    int opt;
    while ((opt = getopt_long(argc, argv, "", opts, NULL)) != -1) {
        switch (opt) {
        case 'h': host = optarg; break;
        case 'p': port = optarg; break;
        case 'c': nconns = (int)parse_double(optarg, "--conns"); break;
        case 'r': rate = parse_double(optarg, "--rate"); break;
        case 'd': duration = parse_double(optarg, "--duration"); break;
        case 'w': warmup = parse_double(optarg, "--warmup"); break;
        case 's': seed = (uint64_t)parse_double(optarg, "--seed"); break;
        case 'f': request_file = optarg; break;
        case 't': timeout = parse_double(optarg, "--timeout"); break;
        case 'T': use_pwait2 = 0; break;
        case 'a':
            if (strcmp(optarg, "poisson") == 0) poisson = 1;
            else if (strcmp(optarg, "fixed") == 0) poisson = 0;
            else die("--arrival must be poisson or fixed, got %s", optarg);
            break;
        default: usage();
        }
    }
    if (optind != argc || !port || !request_file) usage();
    if (!(rate > 0) || !(duration > 0) || warmup < 0 || !(timeout > 0) || nconns < 1 ||
        nconns > 100000)
        die("expected --rate > 0, --duration > 0, --warmup >= 0, --timeout > 0, "
            "1 <= --conns <= 100000");
    if (strcmp(host, "localhost") == 0) host = "127.0.0.1";

    /* the request */
    FILE *f = fopen(request_file, "rb");
    if (!f) die("cannot open %s: %s", request_file, strerror(errno));
    fseek(f, 0, SEEK_END);
    long flen = ftell(f);
    fseek(f, 0, SEEK_SET);
    if (flen <= 0) die("%s is empty", request_file);
    char *rbuf = malloc((size_t)flen);
    if (!rbuf || fread(rbuf, 1, (size_t)flen, f) != (size_t)flen)
        die("cannot read %s", request_file);
    fclose(f);
    request = rbuf;
    request_len = (size_t)flen;

    /* the address */
    struct addrinfo hints = {.ai_socktype = SOCK_STREAM,
                             .ai_flags = AI_NUMERICHOST | AI_NUMERICSERV};
    struct addrinfo *ai;
    int gai = getaddrinfo(host, port, &hints, &ai);
    if (gai) die("bad address %s:%s: %s", host, port, gai_strerror(gai));
    memcpy(&addr, ai->ai_addr, ai->ai_addrlen);
    addrlen = ai->ai_addrlen;
    freeaddrinfo(ai);

    prctl(PR_SET_TIMERSLACK, 1000UL, 0, 0, 0); /* 1 us: wake up on time, not 50 us late */
    epfd = epoll_create1(EPOLL_CLOEXEC);
    tfd = timerfd_create(CLOCK_MONOTONIC, TFD_NONBLOCK | TFD_CLOEXEC);
    if (epfd < 0 || tfd < 0) die("epoll/timerfd: %s", strerror(errno));
    struct epoll_event tev = {.events = EPOLLIN, .data.u32 = TIMER_ID};
    if (epoll_ctl(epfd, EPOLL_CTL_ADD, tfd, &tev) < 0) die("epoll_ctl: %s", strerror(errno));

    /* the connections, before the clock starts (blocking connects, then non-blocking) */
    conns = calloc((size_t)nconns, sizeof *conns);
    idle_ring = calloc((size_t)nconns, sizeof *idle_ring);
    if (!conns || !idle_ring) die("out of memory");
    m0 = INT64_MAX; /* nothing is measured until the schedule exists */
    for (int i = 0; i < nconns; i++) {
        conn_t *c = &conns[i];
        c->cap = 16384;
        c->buf = malloc(c->cap);
        if (!c->buf) die("out of memory");
        c->req = -1;
        c->fd = socket(addr.ss_family, SOCK_STREAM | SOCK_CLOEXEC, 0);
        if (c->fd < 0) die("socket: %s", strerror(errno));
        if (connect(c->fd, (struct sockaddr *)&addr, addrlen) < 0)
            die("cannot connect to %s:%s (connection %d of %d): %s", host, port, i + 1, nconns,
                strerror(errno));
        int one = 1;
        setsockopt(c->fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        fcntl(c->fd, F_SETFL, fcntl(c->fd, F_GETFL) | O_NONBLOCK);
        ep_set(c, EPOLL_CTL_ADD, EPOLLIN);
        c->state = ST_IDLE;
        idle_push(c);
    }

    /* the schedule */
    int64_t start = now_ns() + 2000000; /* 2 ms from now */
    build_schedule(start, warmup + duration, rate, poisson, seed);
    measure_from = start + (int64_t)(warmup * 1e9);
    sched_end = start + (int64_t)((warmup + duration) * 1e9);
    timeout_ns = (int64_t)(timeout * 1e9);
    m0 = 0;
    while (m0 < nsched && sched[m0] < measure_from) m0++;
    int64_t nmeasured = nsched - m0;
    lat = malloc((size_t)(nmeasured + 1) * sizeof *lat);
    svc = malloc((size_t)(nmeasured + 1) * sizeof *svc);
    lag = malloc((size_t)(nmeasured + 1) * sizeof *lag);
    if (!lat || !svc || !lag) die("out of memory for %lld samples", (long long)nmeasured);
    /* touch the sample arrays now, not inside the run (page faults) */
    memset(lat, 0, (size_t)(nmeasured + 1) * sizeof *lat);
    memset(svc, 0, (size_t)(nmeasured + 1) * sizeof *svc);
    memset(lag, 0, (size_t)(nmeasured + 1) * sizeof *lag);

    double user0, sys0;
    cpu_s(&user0, &sys0);
    int64_t wall0 = now_ns();
    int64_t drain_deadline = sched_end + timeout_ns;
    int64_t next_house = start + HOUSEKEEPING_NS;
    struct epoll_event evs[MAX_EVENTS];
    int64_t now = now_ns();
    for (;;) {
        int draining = next_due >= nsched;
        if (draining && (busy == 0 && next_send >= next_due)) break;
        if (draining && now >= drain_deadline) break;
        int64_t deadline = next_house;
        if (!draining && sched[next_due] < deadline) deadline = sched[next_due];
        if (draining && drain_deadline < deadline) deadline = drain_deadline;
        int n = wait_events(evs, deadline, now);
        if (n < 0 && errno != EINTR) die("epoll_wait: %s", strerror(errno));
        now = now_ns();
        for (int i = 0; i < n; i++) {
            uint32_t id = evs[i].data.u32;
            if (id == TIMER_ID) {
                uint64_t expirations;
                if (read(tfd, &expirations, sizeof expirations) < 0 && errno != EAGAIN) {
                    die("timerfd read: %s", strerror(errno));
                }
                timer_armed_for = -1;
                continue;
            }
            conn_t *c = &conns[id];
            uint32_t e = evs[i].events;
            if (c->state == ST_CONNECTING) {
                if (e & (EPOLLOUT | EPOLLERR | EPOLLHUP)) on_connected(c, now);
                continue;
            }
            if (c->fd < 0 || c->state == ST_DOWN) continue;
            unsigned gen = c->gen;
            if ((e & EPOLLOUT) && c->state == ST_BUSY) try_write(c, now);
            if (c->gen != gen) continue; /* the write failed: closed (and reopening) */
            if (e & (EPOLLIN | EPOLLERR | EPOLLHUP)) on_readable(c, now);
        }
        dispatch_due(now);
        if (now >= next_house) {
            housekeeping(now);
            next_house = now + HOUSEKEEPING_NS;
        }
    }
    now = now_ns();
    /* whatever is left after the drain: timeouts (or connection errors if nothing was up) */
    int64_t unanswered = 0;
    for (int i = 0; i < nconns; i++) {
        if (conns[i].state == ST_BUSY) {
            count_error(E_TIMEOUT, conns[i].req);
            unanswered++;
        }
    }
    /* requests never due yet cannot exist here (the schedule ended); queued ones fail */
    while (next_send < next_due) {
        count_error(queued_error_kind(), next_send++);
        unanswered++;
    }
    double user1, sys1;
    cpu_s(&user1, &sys1);
    double user = user1 - user0, sys = sys1 - sys0, cpu = user + sys;
    double wall = (now - wall0) / 1e9;

    int64_t errors_total = 0;
    for (int k = 0; k < E_KINDS; k++) errors_total += errors[k];
    double window = duration;
    if (last_measured_send - measure_from > (int64_t)(duration * 1e9))
        window = (last_measured_send - measure_from) / 1e9;
    double achieved = last_ok_ns > measure_from ? nlat / ((last_ok_ns - measure_from) / 1e9) : 0;

    printf("{\"client\":\"openloop-c\",\"intended_rate\":%.3f,\"arrival\":\"%s\",\"conns\":%d,",
           rate, poisson ? "poisson" : "fixed", nconns);
    printf("\"duration_s\":%.6f,\"warmup_s\":%.6f,\"timeout_s\":%.6f,\"seed\":%llu,", duration,
           warmup, timeout, (unsigned long long)seed);
    printf("\"timer\":\"%s\",", use_pwait2 ? "epoll_pwait2" : "timerfd");
    printf("\"scheduled\":%lld,\"measured_scheduled\":%lld,\"sent\":%lld,\"measured_sent\":%lld,",
           (long long)nsched, (long long)nmeasured, (long long)total_sent,
           (long long)measured_sent);
    printf("\"achieved_send_rate\":%.3f,\"achieved_rate\":%.3f,\"window_s\":%.6f,",
           measured_sent / window, achieved, window);
    printf("\"completed\":%lld,\"ok\":%lld,\"answered\":%lld,\"unanswered\":%lld,",
           (long long)measured_completed, (long long)nlat, (long long)answered,
           (long long)unanswered);
    printf("\"errors\":{");
    for (int k = 0; k < E_KINDS; k++)
        printf("%s\"%s\":%lld", k ? "," : "", ERROR_NAMES[k], (long long)errors[k]);
    printf("},\"errors_total\":%lld,\"measured_errors\":%lld,", (long long)errors_total,
           (long long)measured_errors);
    printf("\"connect_failures\":%lld,\"reconnects\":%lld,\"stray_responses\":%lld,",
           (long long)connect_failures, (long long)reconnects, (long long)stray);
    printf("\"max_backlog\":%lld,", (long long)max_backlog);
    printf("\"client_cpu_s\":%.6f,\"client_cpu_user_s\":%.6f,\"client_cpu_sys_s\":%.6f,", cpu,
           user, sys);
    printf("\"client_cpu_us_per_request\":%.3f,\"wall_s\":%.6f,",
           cpu / (double)(total_sent ? total_sent : 1) * 1e6, wall);
    print_dist("latency_ms", lat, nlat);
    putchar(',');
    print_dist("service_ms", svc, nsvc);
    putchar(',');
    print_dist("dispatch_lag_ms", lag, nlag);
    printf("}\n");
    fflush(stdout);
    return 0;
}
