/* The freeze gates of a slave and the frozen phase of its cuts, without the GIL.
 *
 * Why native: a Python gate needs a Python thread to be scheduled (and to win
 * the GIL from the writers) before a freeze can close it or a thaw open it;
 * on two cores that sat at 2-3 ms per establish.  Here the write path's
 * check is one C call (the GIL is released while it waits), and FREEZE, THAW
 * and ABORT from the coordinator are served by a C thread on a unix socket of
 * their own, so a write is held and released with no Python thread involved.
 *
 * Gate (one per volume): enter/leave count the modifying requests inside;
 * close stops new ones and waits for those inside to leave.  Held writers are
 * admitted in arrival order (a ticket queue) and new arrivals queue behind
 * them, so a thaw never lets a late write overtake an early one.
 *
 * Core (one per slave): the phase IDLE -> FROZEN -> CUT (thawed) | IDLE
 * (aborted, expired).  What happens to a cut after its thaw (copy, abort,
 * done) is Python's (nbdplugin/slave.py), which hands it back with cg_end.
 * The rules of the frozen phase (DESIGN.md, "The cycle") live here:
 *   - the lease: a FROZEN cut not thawed or aborted by its deadline is
 *     aborted by this thread ("expired") and its gates open;
 *   - the cut belongs to the connection that froze it: when it ends while
 *     FROZEN, the cut is aborted at once; a freeze from a connection already
 *     gone is refused (cg_owner_gone remembers recent owners for the Python
 *     server, whose connection may end before its freeze is served);
 *   - cut numbers only go up.
 * The Python side learns of transitions from ``gen`` (each gate carries a
 * copy its writers see at admission) and, at a freeze and for a cut that
 * ended while frozen, from one byte on ``notify_fd``.
 *
 * Locks: ``op`` serialises transitions (it is held while a freeze drains);
 * ``st`` guards the state fields and is never held while waiting, so a
 * writer inside a gate can read the state while a freeze waits for it.
 * Lock order: op -> st -> a gate's mutex.
 */
#define _GNU_SOURCE
#include "gate.h"

#include <arpa/inet.h>
#include <errno.h>
#include <fcntl.h>
#include <netinet/in.h>
#include <netinet/tcp.h>
#include <openssl/err.h>
#include <openssl/ssl.h>
#include <openssl/x509.h>
#include <inttypes.h>
#include <poll.h>
#include <pthread.h>
#include <sched.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/socket.h>
#include <time.h>
#include <unistd.h>

/* The protocol's limits (CG_MAX_N, CG_MAX_LEASE_MS, CG_MAX_NAME, ...) come
 * from gate.h's _limits.h, which native/build.py generates from
 * wire/protocol.py: they are set there and nowhere else. */
#define MAX_CONNS 16
#define IDLE_TIMEOUT_S 60.0
#define GONE_RING 64
/* The longest freeze reply: every volume's name and block count. */
#define REPLY_ROOM (CG_MAX_VOLUMES * (CG_MAX_NAME + 24) + 128)

_Static_assert(CG_MAX_VOLUMES <= 64, "a cut's volumes are a 64-bit mask: wire/protocol.py's"
               " MAX_SLAVE_VOLUMES cannot be above 64");
_Static_assert(CG_GATE_MAX_LINE >= REPLY_ROOM, "a freeze reply must fit a line buffer");

static double now_s(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return ts.tv_sec + ts.tv_nsec / 1e9;
}

/* ------------------------------------------------------------------ gate */

struct cg_gate {
    int refs;                   /* atomic */
    pthread_mutex_t mu;
    pthread_cond_t cv;          /* CLOCK_MONOTONIC */
    int closed;
    int64_t inside;
    uint64_t next_ticket;       /* next ticket for a waiter */
    uint64_t serving;           /* ticket admitted next */
    uint64_t gen;
    uint64_t admitted;          /* requests admitted so far */
    double closed_at;
};

cg_gate *cg_gate_new(void)
{
    cg_gate *g = calloc(1, sizeof *g);
    if (!g)
        return NULL;
    g->refs = 1;
    pthread_condattr_t ca;
    pthread_condattr_init(&ca);
    pthread_condattr_setclock(&ca, CLOCK_MONOTONIC);
    pthread_mutex_init(&g->mu, NULL);
    pthread_cond_init(&g->cv, &ca);
    pthread_condattr_destroy(&ca);
    return g;
}

void cg_gate_unref(cg_gate *g)
{
    if (!g || __atomic_sub_fetch(&g->refs, 1, __ATOMIC_ACQ_REL) > 0)
        return;
    pthread_mutex_destroy(&g->mu);
    pthread_cond_destroy(&g->cv);
    free(g);
}

uint64_t cg_gate_enter(cg_gate *g, uint64_t *seq)
{
    pthread_mutex_lock(&g->mu);
    if (g->closed || g->next_ticket != g->serving) {
        uint64_t ticket = g->next_ticket++;
        while (g->closed || ticket != g->serving)
            pthread_cond_wait(&g->cv, &g->mu);
        g->serving++;
        pthread_cond_broadcast(&g->cv);     /* the next ticket may go too */
    }
    g->inside++;
    if (seq)
        *seq = g->admitted;
    g->admitted++;
    uint64_t gen = g->gen;
    pthread_mutex_unlock(&g->mu);
    return gen;
}

void cg_gate_leave(cg_gate *g)
{
    pthread_mutex_lock(&g->mu);
    /* Only a close waits for the last one out, and only while closed. */
    if (--g->inside == 0 && g->closed)
        pthread_cond_broadcast(&g->cv);
    pthread_mutex_unlock(&g->mu);
}

static void gate_shut(cg_gate *g)
{
    pthread_mutex_lock(&g->mu);
    if (!g->closed) {
        g->closed = 1;
        g->closed_at = now_s();
    }
    pthread_mutex_unlock(&g->mu);
}

/* Close and wait up to timeout_s for requests inside to leave: 1 if they
 * did, 0 if not (the gate stays closed; the caller decides). */
int cg_gate_close(cg_gate *g, double timeout_s)
{
    gate_shut(g);
    double end = now_s() + (timeout_s > 0 ? timeout_s : 0);
    struct timespec ts = {(time_t)end, (long)((end - (time_t)end) * 1e9)};
    pthread_mutex_lock(&g->mu);
    int rc = 0;
    while (g->inside > 0 && rc != ETIMEDOUT)
        rc = pthread_cond_timedwait(&g->cv, &g->mu, &ts);
    int ok = g->inside == 0;
    pthread_mutex_unlock(&g->mu);
    return ok;
}

/* Open; returns how long the gate was closed, in seconds. */
double cg_gate_open(cg_gate *g)
{
    pthread_mutex_lock(&g->mu);
    double held = g->closed ? now_s() - g->closed_at : 0.0;
    g->closed = 0;
    pthread_cond_broadcast(&g->cv);
    pthread_mutex_unlock(&g->mu);
    return held;
}

void cg_gate_info(cg_gate *g, int *closed, int64_t *inside, int64_t *waiting)
{
    pthread_mutex_lock(&g->mu);
    *closed = g->closed;
    *inside = g->inside;
    *waiting = (int64_t)(g->next_ticket - g->serving);
    pthread_mutex_unlock(&g->mu);
}

