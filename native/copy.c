/* The native copy engine (theory of operation).
 *
 * What it does: sends every run of set bits of a bitmap (blocks of
 * `granularity` bytes, runs cut at `max_run` blocks) from a volume to an NBD
 * target.  Each run is read from the live volume (pread) and then the
 * saved-block overlay is laid over it; all-zero runs go as write-zeroes
 * where the target supports them.  One stream per libnbd handle (the caller
 * opens several only where the target allows multi-conn), each a thread with
 * up to `inflight` requests in flight; streams take runs from one shared
 * cursor, so runs never overlap and no two writes in flight touch the same
 * bytes, whatever the connection.  The whole transfer runs without the
 * Python GIL (cffi releases it around cg_copy_run).
 *
 * What it reports: a write the target acknowledged becomes a CONFIRM event
 * (the PiT need not keep its blocks), and once a flush sent after it on the
 * same connection completed, a FLUSHED event (its change bits may go).  A
 * Python thread drains the events every ~50 ms and applies them; since one
 * ordered list holds both kinds, a run's FLUSHED never comes before its
 * CONFIRM.  Without flush support on the target, FLUSHED follows CONFIRM at
 * once (nothing better to wait for), as in the Python copier.
 *
 * Errors: the first one wins (a message plus whose fault: target or
 * source); every stream then stops taking runs, retires what it has in
 * flight (so what the target made durable is reported and not sent again)
 * and the last flush of a stream that met no error of its own still goes
 * out.  A stream whose target answers nothing for `timeout_ms` fails the
 * copy.  Cancel stops within ~100 ms: no new runs, in-flight requests get
 * 50 ms to retire (a poll step is 25 ms), no final flush.
 *
 * The overlay and its ordering (the same argument as Pit.read in
 * nbdplugin/volume.py).  A host write to a pending block first copies the
 * old content into the store file, then publishes "block -> offset" here
 * (release store, under the BlockStore's lock), and only then overwrites
 * the live block.  The engine reads the live block first and loads the
 * slot after (acquire).  If the live read could have seen the new data, the
 * overwrite began before the read ended, so the publication happened before
 * it, and our later acquire load sees the slot: the saved copy (never
 * changed once written) is laid over the live data.  If the slot is not yet
 * set when we look, the overwrite had not begun when our read ended, so the
 * live data was the PiT's.  The store's fd is published before the first
 * slot and dup'ed, so closing the BlockStore never pulls it from under a
 * reader; a closed store is seen (acquire) after the live read and fails
 * the copy as a source fault ("the PiT has ended"), as in Python.
 *
 * Memory of the overlay: a top array of one pointer per 4096 blocks, plus a
 * 32 KiB chunk (4096 slots of 8 bytes) for each 4096-block span where a
 * block was saved.  Per TiB of volume the top array costs 512 KiB at 4 KiB
 * granularity, 128 KiB at 16 KiB, 32 KiB at 64 KiB; each span with a saved
 * block adds 32 KiB (at most 8 bytes per block, i.e. 2 GiB, 512 MiB and
 * 128 MiB per TiB if every span had one).  A flat array would always cost
 * those maxima, most of it never used: a PiT saves only the blocks the host
 * overwrote during one copy.
 *
 * Rate limit (cg_copy_set_rate, changeable while the copy runs): a token
 * bucket shared by the streams, in the spirit of DRBD's resync controller
 * that leaves room for application I/O.  Tokens are bytes, refilled at
 * `rate` per second up to RATE_BURST_MS worth; a write may go while the
 * bucket is not in debt and then takes its length (so it may go negative:
 * a run is never split).  A stream waiting for tokens keeps reaping its
 * requests in flight, so confirmations and the target timeout go on as
 * before; a cancel or a failure ends the wait.  Rate 0: no limit.
 *
 * Sub-blocks: a block listed in `pblocks` (ascending, with its mask of
 * dirty `sub`-byte pieces in `pmasks`, `wpb` words each) is a run of its
 * own; only its dirty pieces are read from the PiT (read_pit_pieces) and
 * written (zero pieces as write-zeroes), one request per
 * run of set bits, all from the slot's buffer.  The slot counts its
 * requests (plus one held while issuing them, so a completion during the
 * issue cannot end it early) and is reaped once all have retired: the
 * block is confirmed only if every piece was acknowledged.  Such a slot
 * may thus hold up to g/(2*sub) requests.  done_bytes counts the bytes
 * of the blocks copied (as before), sent_bytes the bytes written to the
 * target, which the flush cadence (`flush_every`) also counts.  The cursor walks the
 * records in step with the bitmap (under the same lock), so the runs stay
 * ascending and disjoint.  Why sending only the pieces is enough:
 * nbdplugin/copier.py ("Sub-blocks").
 *
 * Packed (`packed`: every handle is a cgmirror secondary's packed export,
 * nbdplugin/secondary.py): a request carries a batch of records instead of
 * one run -- "CGMPACK1", u32 record count, u32 0, then per record u64
 * volume offset, u32 length, u32 flags (1: zero, no data) and the data.
 * A stream packs runs from the cursor (whole runs as one record, a block
 * with a record as one per run of dirty pieces) until the slot's buffer
 * or `maxrec` is full, and writes the batch at offset 0; once it is
 * acknowledged every run in it is confirmed.  Why: scattered 4 KiB pieces
 * sent one request each cost the secondary a Python call, an undo sync
 * and an NBD round of its own per piece (their drain ran ~50 MB/s), and
 * over a link only `inflight` pieces per round trip.  Batches keep the
 * bytes of pieces at the request count of whole runs.  The records of a
 * batch, like the runs of all streams, never overlap.
 *
 * Rejected: one thread polling every handle (a pread of the source then
 * stalls all connections; libnbd's nbdcopy also uses a thread per
 * connection); handing confirmations to Python per request (a Python call
 * per MiB is what the GIL made slow).
 */
