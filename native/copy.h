/* The native copy engine: sends the runs of a bitmap, read from a volume
 * plus a saved-block overlay, to an NBD target over libnbd handles, with
 * no Python involved (see copy.c for the theory of operation).
 *
 * The region between the CDEF markers is what native/build.py hands to
 * cffi: plain declarations only. */
#ifndef CGMIRROR_COPY_H
#define CGMIRROR_COPY_H

#include <stddef.h>
#include <stdint.h>

/* CDEF BEGIN */
struct cg_overlay;
struct cg_copy;

/* Saved blocks of a volume: block -> offset of its copy in a store file. */
struct cg_overlay *cg_overlay_new(uint64_t nblocks);
void cg_overlay_free(struct cg_overlay *ov);
int cg_overlay_set_fd(struct cg_overlay *ov, int fd);
int cg_overlay_set(struct cg_overlay *ov, uint64_t block, int64_t offset);
int64_t cg_overlay_get(struct cg_overlay *ov, uint64_t block);
void cg_overlay_close(struct cg_overlay *ov);
uint64_t cg_overlay_bytes(struct cg_overlay *ov);

/* pblocks[nrec]: ascending blocks of `words` sent as sub-block pieces of
 * `sub` bytes, pmasks: their masks, (granularity/sub + 63)/64 words each
 * (bit i: bytes [i*sub, (i+1)*sub) of the block); nrec 0: none. */
/* packed: every handle is a cgmirror secondary's packed export (batches of
 * records, see copy.c); 0: plain NBD writes. */
/* Event kinds in cg_copy_take_events: (kind, start block, count) triples. */
#define CG_EV_CONFIRM 1
#define CG_EV_FLUSHED 2
/* Fault of a failed copy. */
#define CG_FAULT_NONE 0
#define CG_FAULT_TARGET 1
#define CG_FAULT_SOURCE 2

struct cg_copy *cg_copy_new(void **handles, int nhandles, int inflight,
                            int live_fd, struct cg_overlay *ov,
                            uint64_t granularity, uint64_t size,
                            const uint64_t *words, uint64_t nbits,
                            uint64_t max_run, uint64_t flush_every,
                            int timeout_ms, const uint64_t *pblocks,
                            const uint64_t *pmasks, uint64_t nrec, uint64_t sub,
                            int packed);
int cg_copy_run(struct cg_copy *c);
void cg_copy_cancel(struct cg_copy *c);
/* Bytes per second over all streams, 0 for none; takes effect at once. */
void cg_copy_set_rate(struct cg_copy *c, uint64_t bytes_per_s);
uint64_t cg_copy_done_bytes(struct cg_copy *c);
uint64_t cg_copy_sent_bytes(struct cg_copy *c);
size_t cg_copy_take_events(struct cg_copy *c, uint64_t *out, size_t max_events);
int cg_copy_fault(struct cg_copy *c);
size_t cg_copy_error(struct cg_copy *c, char *buf, size_t len);
void cg_copy_free(struct cg_copy *c);
/* CDEF END */

#endif