static void gate_set_gen(cg_gate *g, uint64_t gen)
{
    pthread_mutex_lock(&g->mu);
    g->gen = gen;
    pthread_mutex_unlock(&g->mu);
}

/* ------------------------------------------------------------------ core */

/* The connection slots.  A TLS 1.3 handshake between our hosts takes
 * milliseconds (one round trip, two signature checks), well under a second
 * on a loaded host or across a WAN: a connection that has not finished it
 * in TLS_DEADLINE_S is closed.
 *
 * Nobody holds the slots: when all MAX_CONNS are taken, a new connection
 * takes the slot of, in this order, the oldest one that has not
 * authenticated and said nothing, the oldest one in the middle of its
 * handshake, the oldest authenticated one that never sent a request, the
 * one idle the longest -- never the one that froze the cut now frozen
 * (closing it would abort the cut).  The coordinator asks at once and
 * keeps asking, so a flood of idle connections evicts itself.
 * wire/slots.py holds the same order, and its reasons, for the Python
 * servers. */
#define TLS_DEADLINE_S 2
#define STR_(x) #x
#define STR(x) STR_(x)
/* Lines about connections we closed on our own (evicted, no handshake)
 * come at most this often, with a count: a flood must not flood the log. */
#define QUIET_LOG_S 10.0

struct conn {
    int fd;                     /* -1: free slot */
    int64_t id;                 /* owner id of a freeze on it */
    SSL *ssl;                   /* TCP: its TLS session (fd non-blocking) */
    int handshaking;            /* TLS handshake not done yet */
    int heard;                  /* it has sent something */
    int used;                   /* it has sent a request */
    short want;                 /* poll events the handshake waits for */
    double admitted;            /* accepted at */
    double deadline;            /* handshake deadline */
    size_t len;
    double last;                /* last request, for the idle timeout */
    char ip[64];                /* the peer's address, for logs (TCP) */
    char buf[CG_GATE_MAX_LINE + 2];     /* a line, its '\n', a NUL */
};

struct tally {                  /* like events, logged now and then */
    unsigned count;
    double logged_at;
};

struct cg_core {
    int ngates;
    cg_gate *gates[CG_MAX_VOLUMES];
    const uint64_t *cr[CG_MAX_VOLUMES], *oos[CG_MAX_VOLUMES];
    size_t nwords[CG_MAX_VOLUMES];
    char names[CG_MAX_VOLUMES][CG_MAX_NAME + 1];
    /* The node's session and name (cg_core_identity; "" until set): a
     * request naming another session is refused with kind "session". */
    char session[CG_MAX_NAME + 1];
    char who[160];              /* "node b1": how the refusal names this node */
    uint64_t epoch;             /* the recorded leader epoch (atomic; 0: none) */

    pthread_mutex_t op;
    pthread_mutex_t st;
    int phase;
    uint64_t n;
    int ended;
    uint64_t volumes, full, gen;
    int64_t owner;
    double deadline;
    int64_t gone[GONE_RING];
    unsigned gone_next;
    int notify_fd;

    pthread_t thread;
    int started;
    int wake[2];
    int listen_fd;              /* -1 until cg_serve or cg_serve_tls */
    SSL_CTX *tls;               /* cg_serve_tls: peers need a client certificate */
    uint32_t uid;
    int stopping;
    int64_t next_id;
    double accept_paused_until; /* after a failed accept */
    struct tally evicted, stalled, left;
    struct conn conns[MAX_CONNS];
};

static void *run(void *arg);
static void serve_lines(cg_core *c, struct conn *k);

static void say(const char *fmt, ...)
{
    char line[512];
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(line, sizeof line, fmt, ap);
    va_end(ap);
    fprintf(stderr, "cgmirror gate: %s\n", line);
}

/* Count one event; say "<count> <what>" on the first and then at most
 * every QUIET_LOG_S seconds. */
static void tally(struct tally *t, const char *what)
{
    t->count++;
    double now = now_s();
    if (t->logged_at && now - t->logged_at < QUIET_LOG_S)
        return;
    say("closed %u %s", t->count, what);
    t->count = 0;
    t->logged_at = now;
}

static int fail(struct cg_result *r, const char *kind, const char *fmt, ...)
{
    va_list ap;
    snprintf(r->kind, sizeof r->kind, "%s", kind);
    va_start(ap, fmt);
    vsnprintf(r->msg, sizeof r->msg, fmt, ap);
    va_end(ap);
    return -1;
}

static void wake_thread(cg_core *c)
{
    char b = 0;
    if (write(c->wake[1], &b, 1) < 0) { /* full pipe: it is awake anyway */ }
}

/* A transition happened (st held): bump gen and show it to every gate.
 * Gates learn it before any of them opens, so a writer admitted after a
 * thaw or an abort sees the new generation. */
static void bump(cg_core *c)
{
    c->gen++;
    for (int i = 0; i < c->ngates; i++)
        gate_set_gen(c->gates[i], c->gen);
}

/* Tell Python's notify thread: at a freeze, so that it takes the cut (its
 * PiTs) while the writers are held rather than the first writer after the
 * thaw; and for a cut that ended here (aborted or expired while frozen),
 * whose PiTs it drops.  Not at a thaw: a Python thread woken then would
 * hold the GIL just when the released writers need it. */
static void notify(cg_core *c)
{
    if (c->notify_fd >= 0) {
        char b = 1;
        if (write(c->notify_fd, &b, 1) < 0) { /* full pipe: Python will look */ }
    }
}

static double open_gates(cg_core *c, uint64_t mask)
{
    double held = 0;
    for (int i = 0; i < c->ngates; i++)
        if (mask & (1ULL << i)) {
            double h = cg_gate_open(c->gates[i]);
            if (h > held)
                held = h;
        }
    return held;
}

static const char *ended_name(int ended)
{
    static const char *names[] = {"", "aborted", "expired", "done", "failed"};
    return ended >= 0 && ended <= CG_ENDED_FAILED ? names[ended] : "";
}

static const char *phase_name(int phase)
{
    return phase == CG_FROZEN ? "frozen" : phase == CG_CUT ? "cut" : "idle";
}

/* The refusal of an event for cut n that does not apply (st held), worded
 * as protocol.CutMachine words it. */
static int mismatch(cg_core *c, const char *event, uint64_t n, struct cg_result *r)
{
    if (n == c->n && c->phase == CG_IDLE && c->ended)
        return fail(r, "ended", "cut %" PRIu64 " already ended (%s)", n, ended_name(c->ended));
    if (n == c->n)
        return fail(r, "order", "%s is not allowed while cut %" PRIu64 " is %s%s", event, n,
                    phase_name(c->phase),
                    c->phase == CG_CUT ? " (thawed: use the control socket)" : "");
    if (c->n == 0)
        return fail(r, "order", "%s %" PRIu64 " does not match: no cut yet", event, n);
    return fail(r, "order", "%s %" PRIu64 " does not match: cut %" PRIu64 " is %s", event, n,
                c->n, phase_name(c->phase));
}