#define _GNU_SOURCE
#include "copy.h"

#include <errno.h>
#include <fcntl.h>
#include <libnbd.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdatomic.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <time.h>
#include <unistd.h>

#define CHUNK_BITS 12
#define CHUNK (1u << CHUNK_BITS)
/* Cancelled: what in-flight requests get to retire before we stop. */
#define CANCEL_GRACE_MS 50
/* The poll step: how soon a stream sees a cancel or a timeout. */
#define POLL_MS 25
/* The rate limit's bucket holds at most this much time's worth of bytes. */
#define RATE_BURST_MS 100

/* ------------------------------------------------------------------ overlay */

struct cg_overlay {
    uint64_t nblocks;
    uint64_t ntop;
    _Atomic(_Atomic int64_t *) *top;
    _Atomic int fd;          /* our dup of the store's fd, -1 until published */
    _Atomic int closed;
    uint64_t chunks;         /* chunks allocated (writer side only) */
};

struct cg_overlay *cg_overlay_new(uint64_t nblocks)
{
    struct cg_overlay *ov = calloc(1, sizeof *ov);
    if (ov == NULL)
        return NULL;
    ov->nblocks = nblocks;
    ov->ntop = (nblocks + CHUNK - 1) >> CHUNK_BITS;
    ov->top = calloc(ov->ntop ? ov->ntop : 1, sizeof *ov->top);
    if (ov->top == NULL) {
        free(ov);
        return NULL;
    }
    atomic_init(&ov->fd, -1);
    atomic_init(&ov->closed, 0);
    return ov;
}

void cg_overlay_free(struct cg_overlay *ov)
{
    if (ov == NULL)
        return;
    for (uint64_t i = 0; i < ov->ntop; i++)
        free((void *)atomic_load_explicit(&ov->top[i], memory_order_relaxed));
    free(ov->top);
    int fd = atomic_load(&ov->fd);
    if (fd >= 0)
        close(fd);
    free(ov);
}

/* Publish the store's fd (a dup of it: ours to close).  Once only. */
int cg_overlay_set_fd(struct cg_overlay *ov, int fd)
{
    if (atomic_load(&ov->fd) >= 0)
        return -EEXIST;
    int mine = fcntl(fd, F_DUPFD_CLOEXEC, 0);
    if (mine < 0)
        return -errno;
    atomic_store_explicit(&ov->fd, mine, memory_order_release);
    return 0;
}

/* Record that `block`'s saved copy is at `offset` in the store.  The writer
 * is serialized by the caller (the BlockStore's lock). */
int cg_overlay_set(struct cg_overlay *ov, uint64_t block, int64_t offset)
{
    if (block >= ov->nblocks)
        return -EINVAL;
    uint64_t i = block >> CHUNK_BITS;
    _Atomic int64_t *chunk = atomic_load_explicit(&ov->top[i], memory_order_relaxed);
    if (chunk == NULL) {
        chunk = malloc(CHUNK * sizeof *chunk);
        if (chunk == NULL)
            return -ENOMEM;
        for (unsigned j = 0; j < CHUNK; j++)
            atomic_init(&chunk[j], -1);
        atomic_store_explicit(&ov->top[i], chunk, memory_order_release);
        ov->chunks++;
    }
    atomic_store_explicit(&chunk[block & (CHUNK - 1)], offset, memory_order_release);
    return 0;
}

int64_t cg_overlay_get(struct cg_overlay *ov, uint64_t block)
{
    if (block >= ov->nblocks)
        return -1;
    _Atomic int64_t *chunk = atomic_load_explicit(&ov->top[block >> CHUNK_BITS],
                                                  memory_order_acquire);
    if (chunk == NULL)
        return -1;
    return atomic_load_explicit(&chunk[block & (CHUNK - 1)], memory_order_acquire);
}

void cg_overlay_close(struct cg_overlay *ov)
{
    atomic_store_explicit(&ov->closed, 1, memory_order_release);
}

uint64_t cg_overlay_bytes(struct cg_overlay *ov)
{
    return sizeof *ov + ov->ntop * sizeof *ov->top + ov->chunks * CHUNK * sizeof(int64_t);
}

/* ------------------------------------------------------------------- engine */

struct slot {
    int busy, done, err;
    int pending;             /* requests not retired (+1 while issuing) */
    uint64_t start, nblocks, len, sent;   /* len: of the blocks; sent: written */
    char *buf;
    uint64_t *runs;          /* packed: (start, nblocks, len, sent) of each run */
    size_t nruns;
};

struct flush {
    struct flush *next;
    int done, err;
    uint64_t *ranges;        /* (start, nblocks) pairs */
    size_t n;
};

struct cg_copy;

struct stream {
    struct cg_copy *c;
    struct nbd_handle *h;
    struct slot *slots;
    int can_zero, can_flush;
    int own_error;
    uint64_t *acked;         /* (start, nblocks) pairs written, not yet flushed */
    size_t nacked, capacked;
    uint64_t acked_bytes;
    struct flush *flushes;
    struct timespec last_progress;
    /* packed: the PiT content of the run being packed, where the packing is */
    char *scratch;
    char *pp;
    uint64_t pstart, pcount;
};

