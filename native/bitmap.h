/* cgmirror bitmap kernels.
 *
 * A bitmap is an array of uint64_t words; bit i lives in word i >> 6 at bit
 * position i & 63 (least significant bit first), so the little-endian byte
 * image of the words is the on-disk format.  Bits at positions >= nbits in
 * the last word are kept zero by every kernel that writes; the kernels that
 * read clamp their answers to nbits anyway.
 *
 * The kernels do not validate arguments beyond clamping ranges to nbits: the
 * Python wrapper (native/bitmap.py) checks them and is the only caller.
 *
 * native/build.py feeds the text between the CDEF markers to cffi's cdef(),
 * so that region must stay plain C declarations (no #include, no #if).
 */
#ifndef CGMIRROR_BITMAP_H
#define CGMIRROR_BITMAP_H

#include <stddef.h>
#include <stdint.h>

/* CDEF BEGIN */
void bm_set_range(uint64_t *bm, uint64_t nbits, uint64_t start, uint64_t count);
void bm_clear_range(uint64_t *bm, uint64_t nbits, uint64_t start, uint64_t count);
uint64_t bm_count(const uint64_t *bm, uint64_t nbits, uint64_t start, uint64_t count);
int bm_any(const uint64_t *bm, uint64_t nbits, uint64_t start, uint64_t count);
int64_t bm_find_next_set(const uint64_t *bm, uint64_t nbits, uint64_t start);
int64_t bm_find_next_clear(const uint64_t *bm, uint64_t nbits, uint64_t start);
size_t bm_runs(const uint64_t *bm, uint64_t nbits, uint64_t start,
               uint64_t max_run_len, uint64_t *out_start, uint64_t *out_len,
               size_t max_runs, uint64_t *next);
void bm_or(uint64_t *dst, const uint64_t *src, size_t nwords);
void bm_andnot(uint64_t *dst, const uint64_t *src, size_t nwords);
int bm_mark_write(uint64_t *blocks, uint64_t nblocks, uint64_t *touched,
                  const uint64_t *durable, uint64_t nregions, uint64_t offset,
                  uint64_t length, unsigned block_shift, unsigned region_shift);
/* CDEF END */

#endif /* CGMIRROR_BITMAP_H */