cg_core *cg_core_new(cg_gate **gates, int ngates, const char *names, uint64_t last_n,
                     int notify_fd)
{
    if (ngates < 1 || ngates > CG_MAX_VOLUMES)
        return NULL;
    cg_core *c = calloc(1, sizeof *c);
    if (!c)
        return NULL;
    int i = 0;
    for (const char *p = names; *p && i < ngates; i++) {
        const char *e = strchr(p, '\n');
        size_t len = e ? (size_t)(e - p) : strlen(p);
        if (len > CG_MAX_NAME)
            break;
        memcpy(c->names[i], p, len);
        c->names[i][len] = 0;
        p += len + (e ? 1 : 0);
    }
    if (i != ngates) {
        free(c);
        return NULL;
    }
    c->ngates = ngates;
    memcpy(c->gates, gates, ngates * sizeof *gates);
    c->n = last_n;
    c->notify_fd = notify_fd;
    c->listen_fd = -1;
    for (int i = 0; i < MAX_CONNS; i++)
        c->conns[i].fd = -1;
    pthread_mutex_init(&c->op, NULL);
    pthread_mutex_init(&c->st, NULL);
    if (pipe2(c->wake, O_CLOEXEC | O_NONBLOCK) < 0) {
        free(c);
        return NULL;
    }
    for (i = 0; i < ngates; i++)
        __atomic_add_fetch(&gates[i]->refs, 1, __ATOMIC_ACQ_REL);
    return c;
}

/* Set before cg_core_start (the listener reads them without a lock). */
int cg_core_identity(cg_core *c, const char *session, const char *who)
{
    if (strlen(session) > CG_MAX_NAME || strlen(who) >= sizeof c->who)
        return -1;
    snprintf(c->session, sizeof c->session, "%s", session);
    snprintf(c->who, sizeof c->who, "%s", who);
    return 0;
}

/* Any time: the listener reads it atomically; it only grows. */
void cg_core_set_epoch(cg_core *c, uint64_t epoch)
{
    uint64_t seen = __atomic_load_n(&c->epoch, __ATOMIC_ACQUIRE);
    while (epoch > seen &&
           !__atomic_compare_exchange_n(&c->epoch, &seen, epoch, 0, __ATOMIC_ACQ_REL,
                                        __ATOMIC_ACQUIRE))
        ;
}

/* The thread (lease timer, gate socket) starts here, not in cg_core_new:
 * nbdkit forks after the plugin is configured, and threads do not survive a
 * fork. */
int cg_core_start(cg_core *c)
{
    if (c->started)
        return 0;
    if (pthread_create(&c->thread, NULL, run, c) != 0)
        return -1;
    c->started = 1;
    return 0;
}

/* Stop the thread, close the gate socket's connections, open every gate;
 * later transitions are refused.  The core stays valid until cg_core_free
 * (a connection thread may still report its end). */
void cg_core_stop(cg_core *c)
{
    pthread_mutex_lock(&c->op);
    pthread_mutex_lock(&c->st);
    int was = c->stopping;
    c->stopping = 1;
    c->notify_fd = -1;          /* the caller may close it once we return */
    pthread_mutex_unlock(&c->st);
    pthread_mutex_unlock(&c->op);
    if (was)
        return;
    if (c->started) {
        wake_thread(c);
        pthread_join(c->thread, NULL);
    }
    for (int i = 0; i < MAX_CONNS; i++)
        if (c->conns[i].fd >= 0) {
            SSL_free(c->conns[i].ssl);
            c->conns[i].ssl = NULL;
            close(c->conns[i].fd);
            c->conns[i].fd = -1;
        }
    open_gates(c, ~0ULL);
}

void cg_core_free(cg_core *c)
{
    if (!c)
        return;
    cg_core_stop(c);
    SSL_CTX_free(c->tls);
    close(c->wake[0]);
    close(c->wake[1]);
    for (int i = 0; i < c->ngates; i++)
        cg_gate_unref(c->gates[i]);
    pthread_mutex_destroy(&c->op);
    pthread_mutex_destroy(&c->st);
    free(c);
}

void cg_core_bitmaps(cg_core *c, int vol, const uint64_t *cr, const uint64_t *oos,
                     size_t nwords)
{
    if (vol < 0 || vol >= c->ngates)
        return;
    c->cr[vol] = cr;
    c->oos[vol] = oos;
    c->nwords[vol] = nwords;
}

/* Blocks in the cut of volume i: cr | oos, read with the gate closed (no
 * writer marks) and no copy running (the phase was IDLE). */
static uint64_t cut_blocks(cg_core *c, int i)
{
    uint64_t count = 0;
    if (!c->cr[i])
        return 0;
    for (size_t w = 0; w < c->nwords[i]; w++)
        count += (uint64_t)__builtin_popcountll(c->cr[i][w] | c->oos[i][w]);
    return count;
}

static int owner_gone_locked(cg_core *c, int64_t owner)
{
    for (int i = 0; i < GONE_RING; i++)
        if (owner && c->gone[i] == owner)
            return 1;
    return 0;
}

int cg_freeze(cg_core *c, uint64_t n, uint32_t lease_ms, uint64_t volumes,
              uint64_t full, int64_t owner, struct cg_result *r)
{
    memset(r, 0, sizeof *r);
    if (!volumes || (full & ~volumes) || lease_ms < 1 || lease_ms > CG_MAX_LEASE_MS
        || (c->ngates < 64 && (volumes >> c->ngates)))
        return fail(r, "protocol", "freeze %" PRIu64 ": bad volumes or lease", n);
    pthread_mutex_lock(&c->op);
    pthread_mutex_lock(&c->st);
    int rc = 0;
    if (c->stopping)
        rc = fail(r, "local", "cannot freeze cut %" PRIu64 ": the slave is stopping", n);
    else if (c->phase != CG_IDLE)
        rc = fail(r, "busy", "cannot freeze cut %" PRIu64 ": cut %" PRIu64 " is %s;"
                  " abort it or wait for its copy", n, c->n, phase_name(c->phase));
    else if (n <= c->n)
        rc = fail(r, "stale", "cut number %" PRIu64 " is not above the last cut %" PRIu64,
                  n, c->n);
    else if (owner_gone_locked(c, owner))
        rc = fail(r, "gone", "cannot freeze cut %" PRIu64 ": the connection that asked"
                  " for it is gone", n);
    pthread_mutex_unlock(&c->st);
    if (rc) {
        pthread_mutex_unlock(&c->op);
        return rc;
    }
    double t0 = now_s();
    double budget = lease_ms / 1000.0 < 30.0 ? lease_ms / 1000.0 : 30.0;
    /* Close every gate first, then wait: the waits overlap. */
    for (int i = 0; i < c->ngates; i++)
        if (volumes & (1ULL << i))
            gate_shut(c->gates[i]);
    for (int i = 0; i < c->ngates; i++) {
        if (!(volumes & (1ULL << i)))
            continue;
        double left = budget - (now_s() - t0);
        if (!cg_gate_close(c->gates[i], left > 0 ? left : 0)) {
            open_gates(c, volumes);
            pthread_mutex_unlock(&c->op);
            return fail(r, "timeout", "cannot freeze cut %" PRIu64 ": writes to %s did not"
                        " finish within %.0f ms", n, c->names[i], budget * 1000);
        }
    }
    r->drain_ms = (now_s() - t0) * 1000;
    for (int i = 0; i < c->ngates; i++)
        if (volumes & (1ULL << i))
            r->blocks[i] = cut_blocks(c, i);
    pthread_mutex_lock(&c->st);
    c->phase = CG_FROZEN;
    c->n = n;
    c->ended = CG_ENDED_NONE;
    c->volumes = volumes;
    c->full = full;
    c->owner = owner;
    c->deadline = t0 + lease_ms / 1000.0;
    bump(c);
    notify(c);
    pthread_mutex_unlock(&c->st);
    pthread_mutex_unlock(&c->op);
    wake_thread(c);     /* the lease timer */
    return 0;
}