struct cg_copy {
    struct nbd_handle **h;
    int nh, inflight;
    int fd;
    struct cg_overlay *ov;
    uint64_t g, size, nbits, max_run, flush_every;
    const uint64_t *words;
    const uint64_t *pblocks, *pmasks;   /* sub-block records (see the top) */
    uint64_t nrec, sub, wpb;
    int timeout_ms;
    int packed;              /* batches of records to a packed export (see the top) */
    uint64_t maxrec;         /* records a batch holds at most */
    size_t bufsize;          /* bytes of each slot's buffer */
    struct stream *streams;

    pthread_mutex_t lock;    /* guards cursor, pcur, events, err, fault */
    uint64_t cursor;
    uint64_t pcur;           /* the first record at or after cursor */
    uint64_t *ev;
    size_t nev, capev;
    int fault;
    char err[512];

    _Atomic int cancelled;
    _Atomic int failed;
    _Atomic uint64_t done_bytes, sent_bytes;

    _Atomic uint64_t rate;   /* bytes per second; 0: no limit */
    pthread_mutex_t bucket_lock;   /* guards tokens, refilled */
    double tokens;
    struct timespec refilled;
};

static void fail(struct cg_copy *c, int fault, const char *fmt, ...)
{
    pthread_mutex_lock(&c->lock);
    if (!atomic_load(&c->failed)) {
        va_list ap;
        va_start(ap, fmt);
        vsnprintf(c->err, sizeof c->err, fmt, ap);
        va_end(ap);
        c->fault = fault;
        atomic_store(&c->failed, 1);
    }
    pthread_mutex_unlock(&c->lock);
}

static int64_t ms_since(const struct timespec *t)
{
    struct timespec now;
    clock_gettime(CLOCK_MONOTONIC, &now);
    return (now.tv_sec - t->tv_sec) * 1000 + (now.tv_nsec - t->tv_nsec) / 1000000;
}

static int emit(struct cg_copy *c, uint64_t kind, uint64_t start, uint64_t n)
{
    int ok = 1;
    pthread_mutex_lock(&c->lock);
    if (c->nev == c->capev) {
        size_t cap = c->capev ? c->capev * 2 : 256;
        uint64_t *ev = realloc(c->ev, cap * 3 * sizeof *ev);
        if (ev == NULL)
            ok = 0;
        else
            c->ev = ev, c->capev = cap;
    }
    if (ok) {
        uint64_t *e = c->ev + 3 * c->nev++;
        e[0] = kind, e[1] = start, e[2] = n;
    }
    pthread_mutex_unlock(&c->lock);
    if (!ok)
        fail(c, CG_FAULT_SOURCE, "out of memory for copy events");
    return ok;
}

/* The next set bit at or after `from` (with `invert`: the next clear one),
 * or nbits. */
static uint64_t next_bit(const struct cg_copy *c, uint64_t from, int invert)
{
    while (from < c->nbits) {
        uint64_t i = from >> 6;
        uint64_t w = (invert ? ~c->words[i] : c->words[i]) >> (from & 63);
        if (w) {
            from += __builtin_ctzll(w);
            return from < c->nbits ? from : c->nbits;
        }
        from = (i + 1) << 6;
    }
    return c->nbits;
}

/* The next run: [start, start+n) of whole blocks (*mask NULL), or one
 * block with a sub-block record (*mask: its words). */
static int next_run(struct cg_copy *c, uint64_t *start, uint64_t *n,
                    const uint64_t **mask)
{
    int got = 0;
    pthread_mutex_lock(&c->lock);
    if (!atomic_load(&c->failed) && !atomic_load(&c->cancelled)) {
        uint64_t s = next_bit(c, c->cursor, 0);
        if (s < c->nbits) {
            while (c->pcur < c->nrec && c->pblocks[c->pcur] < s)
                c->pcur++;
            *mask = NULL;
            if (c->pcur < c->nrec && c->pblocks[c->pcur] == s) {
                *mask = c->pmasks + c->pcur++ * c->wpb;
                *start = s, *n = 1, c->cursor = s + 1;
            } else {
                uint64_t limit = c->nbits - s > c->max_run ? s + c->max_run : c->nbits;
                uint64_t e = next_bit(c, s, 1);
                if (e > limit)
                    e = limit;
                if (c->pcur < c->nrec && c->pblocks[c->pcur] < e)
                    e = c->pblocks[c->pcur];
                *start = s, *n = e - s, c->cursor = e;
            }
            got = 1;
        } else {
            c->cursor = c->nbits;
        }
    }
    pthread_mutex_unlock(&c->lock);
    return got;
}

static int pread_full(int fd, char *buf, uint64_t len, uint64_t off)
{
    while (len) {
        ssize_t r = pread(fd, buf, len, off);
        if (r < 0 && errno == EINTR)
            continue;
        if (r < 0)
            return -errno;
        if (r == 0)
            return -EIO;     /* short read: the volume or store shrank */
        buf += r, len -= r, off += r;
    }
    return 0;
}

/* Fill buf with the PiT content of blocks [start, start+n): live, then the
 * overlay (see the ordering argument at the top). */
static int read_pit(struct cg_copy *c, char *buf, uint64_t start, uint64_t n, uint64_t len)
{
    int r = pread_full(c->fd, buf, len, start * c->g);
    if (r < 0) {
        fail(c, CG_FAULT_SOURCE, "read of the volume at block %llu: %s",
             (unsigned long long)start, strerror(-r));
        return -1;
    }
    if (c->ov == NULL)
        return 0;
    if (atomic_load_explicit(&c->ov->closed, memory_order_acquire)) {
        fail(c, CG_FAULT_SOURCE, "the PiT has ended");
        return -1;
    }
    for (uint64_t b = start; b < start + n; b++) {
        int64_t off = cg_overlay_get(c->ov, b);
        if (off < 0)
            continue;
        uint64_t at = (b - start) * c->g;
        uint64_t blen = c->size - b * c->g < c->g ? c->size - b * c->g : c->g;
        int fd = atomic_load_explicit(&c->ov->fd, memory_order_acquire);
        r = pread_full(fd, buf + at, blen, (uint64_t)off);
        if (r < 0) {
            fail(c, CG_FAULT_SOURCE, "read of saved block %llu: %s",
                 (unsigned long long)b, strerror(-r));
            return -1;
        }
    }
    return 0;
}

/* The next run of set bits of a block's mask at or after piece *i: its
 * bytes [*off, *off + *len) clipped to the block's `blen`; 0 when none. */
static int next_piece(const struct cg_copy *c, const uint64_t *mask, uint64_t blen,
                      uint64_t *i, uint64_t *off, uint64_t *len)
{
    uint64_t spb = c->g / c->sub;
    while (*i < spb && !(mask[*i >> 6] >> (*i & 63) & 1))
        (*i)++;
    if (*i >= spb || *i * c->sub >= blen)
        return 0;
    uint64_t j = *i;
    while (j < spb && mask[j >> 6] >> (j & 63) & 1)
        j++;
    *off = *i * c->sub;
    *len = (j - *i) * c->sub < blen - *off ? (j - *i) * c->sub : blen - *off;
    *i = j;
    return 1;
}

/* read_pit for a block sent as pieces: only its dirty pieces are read
 * (live, then the overlay's saved copy of the same bytes), each at its
 * offset in buf; the clean bytes of buf are left as they were.  Scattered
 * 4 KiB pieces read 64 KiB blocks whole cost 16x their bytes in reads. */
static int read_pit_pieces(struct cg_copy *c, char *buf, uint64_t block,
                           const uint64_t *mask, uint64_t blen)
{
    uint64_t i = 0, off, len;
    while (next_piece(c, mask, blen, &i, &off, &len)) {
        int r = pread_full(c->fd, buf + off, len, block * c->g + off);
        if (r < 0) {
            fail(c, CG_FAULT_SOURCE, "read of the volume at block %llu: %s",
                 (unsigned long long)block, strerror(-r));
            return -1;
        }
    }
    if (c->ov == NULL)
        return 0;
    if (atomic_load_explicit(&c->ov->closed, memory_order_acquire)) {
        fail(c, CG_FAULT_SOURCE, "the PiT has ended");
        return -1;
    }
    int64_t saved = cg_overlay_get(c->ov, block);
    if (saved < 0)
        return 0;
    int fd = atomic_load_explicit(&c->ov->fd, memory_order_acquire);
    for (i = 0; next_piece(c, mask, blen, &i, &off, &len);) {
        int r = pread_full(fd, buf + off, len, (uint64_t)saved + off);
        if (r < 0) {
            fail(c, CG_FAULT_SOURCE, "read of saved block %llu: %s",
                 (unsigned long long)block, strerror(-r));
            return -1;
        }
    }
    return 0;
}

static int is_zero(const char *p, uint64_t n)
{
    /* memcmp against itself shifted: all zero iff the head is zero and
     * every byte equals the one 16 before it. */
    uint64_t head = n < 16 ? n : 16;
    for (uint64_t i = 0; i < head; i++)
        if (p[i])
            return 0;
    return n <= 16 || memcmp(p, p + 16, n - 16) == 0;
}

/* Runs in the stream's own thread (inside its nbd_poll or nbd_aio_*). */
static int slot_done(void *user_data, int *error)
{
    struct slot *sl = user_data;
    if (*error && !sl->err)
        sl->err = *error;
    if (--sl->pending == 0)
        sl->done = 1;
    return 1;                /* retire the command */
}

static int flush_done(void *user_data, int *error)
{
    struct flush *f = user_data;
    f->err = *error;
    f->done = 1;
    return 1;
}

static int issue_flush(struct stream *s)
{
    struct cg_copy *c = s->c;
    if (s->nacked == 0)
        return 0;
    struct flush *f = calloc(1, sizeof *f);
    if (f == NULL) {
        fail(c, CG_FAULT_SOURCE, "out of memory for a flush");
        return -1;
    }
    f->ranges = s->acked, f->n = s->nacked;
    s->acked = NULL, s->nacked = s->capacked = 0, s->acked_bytes = 0;
    nbd_completion_callback cb = {.callback = flush_done, .user_data = f};
    if (nbd_aio_flush(s->h, cb, 0) == -1) {
        fail(c, CG_FAULT_TARGET, ": %s", nbd_get_error());
        s->own_error = 1;
        free(f->ranges);
        free(f);
        return -1;
    }
    f->next = s->flushes, s->flushes = f;
    return 0;
}

static int add_acked(struct stream *s, uint64_t start, uint64_t n, uint64_t len)
{
    if (s->nacked == s->capacked) {
        size_t cap = s->capacked ? s->capacked * 2 : 64;
        uint64_t *a = realloc(s->acked, cap * 2 * sizeof *a);
        if (a == NULL) {
            fail(s->c, CG_FAULT_SOURCE, "out of memory for acknowledged runs");
            return -1;
        }
        s->acked = a, s->capacked = cap;
    }
    s->acked[2 * s->nacked] = start, s->acked[2 * s->nacked + 1] = n;
    s->nacked++;
    s->acked_bytes += len;
    return 0;
}