int cg_thaw(cg_core *c, uint64_t n, struct cg_result *r)
{
    memset(r, 0, sizeof *r);
    pthread_mutex_lock(&c->op);
    pthread_mutex_lock(&c->st);
    int rc = 0;
    if (c->phase != CG_FROZEN || n != c->n) {
        rc = mismatch(c, "thaw", n, r);
    } else {
        c->phase = CG_CUT;
        c->owner = 0;
        c->deadline = 0;
        bump(c);
        r->held_ms = open_gates(c, c->volumes) * 1000;
    }
    pthread_mutex_unlock(&c->st);
    pthread_mutex_unlock(&c->op);
    return rc;
}

/* FROZEN -> IDLE, gates open (st held). */
static void end_frozen(cg_core *c, int ended)
{
    c->phase = CG_IDLE;
    c->ended = ended;
    c->owner = 0;
    c->deadline = 0;
    bump(c);
    open_gates(c, c->volumes);
    notify(c);
}

int cg_abort(cg_core *c, uint64_t n, struct cg_result *r)
{
    memset(r, 0, sizeof *r);
    pthread_mutex_lock(&c->op);
    pthread_mutex_lock(&c->st);
    int rc = 0;
    if (c->phase == CG_FROZEN && n == c->n)
        end_frozen(c, CG_ENDED_ABORTED);
    else
        rc = mismatch(c, "abort", n, r);
    pthread_mutex_unlock(&c->st);
    pthread_mutex_unlock(&c->op);
    return rc;
}

/* Python ends cut n after its thaw (copy done or failed, aborted). */
int cg_end(cg_core *c, uint64_t n, int ended)
{
    pthread_mutex_lock(&c->op);
    pthread_mutex_lock(&c->st);
    int rc = -1;
    if (c->phase == CG_CUT && n == c->n) {
        c->phase = CG_IDLE;
        c->ended = ended;
        bump(c);
        rc = 0;
    }
    pthread_mutex_unlock(&c->st);
    pthread_mutex_unlock(&c->op);
    return rc;
}

void cg_owner_gone(cg_core *c, int64_t owner)
{
    if (!owner)
        return;
    pthread_mutex_lock(&c->op);
    pthread_mutex_lock(&c->st);
    if (c->phase == CG_FROZEN && c->owner == owner) {
        say("cut %" PRIu64 ": the connection that froze it ended; aborting the cut", c->n);
        end_frozen(c, CG_ENDED_ABORTED);
    } else {
        c->gone[c->gone_next++ % GONE_RING] = owner;
    }
    pthread_mutex_unlock(&c->st);
    pthread_mutex_unlock(&c->op);
}

void cg_state(cg_core *c, struct cg_state *s)
{
    pthread_mutex_lock(&c->st);
    s->phase = c->phase;
    s->n = c->n;
    s->ended = c->ended;
    s->volumes = c->volumes;
    s->full = c->full;
    s->gen = c->gen;
    s->lease_left_ms = c->phase == CG_FROZEN ? (c->deadline - now_s()) * 1000 : -1;
    if (c->phase == CG_FROZEN && s->lease_left_ms < 0)
        s->lease_left_ms = 0;
    pthread_mutex_unlock(&c->st);
}

static void expire_if_due(cg_core *c)
{
    pthread_mutex_lock(&c->op);
    pthread_mutex_lock(&c->st);
    if (c->phase == CG_FROZEN && now_s() >= c->deadline) {
        say("cut %" PRIu64 ": lease expired without thaw or abort; thawing", c->n);
        end_frozen(c, CG_ENDED_EXPIRED);
    }
    pthread_mutex_unlock(&c->st);
    pthread_mutex_unlock(&c->op);
}

/* ------------------------------------------------------------------ listener
 *
 * The gate socket speaks the control protocol's JSON lines for three ops:
 *   {"op":"freeze","n":N,"lease_ms":L[,"volumes":[...]][,"full":[...]]}
 *   {"op":"thaw","n":N}     {"op":"abort","n":N}
 * each with an optional "session":NAME (refused with kind "session" if the
 * node belongs to another one) and an optional "epoch":N (a FREEZE whose
 * epoch is not the recorded one is refused with kind "fenced": below it, a
 * deposed leader; above it, one the control socket has not recorded yet --
 * this thread writes no file), and answers each line in order with {"ok":true,...} or
 * {"ok":false,"error":"...","kind":"..."} (wire/protocol.py).  The parser
 * takes exactly that: one flat object, integer and string values, arrays of
 * names; anything else is refused with one line and the connection stays.
 * It gives every line the verdict the control socket gives it (ok, or the
 * same error kind), checked by tests/test_gate_socket.py, except where it
 * is stricter on purpose: no string escapes (names and ops need none), no
 * duplicate keys (Python's json keeps the last), and ops other than these
 * three are for the control socket.
 */

/* A list of volume names as parsed.  What is wrong with it beyond its JSON
 * (a name this slave does not serve, a name given twice) is only recorded
 * here and reported after the whole message was checked, in the control
 * socket's order (nbdplugin/slave.py, ``_names``), so that both sockets
 * give one line the same kind. */
struct names {
    int count;
    int dup;
    uint64_t mask;
    char unknown[CG_MAX_NAME + 1];      /* "" or the first name not ours */
};

struct request {
    char op[16];
    char session[CG_MAX_NAME + 1];
    int has_n, has_lease, has_vols, has_full, has_session, has_epoch;
    uint64_t n, lease, epoch;
    struct names vols, full;
};

struct parser {
    const char *p;
    char err[200];
};

static void skip_ws(struct parser *ps)
{
    while (*ps->p == ' ' || *ps->p == '\t' || *ps->p == '\r')
        ps->p++;
}

static int perr(struct parser *ps, const char *fmt, ...)
{
    va_list ap;
    va_start(ap, fmt);
    vsnprintf(ps->err, sizeof ps->err, fmt, ap);
    va_end(ap);
    return -1;
}

/* A string of at most cap-1 bytes, no escapes (names and ops need none). */
static int parse_string(struct parser *ps, char *out, size_t cap)
{
    if (*ps->p != '"')
        return perr(ps, "expected a string");
    ps->p++;
    size_t len = 0;
    for (; *ps->p != '"'; ps->p++) {
        unsigned char ch = (unsigned char)*ps->p;
        if (!ch)
            return perr(ps, "unterminated string");
        if (ch == '\\' || ch < 0x20)
            return perr(ps, "escapes and control characters are not accepted on the gate socket");
        if (len + 1 >= cap)
            return perr(ps, "string longer than %zu bytes", cap - 1);
        out[len++] = (char)ch;
    }
    out[len] = 0;
    ps->p++;
    return 0;
}