/* A run the target acknowledged: a CONFIRM event, and a FLUSHED one once a
 * flush covers it (at once without flush support). */
static int landed(struct stream *s, uint64_t start, uint64_t n, uint64_t len,
                  uint64_t sent)
{
    struct cg_copy *c = s->c;
    int rc = 0;
    if (!emit(c, CG_EV_CONFIRM, start, n))
        rc = -1;
    else if (s->can_flush)
        rc = add_acked(s, start, n, sent);
    else if (!emit(c, CG_EV_FLUSHED, start, n))
        rc = -1;
    atomic_fetch_add(&c->done_bytes, len);
    atomic_fetch_add(&c->sent_bytes, sent);
    return rc;
}

/* Handle completed requests: writes become CONFIRM events, flushes
 * FLUSHED events for the writes they cover.  Returns -1 on an error. */
static int reap(struct stream *s)
{
    struct cg_copy *c = s->c;
    int rc = 0;
    for (int i = 0; i < c->inflight; i++) {
        struct slot *sl = &s->slots[i];
        if (!sl->busy || !sl->done)
            continue;
        sl->busy = 0;
        clock_gettime(CLOCK_MONOTONIC, &s->last_progress);
        if (sl->err) {
            fail(c, CG_FAULT_TARGET, " failed a write at %llu: %s",
                 (unsigned long long)(sl->start * c->g), strerror(sl->err));
            s->own_error = 1;
            rc = -1;
            continue;
        }
        if (!c->packed) {
            rc |= landed(s, sl->start, sl->nblocks, sl->len, sl->sent);
            continue;
        }
        /* Adjacent runs of a batch (the blocks of a dense group, each a
         * run of its own when sent as pieces) land as one: one event, and
         * one call into the PiT and the change map, instead of one each. */
        uint64_t cs = 0, cn = 0, clen = 0, csent = 0;
        for (size_t j = 0; j < sl->nruns; j++) {
            const uint64_t *r = sl->runs + 4 * j;
            if (cn && r[0] == cs + cn) {
                cn += r[1], clen += r[2], csent += r[3];
                continue;
            }
            if (cn)
                rc |= landed(s, cs, cn, clen, csent);
            cs = r[0], cn = r[1], clen = r[2], csent = r[3];
        }
        if (cn)
            rc |= landed(s, cs, cn, clen, csent);
    }
    for (struct flush **fp = &s->flushes; *fp;) {
        struct flush *f = *fp;
        if (!f->done) {
            fp = &f->next;
            continue;
        }
        *fp = f->next;
        clock_gettime(CLOCK_MONOTONIC, &s->last_progress);
        if (f->err) {
            fail(c, CG_FAULT_TARGET, " failed to flush: %s", strerror(f->err));
            s->own_error = 1;
            rc = -1;
        } else {
            for (size_t i = 0; i < f->n; i++)
                if (!emit(c, CG_EV_FLUSHED, f->ranges[2 * i], f->ranges[2 * i + 1]))
                    rc = -1;
        }
        free(f->ranges);
        free(f);
    }
    return rc;
}

static int busy(const struct stream *s)
{
    if (s->flushes)
        return 1;
    for (int i = 0; i < s->c->inflight; i++)
        if (s->slots[i].busy)
            return 1;
    return 0;
}

/* Wait for some request to complete (at most POLL_MS), then reap.
 * `budget_ms`: fail if nothing completed for that long. */
static int wait_some(struct stream *s, int64_t budget_ms)
{
    struct cg_copy *c = s->c;
    int r = nbd_poll(s->h, POLL_MS);
    if (r == -1) {
        fail(c, CG_FAULT_TARGET, ": %s", nbd_get_error());
        s->own_error = 1;
        return -1;
    }
    if (reap(s) < 0)
        return -1;
    if (busy(s) && ms_since(&s->last_progress) > budget_ms) {
        fail(c, CG_FAULT_TARGET, " did not answer for %.0f s", c->timeout_ms / 1000.0);
        s->own_error = 1;
        return -1;
    }
    return 0;
}

/* Wait until nothing is in flight, or an error; after a cancel, give up
 * once CANCEL_GRACE_MS passed (a cancel is not the target's fault). */
static void settle(struct stream *s)
{
    struct timespec since;
    int cancel_seen = 0;
    while (busy(s)) {
        if (atomic_load(&s->c->cancelled)) {
            if (!cancel_seen) {
                cancel_seen = 1;
                clock_gettime(CLOCK_MONOTONIC, &since);
            } else if (ms_since(&since) > CANCEL_GRACE_MS) {
                return;
            }
        }
        if (wait_some(s, s->c->timeout_ms) < 0)
            return;
    }
}

static struct slot *free_slot(struct stream *s)
{
    for (int i = 0; i < s->c->inflight; i++)
        if (!s->slots[i].busy)
            return &s->slots[i];
    return NULL;
}

/* Wait until the rate limit lets `len` bytes go, reaping meanwhile.
 * 0: go; -1: the copy failed or was cancelled while waiting. */
static int pace(struct stream *s, uint64_t len)
{
    struct cg_copy *c = s->c;
    for (;;) {
        if (atomic_load(&c->failed) || atomic_load(&c->cancelled))
            return -1;
        uint64_t rate = atomic_load(&c->rate);
        if (rate == 0)
            return 0;
        struct timespec now;
        clock_gettime(CLOCK_MONOTONIC, &now);
        pthread_mutex_lock(&c->bucket_lock);
        double dt = (now.tv_sec - c->refilled.tv_sec)
                    + (now.tv_nsec - c->refilled.tv_nsec) / 1e9;
        double cap = rate * (RATE_BURST_MS / 1000.0);
        c->tokens += dt * rate;
        if (c->tokens > cap)
            c->tokens = cap;
        c->refilled = now;
        int go = c->tokens > -1.0;    /* less than a byte of debt is none */
        if (go)
            c->tokens -= (double)len;
        double wait_ms = go ? 0 : -c->tokens * 1000.0 / rate;
        pthread_mutex_unlock(&c->bucket_lock);
        if (go)
            return 0;
        if (busy(s)) {
            if (wait_some(s, c->timeout_ms) < 0)
                return -1;
        } else {
            int64_t ms = wait_ms < POLL_MS ? (int64_t)wait_ms + 1 : POLL_MS;
            struct timespec ts = {ms / 1000, (ms % 1000) * 1000000};
            nanosleep(&ts, NULL);
        }
    }
}

static int mask_bit(const uint64_t *mask, uint64_t i)
{
    return mask[i >> 6] >> (i & 63) & 1;
}

/* Call fn(s, sl, offset, length) for each run of dirty pieces of a block
 * of `len` bytes (every byte if mask is NULL); returns the bytes covered,
 * or stops at the first fn that fails (-1). */
static int64_t each_piece(struct stream *s, struct slot *sl, const uint64_t *mask,
                          uint64_t len,
                          int (*fn)(struct stream *, struct slot *, uint64_t, uint64_t))
{
    struct cg_copy *c = s->c;
    if (mask == NULL)
        return fn == NULL || fn(s, sl, 0, len) == 0 ? (int64_t)len : -1;
    uint64_t spb = c->g / c->sub, total = 0;
    for (uint64_t i = 0; i < spb;) {
        if (!mask_bit(mask, i)) {
            i++;
            continue;
        }
        uint64_t j = i;
        while (j < spb && mask_bit(mask, j))
            j++;
        uint64_t off = i * c->sub;
        if (off >= len)
            break;
        uint64_t plen = (j - i) * c->sub < len - off ? (j - i) * c->sub : len - off;
        if (fn != NULL && fn(s, sl, off, plen) < 0)
            return -1;
        total += plen;
        i = j;
    }
    return (int64_t)total;
}

/* Issue one write (or write-zeroes) of bytes [off, off+len) of the slot's
 * block(s). */
static int issue_piece(struct stream *s, struct slot *sl, uint64_t off, uint64_t len)
{
    struct cg_copy *c = s->c;
    nbd_completion_callback cb = {.callback = slot_done, .user_data = sl};
    int64_t cookie;
    sl->pending++;
    /* A zero run costs the link nothing and the target may punch a hole
     * for it. */
    if (s->can_zero && is_zero(sl->buf + off, len))
        cookie = nbd_aio_zero(s->h, len, sl->start * c->g + off, cb, 0);
    else
        cookie = nbd_aio_pwrite(s->h, sl->buf + off, len, sl->start * c->g + off, cb, 0);
    if (cookie == -1) {
        sl->pending--;
        fail(c, CG_FAULT_TARGET, ": %s", nbd_get_error());
        s->own_error = 1;
        return -1;
    }
    return 0;
}

/* Packed batches (see "Packed" at the top).  Little-endian throughout. */
#define PACK_MAGIC "CGMPACK1"
#define PACK_HEAD 16         /* magic, u32 records, u32 0 */
#define PACK_REC 16          /* u64 offset, u32 length, u32 flags */
#define PACK_ZERO 1u         /* flags: the bytes are zero, no data follows */

static void put32(char *p, uint32_t v)
{
    for (int i = 0; i < 4; i++)
        p[i] = (char)(v >> (8 * i));
}

static void put64(char *p, uint64_t v)
{
    for (int i = 0; i < 8; i++)
        p[i] = (char)(v >> (8 * i));
}

static int count_piece(struct stream *s, struct slot *sl, uint64_t off, uint64_t len)
{
    (void)sl, (void)off, (void)len;
    s->pcount++;
    return 0;
}

/* Append a record of bytes [off, off+len) of the run at s->pstart, whose
 * PiT content is in s->scratch. */
static int pack_piece(struct stream *s, struct slot *sl, uint64_t off, uint64_t len)
{
    (void)sl;
    const char *data = s->scratch + off;
    int zero = is_zero(data, len);
    put64(s->pp, s->pstart * s->c->g + off);
    put32(s->pp + 8, (uint32_t)len);
    put32(s->pp + 12, zero ? PACK_ZERO : 0);
    s->pp += PACK_REC;
    if (!zero) {
        memcpy(s->pp, data, len);
        s->pp += len;
    }
    s->pcount++;
    return 0;
}

/* One stream of a packed copy: each request is a batch of runs (whole
 * runs and the dirty pieces of sub-block records alike), as many as fit
 * in a slot's buffer, written at offset 0 of the packed export. */