static int parse_uint(struct parser *ps, const char *key, uint64_t lo, uint64_t hi,
                      uint64_t *out)
{
    if (*ps->p == '-')
        return perr(ps, "'%s' must be >= %" PRIu64, key, lo);
    if (*ps->p < '0' || *ps->p > '9')
        return perr(ps, "'%s' must be an integer", key);
    if (ps->p[0] == '0' && ps->p[1] >= '0' && ps->p[1] <= '9')
        return perr(ps, "message is not valid JSON (a number with a leading zero)");
    uint64_t v = 0;
    while (*ps->p >= '0' && *ps->p <= '9') {
        if (v > CG_MAX_N)
            return perr(ps, "'%s' must be <= %" PRIu64, key, hi);
        v = v * 10 + (uint64_t)(*ps->p++ - '0');
    }
    if (*ps->p == '.' || *ps->p == 'e' || *ps->p == 'E')
        return perr(ps, "'%s' must be an integer", key);
    if (v < lo || v > hi)
        return perr(ps, "'%s' must be between %" PRIu64 " and %" PRIu64, key, lo, hi);
    *out = v;
    return 0;
}

static int volume_index(cg_core *c, const char *name)
{
    for (int i = 0; i < c->ngates; i++)
        if (strcmp(c->names[i], name) == 0)
            return i;
    return -1;
}

static int parse_names(struct parser *ps, cg_core *c, const char *key, struct names *l)
{
    memset(l, 0, sizeof *l);
    if (*ps->p != '[')
        return perr(ps, "'%s' must be a list of volume names", key);
    ps->p++;
    skip_ws(ps);
    if (*ps->p == ']') {
        ps->p++;
        return 0;
    }
    for (;;) {
        char name[CG_MAX_NAME + 1];
        skip_ws(ps);
        if (parse_string(ps, name, sizeof name) < 0)
            return -1;
        if (!name[0] || name[strspn(name, CG_NAME_CHARS)])
            return perr(ps, "'%s' must be a list of volume names (letters, digits,"
                        " '_', '-', '.')", key);
        if (++l->count > CG_MAX_NAMES)
            return perr(ps, "'%s' must have at most %d entries", key, CG_MAX_NAMES);
        int i = volume_index(c, name);
        if (i < 0) {
            if (!l->unknown[0])
                snprintf(l->unknown, sizeof l->unknown, "%s", name);
        } else if (l->mask & (1ULL << i)) {
            l->dup = 1;
        } else {
            l->mask |= 1ULL << i;
        }
        skip_ws(ps);
        if (*ps->p == ',') {
            ps->p++;
            continue;
        }
        if (*ps->p == ']') {
            ps->p++;
            return 0;
        }
        return perr(ps, "'%s' must be a list of volume names", key);
    }
}

/* One flat JSON object of the keys the three ops take; everything the
 * protocol's schema refuses is refused here with kind "protocol". */
static int parse_request(struct parser *ps, cg_core *c, struct request *q)
{
    memset(q, 0, sizeof *q);
    skip_ws(ps);
    if (*ps->p != '{')
        return perr(ps, "message is not a JSON object");
    ps->p++;
    skip_ws(ps);
    int first = 1;
    while (*ps->p != '}') {
        if (!first) {
            if (*ps->p != ',')
                return perr(ps, "message is not valid JSON");
            ps->p++;
            skip_ws(ps);
        }
        first = 0;
        char key[32];
        if (parse_string(ps, key, sizeof key) < 0)
            return perr(ps, "message is not valid JSON (keys are short strings)");
        skip_ws(ps);
        if (*ps->p != ':')
            return perr(ps, "message is not valid JSON");
        ps->p++;
        skip_ws(ps);
        int *seen;
        int rc;
        if (strcmp(key, "op") == 0) {
            seen = NULL;
            if (q->op[0])
                return perr(ps, "duplicate key 'op'");
            rc = parse_string(ps, q->op, sizeof q->op);
            if (rc == 0 && !q->op[0])
                return perr(ps, "'op' must not be empty");
        } else if (strcmp(key, "n") == 0) {
            seen = &q->has_n;
            if (*seen)
                return perr(ps, "duplicate key 'n'");
            rc = parse_uint(ps, "n", 1, CG_MAX_N, &q->n);
        } else if (strcmp(key, "lease_ms") == 0) {
            seen = &q->has_lease;
            if (*seen)
                return perr(ps, "duplicate key 'lease_ms'");
            rc = parse_uint(ps, "lease_ms", 1, CG_MAX_LEASE_MS, &q->lease);
        } else if (strcmp(key, "volumes") == 0) {
            seen = &q->has_vols;
            if (*seen)
                return perr(ps, "duplicate key 'volumes'");
            rc = parse_names(ps, c, "volumes", &q->vols);
        } else if (strcmp(key, "full") == 0) {
            seen = &q->has_full;
            if (*seen)
                return perr(ps, "duplicate key 'full'");
            rc = parse_names(ps, c, "full", &q->full);
        } else if (strcmp(key, "session") == 0) {
            seen = &q->has_session;
            if (*seen)
                return perr(ps, "duplicate key 'session'");
            rc = parse_string(ps, q->session, sizeof q->session);
            if (rc == 0 && (!q->session[0] || q->session[strspn(q->session, CG_NAME_CHARS)]))
                return perr(ps, "'session' must be a session name (letters, digits,"
                            " '_', '-', '.')");
        } else if (strcmp(key, "epoch") == 0) {
            seen = &q->has_epoch;
            if (*seen)
                return perr(ps, "duplicate key 'epoch'");
            rc = parse_uint(ps, "epoch", 1, CG_MAX_N, &q->epoch);
        } else {
            return perr(ps, "unknown key '%s'", key);
        }
        if (rc < 0)
            return -1;
        if (seen)
            *seen = 1;
        skip_ws(ps);
    }
    ps->p++;
    skip_ws(ps);
    if (*ps->p)
        return perr(ps, "message is not valid JSON (text after the object)");
    if (!q->op[0])
        return perr(ps, "missing key 'op'");
    return 0;
}

/* The checks of a parsed list: kind "unknown" for a name not ours, then
 * "protocol" for a repeated name or (unless it may be) an empty list; NULL
 * if it is good. */
static const char *check_names(cg_core *c, const struct names *l, const char *key,
                               int may_be_empty, char *msg, size_t cap)
{
    if (l->unknown[0]) {
        char have[200] = "";
        for (int k = 0; k < c->ngates; k++) {
            size_t used = strlen(have);
            snprintf(have + used, sizeof have - used, "%s%s", k ? ", " : "", c->names[k]);
        }
        snprintf(msg, cap, "unknown volume '%s' (this slave has: %s)", l->unknown, have);
        return "unknown";
    }
    if (l->dup || (!l->count && !may_be_empty)) {
        snprintf(msg, cap, "'%s' must name each volume once", key);
        return "protocol";
    }
    return NULL;
}

/* Append JSON-escaped text (our messages; they may quote a peer's key). */
static size_t put_escaped(char *out, size_t cap, size_t used, const char *s)
{
    for (; *s && used + 7 < cap; s++) {
        unsigned char ch = (unsigned char)*s;
        if (ch == '"' || ch == '\\')
            used += snprintf(out + used, cap - used, "\\%c", ch);
        else if (ch < 0x20)
            used += snprintf(out + used, cap - used, "\\u%04x", ch);
        else
            out[used++] = (char)ch;
    }
    out[used] = 0;
    return used;
}

static size_t error_reply(char *out, size_t cap, const char *kind, const char *msg)
{
    size_t used = snprintf(out, cap, "{\"ok\": false, \"error\": \"");
    used = put_escaped(out, cap, used, msg);
    return used + snprintf(out + used, cap - used, "\", \"kind\": \"%s\"}\n", kind);
}

/* The reply to one line of ``len`` bytes (a NUL inside is not JSON). */
static size_t handle_line(cg_core *c, struct conn *k, const char *line, size_t len,
                          char *out, size_t cap)
{
    struct parser ps = {.p = line};
    struct request q;
    if (strlen(line) != len)
        return error_reply(out, cap, "protocol", "message is not valid JSON (a NUL byte)");
    if (parse_request(&ps, c, &q) < 0)
        return error_reply(out, cap, "protocol", ps.err);
    int freeze = strcmp(q.op, "freeze") == 0;
    if (!freeze && strcmp(q.op, "thaw") != 0 && strcmp(q.op, "abort") != 0) {
        char msg[160];
        snprintf(msg, sizeof msg, "op '%s' is not served on the gate socket (only freeze,"
                 " thaw and abort); use the control socket", q.op);
        return error_reply(out, cap, "protocol", msg);
    }
    if (!q.has_n)
        return error_reply(out, cap, "protocol", "missing key 'n'");
    if (!freeze && (q.has_lease || q.has_vols || q.has_full))
        return error_reply(out, cap, "protocol", q.has_lease ? "unknown key 'lease_ms'"
                           : q.has_vols ? "unknown key 'volumes'" : "unknown key 'full'");
    if (freeze && !q.has_lease)
        return error_reply(out, cap, "protocol", "missing key 'lease_ms'");
    if (q.has_session && c->session[0] && strcmp(q.session, c->session) != 0) {
        /* The words of nbdplugin/server.py's refusal. */
        char msg[480];
        snprintf(msg, sizeof msg, "%s belongs to session %s, not %s: a node serves"
                 " one session; give %s nodes of its own", c->who, c->session,
                 q.session, q.session);
        return error_reply(out, cap, "session", msg);
    }
    if (freeze && q.has_epoch) {
        /* The words of wire/protocol.py's fenced_message. */
        uint64_t seen = __atomic_load_n(&c->epoch, __ATOMIC_ACQUIRE);
        char msg[480];
        if (q.epoch < seen) {
            snprintf(msg, sizeof msg, "%s has seen leader epoch %" PRIu64 "; this request"
                     " carries epoch %" PRIu64 ": its coordinator was deposed (another"
                     " leads session %s)", c->who, seen, q.epoch,
                     c->session[0] ? c->session : "(none)");
            return error_reply(out, cap, "fenced", msg);
        }
        if (q.epoch > seen) {
            snprintf(msg, sizeof msg, "%s has recorded leader epoch %" PRIu64 "; this"
                     " freeze carries epoch %" PRIu64 ", not yet recorded: the leader"
                     " announces it first on the control socket", c->who, seen, q.epoch);
            return error_reply(out, cap, "fenced", msg);
        }
    }
    struct cg_result r;
    if (freeze) {
        char msg[320];
        const char *kind;
        if (q.has_vols && (kind = check_names(c, &q.vols, "volumes", 0, msg, sizeof msg)))
            return error_reply(out, cap, kind, msg);
        if (q.has_full && (kind = check_names(c, &q.full, "full", 1, msg, sizeof msg)))
            return error_reply(out, cap, kind, msg);
        uint64_t vols = q.has_vols ? q.vols.mask
                        : (c->ngates == 64 ? ~0ULL : (1ULL << c->ngates) - 1);
        uint64_t full = q.full.mask;
        if (full & ~vols) {
            int i = __builtin_ctzll(full & ~vols);
            snprintf(msg, sizeof msg, "'full' names '%s', which is not frozen", c->names[i]);
            return error_reply(out, cap, "unknown", msg);
        }
        struct pollfd pf = {.fd = k->fd, .events = POLLRDHUP};
        if (poll(&pf, 1, 0) > 0 && (pf.revents & (POLLRDHUP | POLLHUP | POLLERR))) {
            /* A late freeze: its coordinator gave up.  Never close a gate for it. */
            say("cut %" PRIu64 ": refused a freeze whose connection is gone", q.n);
            return error_reply(out, cap, "gone", "the connection that asked for the"
                               " freeze is gone");
        }
        if (cg_freeze(c, q.n, (uint32_t)q.lease, vols, full, k->id, &r) < 0)
            return error_reply(out, cap, r.kind, r.msg);
        /* Fits: REPLY_ROOM below. */
        size_t used = snprintf(out, cap, "{\"ok\": true, \"n\": %" PRIu64
                               ", \"drain_ms\": %.3f, \"blocks\": {", q.n, r.drain_ms);
        int first = 1;
        for (int i = 0; i < c->ngates; i++)
            if (vols & (1ULL << i)) {
                used += snprintf(out + used, cap - used, "%s\"%s\": %" PRIu64,
                                 first ? "" : ", ", c->names[i], r.blocks[i]);
                first = 0;
            }
        return used + snprintf(out + used, cap - used, "}}\n");
    }
    if (strcmp(q.op, "thaw") == 0) {
        if (cg_thaw(c, q.n, &r) < 0)
            return error_reply(out, cap, r.kind, r.msg);
        return snprintf(out, cap, "{\"ok\": true, \"n\": %" PRIu64 ", \"held_ms\": %.3f}\n",
                        q.n, r.held_ms);
    }
    if (cg_abort(c, q.n, &r) < 0)
        return error_reply(out, cap, r.kind, r.msg);
    return snprintf(out, cap, "{\"ok\": true, \"n\": %" PRIu64 "}\n", q.n);
}

static void send_all(int fd, const char *buf, size_t len)
{
    while (len > 0) {
        ssize_t w = send(fd, buf, len, MSG_NOSIGNAL);
        if (w < 0 && errno == EINTR)
            continue;
        if (w <= 0)
            return;         /* the peer is gone; its reads end the conn */
        buf += w;
        len -= (size_t)w;
    }
}

/* One reply to a connection.  TLS: the socket is non-blocking; a reply is
 * a few hundred bytes, so it waits for room at most a second, then gives up
 * on a peer that does not read. */
static void conn_send(struct conn *k, const char *buf, size_t len)
{
    if (!k->ssl) {
        send_all(k->fd, buf, len);
        return;
    }
    for (int tries = 0; len > 0 && tries < 4;) {
        int w = SSL_write(k->ssl, buf, (int)len);
        if (w > 0) {
            buf += w;
            len -= (size_t)w;
            continue;
        }
        int e = SSL_get_error(k->ssl, w);
        ERR_clear_error();
        if (e != SSL_ERROR_WANT_WRITE && e != SSL_ERROR_WANT_READ)
            return;
        struct pollfd pf = {.fd = k->fd, .events = e == SSL_ERROR_WANT_WRITE ? POLLOUT : POLLIN};
        poll(&pf, 1, 250);
        tries++;
    }
}