static void stream_packed(struct stream *s)
{
    struct cg_copy *c = s->c;
    uint64_t start = 0, n = 0;
    const uint64_t *mask = NULL;
    int held = 0;            /* a run taken from the cursor, not yet packed */

    for (;;) {
        struct slot *sl;
        while ((sl = free_slot(s)) == NULL && !atomic_load(&c->failed)
               && !atomic_load(&c->cancelled))
            if (wait_some(s, c->timeout_ms) < 0)
                break;
        if (sl == NULL)
            break;
        sl->nruns = 0;
        s->pp = sl->buf + PACK_HEAD;
        uint64_t nrec = 0, blen = 0, bsent = 0;
        int broken = 0;
        for (;;) {
            if (!held && !next_run(c, &start, &n, &mask))
                break;
            held = 1;
            uint64_t len = c->size - start * c->g < n * c->g ? c->size - start * c->g
                                                              : n * c->g;
            s->pcount = 0;
            uint64_t sent = (uint64_t)each_piece(s, sl, mask, len, count_piece);
            uint64_t recs = s->pcount;
            uint64_t used = (uint64_t)(s->pp - sl->buf);
            if (sl->nruns && (nrec + recs > c->maxrec
                              || used + recs * PACK_REC + sent > c->bufsize))
                break;           /* full: the run opens the next batch */
            if ((mask ? read_pit_pieces(c, s->scratch, start, mask, len)
                      : read_pit(c, s->scratch, start, n, len)) < 0) {
                broken = 1;
                break;
            }
            s->pstart = start, s->pcount = 0;
            each_piece(s, sl, mask, len, pack_piece);
            uint64_t *r = sl->runs + 4 * sl->nruns++;
            r[0] = start, r[1] = n, r[2] = len, r[3] = sent;
            nrec += recs, blen += len, bsent += sent;
            held = 0;
        }
        if (broken || sl->nruns == 0)
            break;
        memcpy(sl->buf, PACK_MAGIC, 8);
        put32(sl->buf + 8, (uint32_t)nrec);
        put32(sl->buf + 12, 0);
        if (pace(s, bsent) < 0)
            break;
        sl->busy = 1, sl->done = 0, sl->err = 0, sl->pending = 1;
        sl->start = sl->runs[0], sl->nblocks = 0, sl->len = blen, sl->sent = bsent;
        nbd_completion_callback cb = {.callback = slot_done, .user_data = sl};
        if (nbd_aio_pwrite(s->h, sl->buf, (size_t)(s->pp - sl->buf), 0, cb, 0) == -1) {
            sl->busy = 0;
            fail(c, CG_FAULT_TARGET, ": %s", nbd_get_error());
            s->own_error = 1;
            break;
        }
        if (reap(s) < 0)
            break;
        if (s->acked_bytes >= c->flush_every && issue_flush(s) < 0)
            break;
    }
}

static void *stream_run(void *arg)
{
    struct stream *s = arg;
    struct cg_copy *c = s->c;
    uint64_t start, n;
    const uint64_t *mask;

    clock_gettime(CLOCK_MONOTONIC, &s->last_progress);
    s->can_zero = nbd_can_zero(s->h) == 1;
    s->can_flush = nbd_can_flush(s->h) == 1;
    if (c->packed)
        stream_packed(s);
    for (; !c->packed;) {
        struct slot *sl;
        while ((sl = free_slot(s)) == NULL && !atomic_load(&c->failed)
               && !atomic_load(&c->cancelled))
            if (wait_some(s, c->timeout_ms) < 0)
                break;
        if (sl == NULL || !next_run(c, &start, &n, &mask))
            break;
        uint64_t len = c->size - start * c->g < n * c->g ? c->size - start * c->g : n * c->g;
        uint64_t sent = (uint64_t)each_piece(s, sl, mask, len, NULL);
        if (pace(s, sent) < 0 || (mask ? read_pit_pieces(c, sl->buf, start, mask, len)
                                       : read_pit(c, sl->buf, start, n, len)) < 0)
            break;
        sl->busy = 1, sl->done = 0, sl->err = 0, sl->pending = 1;
        sl->start = start, sl->nblocks = n, sl->len = len, sl->sent = sent;
        int issued = each_piece(s, sl, mask, len, issue_piece) >= 0;
        if (!issued && !sl->err)
            sl->err = EIO;   /* a piece never went: never confirm the block */
        if (--sl->pending == 0)
            sl->done = 1;    /* the guard taken above (see the top) */
        if (!issued)
            break;
        if (reap(s) < 0)
            break;
        if (s->acked_bytes >= c->flush_every && issue_flush(s) < 0)
            break;
    }
    /* Retire what is in flight: what the target acknowledged is reported,
     * so it is not sent again.  Then the stream's last flush, unless it
     * met an error of its own or the copy was cancelled. */
    settle(s);
    if (!s->own_error && !atomic_load(&c->cancelled) && s->can_flush
        && issue_flush(s) == 0)
        settle(s);
    return NULL;
}

struct cg_copy *cg_copy_new(void **handles, int nhandles, int inflight,
                            int live_fd, struct cg_overlay *ov,
                            uint64_t granularity, uint64_t size,
                            const uint64_t *words, uint64_t nbits,
                            uint64_t max_run, uint64_t flush_every,
                            int timeout_ms, const uint64_t *pblocks,
                            const uint64_t *pmasks, uint64_t nrec, uint64_t sub,
                            int packed)
{
    struct cg_copy *c = calloc(1, sizeof *c);
    if (c == NULL)
        return NULL;
    c->h = (struct nbd_handle **)handles;
    c->nh = nhandles, c->inflight = inflight, c->fd = live_fd, c->ov = ov;
    c->g = granularity, c->size = size, c->words = words, c->nbits = nbits;
    c->max_run = max_run, c->flush_every = flush_every, c->timeout_ms = timeout_ms;
    c->pblocks = pblocks, c->pmasks = pmasks, c->nrec = nrec;
    c->sub = sub ? sub : granularity;
    c->wpb = (granularity / c->sub + 63) / 64;
    c->packed = packed;
    c->maxrec = max_run * granularity / c->sub + 1;
    c->bufsize = (size_t)max_run * granularity
                 + (packed ? PACK_HEAD + c->maxrec * PACK_REC : 0);
    pthread_mutex_init(&c->lock, NULL);
    pthread_mutex_init(&c->bucket_lock, NULL);
    clock_gettime(CLOCK_MONOTONIC, &c->refilled);
    c->streams = calloc(nhandles, sizeof *c->streams);
    if (c->streams == NULL)
        goto nomem;
    for (int i = 0; i < nhandles; i++) {
        struct stream *s = &c->streams[i];
        s->c = c, s->h = c->h[i];
        s->slots = calloc(inflight, sizeof *s->slots);
        if (s->slots == NULL)
            goto nomem;
        /* mmap, not malloc: freed buffers go back to the kernel at once.
         * (glibc raises its mmap threshold after the first free of a large
         * block, and later copies' buffers then stay in the heap: the
         * slave's RSS steps up by a copy's worth of buffers, measured 8 MiB.) */
        for (int j = 0; j < inflight; j++) {
            void *buf = mmap(NULL, c->bufsize, PROT_READ | PROT_WRITE,
                             MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (buf == MAP_FAILED)
                goto nomem;
            s->slots[j].buf = buf;
            if (packed && (s->slots[j].runs = malloc(c->maxrec * 4 * sizeof(uint64_t)))
                          == NULL)
                goto nomem;
        }
        if (packed) {
            void *buf = mmap(NULL, (size_t)max_run * granularity, PROT_READ | PROT_WRITE,
                             MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (buf == MAP_FAILED)
                goto nomem;
            s->scratch = buf;
        }
    }
    return c;
nomem:
    cg_copy_free(c);
    return NULL;
}

int cg_copy_run(struct cg_copy *c)
{
    pthread_t *t = calloc(c->nh, sizeof *t);
    int started = 1;
    if (t == NULL) {
        fail(c, CG_FAULT_SOURCE, "out of memory for copy threads");
        return -1;
    }
    for (; started < c->nh; started++) {
        int e = pthread_create(&t[started], NULL, stream_run, &c->streams[started]);
        if (e) {
            fail(c, CG_FAULT_SOURCE, "cannot start a copy thread: %s", strerror(e));
            break;
        }
    }
    stream_run(&c->streams[0]);
    for (int i = 1; i < started; i++)
        pthread_join(t[i], NULL);
    free(t);
    return atomic_load(&c->failed) ? -1 : 0;
}

void cg_copy_set_rate(struct cg_copy *c, uint64_t bytes_per_s)
{
    atomic_store(&c->rate, bytes_per_s);
}

void cg_copy_cancel(struct cg_copy *c)
{
    atomic_store(&c->cancelled, 1);
}

uint64_t cg_copy_done_bytes(struct cg_copy *c)
{
    return atomic_load(&c->done_bytes);
}

uint64_t cg_copy_sent_bytes(struct cg_copy *c)
{
    return atomic_load(&c->sent_bytes);
}

size_t cg_copy_take_events(struct cg_copy *c, uint64_t *out, size_t max_events)
{
    pthread_mutex_lock(&c->lock);
    size_t n = c->nev < max_events ? c->nev : max_events;
    memcpy(out, c->ev, n * 3 * sizeof *out);
    memmove(c->ev, c->ev + 3 * n, (c->nev - n) * 3 * sizeof *out);
    c->nev -= n;
    pthread_mutex_unlock(&c->lock);
    return n;
}

int cg_copy_fault(struct cg_copy *c)
{
    return atomic_load(&c->failed) ? c->fault : CG_FAULT_NONE;
}

size_t cg_copy_error(struct cg_copy *c, char *buf, size_t len)
{
    pthread_mutex_lock(&c->lock);
    size_t n = snprintf(buf, len, "%s", c->err);
    pthread_mutex_unlock(&c->lock);
    return n < len ? n : len - 1;
}

/* Free the engine.  Call only after the handles were shut down: a buffer
 * of a request never retired may still be read by libnbd until then.  If
 * such a request remains (a target that never answered), its buffer is
 * left allocated rather than risk it: at most `inflight` per stream, and
 * only for a copy that failed. */
void cg_copy_free(struct cg_copy *c)
{
    if (c == NULL)
        return;
    for (int i = 0; c->streams && i < c->nh; i++) {
        struct stream *s = &c->streams[i];
        for (int j = 0; s->slots && j < c->inflight; j++) {
            if (!s->slots[j].busy && s->slots[j].buf != NULL)
                munmap(s->slots[j].buf, c->bufsize);
            if (!s->slots[j].busy)
                free(s->slots[j].runs);
        }
        if (s->scratch != NULL)
            munmap(s->scratch, (size_t)c->max_run * c->g);
        free(s->slots);
        free(s->acked);
        /* A flush never completed stays allocated for the same reason:
         * it is its callback's user_data. */
    }
    free(c->streams);
    free(c->ev);
    pthread_mutex_destroy(&c->lock);
    pthread_mutex_destroy(&c->bucket_lock);
    free(c);
}