/* >0 bytes, 0 at the end, -1 with errno (EAGAIN: nothing yet). */
static ssize_t conn_recv(struct conn *k, char *buf, size_t len)
{
    if (!k->ssl)
        return recv(k->fd, buf, len, 0);
    int r = SSL_read(k->ssl, buf, (int)len);
    if (r > 0)
        return r;
    int e = SSL_get_error(k->ssl, r);
    ERR_clear_error();
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
        errno = EAGAIN;
        return -1;
    }
    if (e == SSL_ERROR_ZERO_RETURN)
        return 0;
    errno = ECONNRESET;
    return -1;
}

static void drop_conn(cg_core *c, struct conn *k)
{
    SSL_free(k->ssl);
    k->ssl = NULL;
    close(k->fd);
    k->fd = -1;
    cg_owner_gone(c, k->id);
}

static const char *peer_ip(int fd, char *out, size_t cap)
{
    struct sockaddr_storage sa;
    socklen_t len = sizeof sa;
    snprintf(out, cap, "a peer");
    if (getpeername(fd, (struct sockaddr *)&sa, &len) == 0) {
        if (sa.ss_family == AF_INET)
            inet_ntop(AF_INET, &((struct sockaddr_in *)&sa)->sin_addr, out, cap);
        else if (sa.ss_family == AF_INET6)
            inet_ntop(AF_INET6, &((struct sockaddr_in6 *)&sa)->sin6_addr, out, cap);
    }
    return out;
}

/* Advance a TLS handshake; a peer without a certificate from the session
 * CA fails here (the context requires one) and is dropped with one line. */
static void handshake(cg_core *c, struct conn *k)
{
    int r = SSL_do_handshake(k->ssl);
    if (r == 1) {
        k->handshaking = 0;
        k->last = now_s();
        return;
    }
    int e = SSL_get_error(k->ssl, r);
    if (e == SSL_ERROR_WANT_READ || e == SSL_ERROR_WANT_WRITE) {
        k->want = e == SSL_ERROR_WANT_READ ? POLLIN : POLLOUT;
        ERR_clear_error();
        return;
    }
    unsigned long err = ERR_peek_last_error();
    long verify = SSL_get_verify_result(k->ssl);
    int eof = !err;
#ifdef SSL_R_UNEXPECTED_EOF_WHILE_READING
    eof = eof || ERR_GET_REASON(err) == SSL_R_UNEXPECTED_EOF_WHILE_READING;
#endif
    if (verify == X509_V_OK && eof)
        /* It left without a word of TLS: a scan, or a holder of slots
         * letting go.  Nothing was refused; no line each. */
        tally(&c->left, "connection(s) that ended before a TLS handshake");
    else
        say("refused a TLS connection from %s: %s", k->ip,
            verify != X509_V_OK ? X509_verify_cert_error_string(verify)
            : ERR_reason_error_string(err));
    ERR_clear_error();
    drop_conn(c, k);
}

/* A free slot, or the one a new connection takes (see TLS_DEADLINE_S),
 * its connection closed; NULL if none may go. */
static struct conn *free_slot(cg_core *c)
{
    for (int i = 0; i < MAX_CONNS; i++)
        if (c->conns[i].fd < 0)
            return &c->conns[i];
    pthread_mutex_lock(&c->st);
    int64_t keep = c->phase == CG_FROZEN ? c->owner : 0;
    pthread_mutex_unlock(&c->st);
    struct conn *best = NULL;
    int best_rank = 0;
    double best_t = 0;
    for (int i = 0; i < MAX_CONNS; i++) {
        struct conn *k = &c->conns[i];
        if (keep && k->id == keep)
            continue;
        int rank = k->handshaking ? k->heard : !k->used ? 2 : 3;
        double t = rank == 3 ? k->last : k->admitted;
        if (!best || rank < best_rank || (rank == best_rank && t < best_t)) {
            best = k;
            best_rank = rank;
            best_t = t;
        }
    }
    if (!best)
        return NULL;
    if (!best->ssl) {
        char out[200];
        size_t n = error_reply(out, sizeof out, "busy", "too many connections to the gate"
                               " socket: closed this idle one for a newer one");
        send(best->fd, out, n, MSG_NOSIGNAL | MSG_DONTWAIT);
    }
    drop_conn(c, best);
    tally(&c->evicted, "idle or unauthenticated gate connection(s) to admit new ones");
    return best;
}

static void take_conn(cg_core *c, struct conn *k, int fd, SSL *ssl)
{
    k->fd = fd;
    k->ssl = ssl;
    k->handshaking = ssl != NULL;
    k->heard = 0;
    k->used = 0;
    k->want = POLLIN;
    k->admitted = now_s();
    k->deadline = k->admitted + TLS_DEADLINE_S;
    k->len = 0;
    k->last = k->admitted;
    k->id = (1LL << 40) + ++c->next_id;   /* Python's owner ids stay below */
    peer_ip(fd, k->ip, sizeof k->ip);
}

static void accept_conn(cg_core *c)
{
    int fd = accept4(c->listen_fd, NULL, NULL,
                     SOCK_CLOEXEC | (c->tls ? SOCK_NONBLOCK : 0));
    if (fd < 0) {
        /* Out of descriptors (or worse): stop polling the socket for a
         * while rather than spin on it; the connection waits in the backlog. */
        if (errno != EINTR && errno != EAGAIN && errno != ECONNABORTED) {
            if (!c->accept_paused_until)
                say("accept failed (%s); retrying in 100 ms", strerror(errno));
            c->accept_paused_until = now_s() + 0.1;
        }
        return;
    }
    c->accept_paused_until = 0;
    if (c->tls) {
        /* TCP: the certificate is the peer check (in the handshake). */
        int one = 1;
        setsockopt(fd, IPPROTO_TCP, TCP_NODELAY, &one, sizeof one);
        struct conn *k = free_slot(c);
        SSL *ssl = k ? SSL_new(c->tls) : NULL;
        if (!ssl) {
            say(k ? "cannot make a TLS session; refused a connection"
                  : "too many connections to the gate socket; refused one");
            close(fd);
            return;
        }
        SSL_set_fd(ssl, fd);
        SSL_set_accept_state(ssl);
        take_conn(c, k, fd, ssl);
        return;
    }
    struct ucred cred;
    socklen_t len = sizeof cred;
    char out[256];
    if (getsockopt(fd, SOL_SOCKET, SO_PEERCRED, &cred, &len) < 0
        || (cred.uid != 0 && cred.uid != c->uid)) {
        size_t n = error_reply(out, sizeof out, "denied", "this gate socket serves only"
                               " the slave's own user and root");
        send_all(fd, out, n);
        close(fd);
        return;
    }
    struct timeval tv = {1, 0};     /* a peer that never reads cannot stall us */
    setsockopt(fd, SOL_SOCKET, SO_SNDTIMEO, &tv, sizeof tv);
    struct conn *k = free_slot(c);
    if (k) {
        take_conn(c, k, fd, NULL);
        return;
    }
    size_t n = error_reply(out, sizeof out, "busy", "too many connections to the gate"
                           " socket; close some and retry");
    send_all(fd, out, n);
    close(fd);
}

static void read_conn(cg_core *c, struct conn *k)
{
    if (k->handshaking) {
        k->heard = 1;           /* called on POLLIN: bytes, or the end */
        handshake(c, k);
        if (k->fd < 0 || k->handshaking)
            return;
    }
    /* TLS may hold decrypted bytes the socket no longer shows: read on
     * until it has none. */
    do {
        ssize_t got = conn_recv(k, k->buf + k->len, CG_GATE_MAX_LINE + 1 - k->len);
        if (got <= 0) {
            if (got < 0 && (errno == EINTR || errno == EAGAIN))
                return;
            drop_conn(c, k);
            return;
        }
        k->len += (size_t)got;
        serve_lines(c, k);
    } while (k->fd >= 0 && k->ssl && SSL_pending(k->ssl) > 0);
}

/* A line of only white space gets no reply, as on the control socket
 * (wire/protocol.py's Framer drops it). */
static int blank(const char *line, size_t len)
{
    for (size_t i = 0; i < len; i++)
        if (!strchr(" \t\r\v\f", line[i]) || !line[i])
            return 0;
    return 1;
}

static void serve_lines(cg_core *c, struct conn *k)
{
    k->last = now_s();
    char out[CG_GATE_MAX_LINE];
    size_t start = 0;
    for (size_t i = 0; i < k->len; i++) {
        if (k->buf[i] != '\n')
            continue;
        k->buf[i] = 0;
        const char *line = k->buf + start;
        size_t len = i - start;
        start = i + 1;
        if (blank(line, len))
            continue;
        k->used = 1;
        size_t n = handle_line(c, k, line, len, out, sizeof out);
        conn_send(k, out, n < sizeof out ? n : sizeof out - 1);
    }
    memmove(k->buf, k->buf + start, k->len - start);
    k->len -= start;
    if (k->len > CG_GATE_MAX_LINE) {
        char msg[120];
        snprintf(msg, sizeof msg, "line longer than %d bytes", CG_GATE_MAX_LINE);
        size_t n = error_reply(out, sizeof out, "protocol", msg);
        conn_send(k, out, n);
        /* Unread bytes at close would reset the connection before the
         * peer reads our line: take what has arrived first. */
        shutdown(k->fd, SHUT_WR);
        for (int i = 0; i < 64 && recv(k->fd, k->buf, sizeof k->buf, MSG_DONTWAIT) > 0; i++) {}
        drop_conn(c, k);
    }
}

int cg_serve(cg_core *c, int listen_fd, uint32_t uid)
{
    pthread_mutex_lock(&c->st);
    c->uid = uid;
    c->listen_fd = listen_fd;
    pthread_mutex_unlock(&c->st);
    wake_thread(c);
    return 0;
}

int cg_serve_tls(cg_core *c, int listen_fd, const char *ca, const char *cert,
                 const char *key, char *err, size_t errlen)
{
    SSL_CTX *ctx = SSL_CTX_new(TLS_server_method());
    const char *what = "cannot make a TLS context";
    if (!ctx)
        goto fail;
    /* wire/tls.py's rules: TLS 1.3 only, a client certificate required,
     * the session CA the only trust anchor. */
    SSL_CTX_set_min_proto_version(ctx, TLS1_3_VERSION);
    SSL_CTX_set_verify(ctx, SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT, NULL);
    SSL_CTX_set_num_tickets(ctx, 0);    /* nothing to resume: connections are few */
    what = ca;
    if (SSL_CTX_load_verify_locations(ctx, ca, NULL) != 1)
        goto fail;
    what = cert;
    if (SSL_CTX_use_certificate_chain_file(ctx, cert) != 1)
        goto fail;
    what = key;
    if (SSL_CTX_use_PrivateKey_file(ctx, key, SSL_FILETYPE_PEM) != 1
        || SSL_CTX_check_private_key(ctx) != 1)
        goto fail;
    pthread_mutex_lock(&c->st);
    c->tls = ctx;
    c->listen_fd = listen_fd;
    pthread_mutex_unlock(&c->st);
    wake_thread(c);
    return 0;
fail:;
    unsigned long e = ERR_peek_last_error();
    snprintf(err, errlen, "%s: %s", what, e ? ERR_reason_error_string(e) : "failed");
    ERR_clear_error();
    SSL_CTX_free(ctx);
    return -1;
}

static void *run(void *arg)
{
    cg_core *c = arg;
    /* A freeze or thaw must not wait for a CPU behind the writers it holds:
     * the lowest real-time priority where allowed (root, CAP_SYS_NICE).  The
     * thread only sleeps in poll or on a gate, and does microseconds of work
     * per request.  Elsewhere (EPERM) it runs as any thread. */
    struct sched_param sp = {.sched_priority = 1};
    pthread_setschedparam(pthread_self(), SCHED_FIFO, &sp);
    struct pollfd fds[2 + MAX_CONNS];
    struct conn *who[2 + MAX_CONNS];
    for (;;) {
        pthread_mutex_lock(&c->st);
        int stopping = c->stopping, lfd = c->listen_fd;
        double deadline = c->phase == CG_FROZEN ? c->deadline : 0;
        pthread_mutex_unlock(&c->st);
        if (stopping)
            return NULL;
        double now = now_s(), wait = IDLE_TIMEOUT_S;
        if (deadline)
            wait = deadline - now;
        int nfds = 0;
        fds[nfds++] = (struct pollfd){.fd = c->wake[0], .events = POLLIN};
        if (c->accept_paused_until > now) {
            if (c->accept_paused_until - now < wait)
                wait = c->accept_paused_until - now;
            lfd = -1;
        }
        if (lfd >= 0)
            fds[nfds++] = (struct pollfd){.fd = lfd, .events = POLLIN};
        for (int i = 0; i < MAX_CONNS; i++) {
            struct conn *k = &c->conns[i];
            if (k->fd < 0)
                continue;
            double idle = (k->handshaking ? k->deadline : k->last + IDLE_TIMEOUT_S) - now;
            if (idle <= 0) {
                if (k->handshaking)
                    tally(&c->stalled, "connection(s) that did not finish a TLS"
                          " handshake within " STR(TLS_DEADLINE_S) " s");
                drop_conn(c, k);
                continue;
            }
            if (idle < wait)
                wait = idle;
            who[nfds] = k;
            fds[nfds++] = (struct pollfd){.fd = k->fd,
                                          .events = k->handshaking ? k->want : POLLIN};
        }
        int ms = wait <= 0 ? 0 : (int)(wait * 1000) + 1;
        int ready = poll(fds, nfds, ms);
        if (deadline && now_s() >= deadline)
            expire_if_due(c);
        if (ready <= 0)
            continue;
        if (fds[0].revents) {
            char drain[64];
            while (read(c->wake[0], drain, sizeof drain) > 0) {}
        }
        int first_conn = 1;
        if (lfd >= 0) {
            first_conn = 2;
            if (fds[1].revents & POLLIN)
                accept_conn(c);
        }
        for (int i = first_conn; i < nfds; i++)
            if (fds[i].revents && who[i]->fd == fds[i].fd)
                read_conn(c, who[i]);
    }
}
