/* cgmirror bitmap kernels; see bitmap.h for the layout.
 *
 * Every kernel works a word at a time: a partial first word, whole middle
 * words, a partial last word.  Ranges are clamped to nbits so that a bad
 * call can never touch memory outside the ceil(nbits / 64) words.
 *
 * Builds with plain -O3 for baseline x86-64 (the CI machine may be another
 * CPU than the developer's).  Baseline x86-64 has no POPCNT instruction, and
 * __builtin_popcountll then becomes a ~12-instruction bit trick, so the two
 * popcount loops are compiled twice with GCC's target_clones and the loader
 * picks the POPCNT copy where the CPU has it (an ifunc, resolved once).
 */
#include "bitmap.h"

#if defined(__GNUC__) && !defined(__clang__) && defined(__x86_64__) && defined(__linux__)
#define CGM_POPCNT_CLONES __attribute__((target_clones("popcnt", "default")))
#else
#define CGM_POPCNT_CLONES
#endif

#define ALL_ONES UINT64_MAX

/* Mask of the bits at positions >= (i & 63) in a word. */
static inline uint64_t mask_from(uint64_t i) { return ALL_ONES << (i & 63); }

/* Mask of the bits at positions <= (i & 63) in a word. */
static inline uint64_t mask_upto(uint64_t i) { return ALL_ONES >> (63 - (i & 63)); }

static inline uint64_t nwords_of(uint64_t nbits) { return (nbits >> 6) + ((nbits & 63) != 0); }

/* Clamp [*start, *start + *count) to [0, nbits); returns 0 if empty. */
static inline int clamp_range(uint64_t nbits, uint64_t *start, uint64_t *count)
{
    if (*start >= nbits || *count == 0)
        return 0;
    if (*count > nbits - *start)
        *count = nbits - *start;
    return 1;
}

void bm_set_range(uint64_t *bm, uint64_t nbits, uint64_t start, uint64_t count)
{
    if (!clamp_range(nbits, &start, &count))
        return;
    uint64_t last = start + count - 1;
    uint64_t w0 = start >> 6, w1 = last >> 6;
    if (w0 == w1) {
        bm[w0] |= mask_from(start) & mask_upto(last);
        return;
    }
    bm[w0] |= mask_from(start);
    for (uint64_t w = w0 + 1; w < w1; w++)
        bm[w] = ALL_ONES;
    bm[w1] |= mask_upto(last);
}

void bm_clear_range(uint64_t *bm, uint64_t nbits, uint64_t start, uint64_t count)
{
    if (!clamp_range(nbits, &start, &count))
        return;
    uint64_t last = start + count - 1;
    uint64_t w0 = start >> 6, w1 = last >> 6;
    if (w0 == w1) {
        bm[w0] &= ~(mask_from(start) & mask_upto(last));
        return;
    }
    bm[w0] &= ~mask_from(start);
    for (uint64_t w = w0 + 1; w < w1; w++)
        bm[w] = 0;
    bm[w1] &= ~mask_upto(last);
}

CGM_POPCNT_CLONES
uint64_t bm_count(const uint64_t *bm, uint64_t nbits, uint64_t start, uint64_t count)
{
    if (!clamp_range(nbits, &start, &count))
        return 0;
    uint64_t last = start + count - 1;
    uint64_t w0 = start >> 6, w1 = last >> 6;
    if (w0 == w1)
        return (uint64_t)__builtin_popcountll(bm[w0] & mask_from(start) & mask_upto(last));
    /* Four accumulators break the add dependency chain. */
    uint64_t a = (uint64_t)__builtin_popcountll(bm[w0] & mask_from(start));
    uint64_t b = 0, c = 0, d = 0;
    uint64_t w = w0 + 1;
    for (; w + 4 <= w1; w += 4) {
        a += (uint64_t)__builtin_popcountll(bm[w]);
        b += (uint64_t)__builtin_popcountll(bm[w + 1]);
        c += (uint64_t)__builtin_popcountll(bm[w + 2]);
        d += (uint64_t)__builtin_popcountll(bm[w + 3]);
    }
    for (; w < w1; w++)
        a += (uint64_t)__builtin_popcountll(bm[w]);
    a += (uint64_t)__builtin_popcountll(bm[w1] & mask_upto(last));
    return a + b + c + d;
}

int bm_any(const uint64_t *bm, uint64_t nbits, uint64_t start, uint64_t count)
{
    if (!clamp_range(nbits, &start, &count))
        return 0;
    uint64_t last = start + count - 1;
    uint64_t w0 = start >> 6, w1 = last >> 6;
    if (w0 == w1)
        return (bm[w0] & mask_from(start) & mask_upto(last)) != 0;
    if (bm[w0] & mask_from(start))
        return 1;
    uint64_t w = w0 + 1;
    for (; w + 8 <= w1; w += 8) {
        if (bm[w] | bm[w + 1] | bm[w + 2] | bm[w + 3] |
            bm[w + 4] | bm[w + 5] | bm[w + 6] | bm[w + 7])
            return 1;
    }
    for (; w < w1; w++)
        if (bm[w])
            return 1;
    return (bm[w1] & mask_upto(last)) != 0;
}

int64_t bm_find_next_set(const uint64_t *bm, uint64_t nbits, uint64_t start)
{
    if (start >= nbits)
        return -1;
    uint64_t nw = nwords_of(nbits);
    uint64_t w = start >> 6;
    uint64_t x = bm[w] & mask_from(start);
    while (x == 0) {
        if (++w >= nw)
            return -1;
        /* Sparse maps: test four words per branch. */
        while (w + 4 <= nw && (bm[w] | bm[w + 1] | bm[w + 2] | bm[w + 3]) == 0)
            w += 4;
        if (w >= nw)
            return -1;
        x = bm[w];
    }
    uint64_t pos = (w << 6) + (uint64_t)__builtin_ctzll(x);
    return pos < nbits ? (int64_t)pos : -1;
}

int64_t bm_find_next_clear(const uint64_t *bm, uint64_t nbits, uint64_t start)
{
    if (start >= nbits)
        return -1;
    uint64_t nw = nwords_of(nbits);
    uint64_t w = start >> 6;
    uint64_t x = ~bm[w] & mask_from(start);
    while (x == 0) {
        if (++w >= nw)
            return -1;
        x = ~bm[w];
    }
    /* The zero tail bits of the last word read as clear: clamp. */
    uint64_t pos = (w << 6) + (uint64_t)__builtin_ctzll(x);
    return pos < nbits ? (int64_t)pos : -1;
}

/* Run extraction.
 *
 * Per word, edges = x ^ (x << 1 | carry) has a bit at every position where
 * the bit differs from the one below it: rising edges (run starts) and
 * falling edges (run ends) alternate, so one ctz per edge finds them and a
 * one-bit state says which kind the next edge is.  All-zero words (outside a
 * run) and all-one words (inside one) are skipped without looking at edges,
 * which makes sparse and long-run maps cost about a load per word.
 *
 * The output is bounded by max_runs; when it fills, *next is where the next
 * call resumes: the end of the last emitted piece.  That is either a clear
 * bit, nbits, or (after a split) the start of the rest of a long run, which
 * the next call then reports as a run of its own, as it should.
 *
 * Rejected, measured on a 2^28-bit map of random bits (Zen 3, 2.45 GHz):
 * a branch-free variant that wrote every edge position into a stack buffer
 * (popcount, then ctz four at a time, unconditionally) and paired them in a
 * second pass.  It won at 1 % density (7.5 vs 10.5 ns per run: this loop
 * mispredicts "does this word have edges?" on about half the words there)
 * but lost at 0.1 % (35 vs 21 ns per run) and at 50 % (3.0 vs 2.2 ns per
 * run), and real change maps are clustered, where these branches predict
 * well.  Splitting starts and ends into two buffers did not change that.
 * At 50 % the ~nbits/4 runs of 16 bytes each (32x the map's size) bound
 * any scalar kernel far below memcpy speed anyway.
 */
size_t bm_runs(const uint64_t *bm, uint64_t nbits, uint64_t start,
               uint64_t max_run_len, uint64_t *out_start, uint64_t *out_len,
               size_t max_runs, uint64_t *next)
{
    size_t n = 0;
    if (start >= nbits) {
        *next = nbits;
        return 0;
    }
    if (max_runs == 0 || max_run_len == 0) {
        *next = start;
        return 0;
    }
    const uint64_t nw = nwords_of(nbits);
    const uint64_t tail = (nbits & 63) ? ~mask_from(nbits) : ALL_ONES;
    uint64_t w = start >> 6;
    uint64_t x = bm[w] & mask_from(start);
    if (w == nw - 1)
        x &= tail;
    uint64_t in_run = 0;    /* is the bit below the current position set? */
    uint64_t run_start = 0;

#define EMIT(s_, e_)                                                    \
    do {                                                                \
        uint64_t s__ = (s_), e__ = (e_);                                \
        while (__builtin_expect(e__ - s__ > max_run_len, 0)) {          \
            out_start[n] = s__;                                         \
            out_len[n] = max_run_len;                                   \
            s__ += max_run_len;                                         \
            if (++n == max_runs) {                                      \
                *next = s__;                                            \
                return n;                                               \
            }                                                           \
        }                                                               \
        out_start[n] = s__;                                             \
        out_len[n] = e__ - s__;                                         \
        if (++n == max_runs) {                                          \
            *next = e__;                                                \
            return n;                                                   \
        }                                                               \
    } while (0)

    for (;;) {
        if (!in_run) {
            if (x == 0) {
                /* Skip zero words, four per branch while there are four. */
                do {
                    if (++w >= nw) {
                        *next = nbits;
                        return n;
                    }
                    while (w + 4 < nw && (bm[w] | bm[w + 1] | bm[w + 2] | bm[w + 3]) == 0)
                        w += 4;
                    x = bm[w];
                    if (w == nw - 1)
                        x &= tail;
                } while (x == 0);
            }
        } else {
            while (x == ALL_ONES) {
                if (++w >= nw)
                    goto end_of_map;
                x = bm[w];
                if (w == nw - 1)
                    x &= tail;
            }
        }
        uint64_t edges = x ^ ((x << 1) | in_run);
        const uint64_t base = w << 6;
        if (in_run) {
            /* The run began in an earlier word; x is not all ones (skipped
             * above), so its first edge is the end of that run. */
            uint64_t e = base + (uint64_t)__builtin_ctzll(edges);
            edges &= edges - 1;
            EMIT(run_start, e);
        }
        in_run = x >> 63;
        /* Now edges come in (start, end) pairs, except that a last lone
         * start means the run goes on into the next word. */
        while (edges) {
            uint64_t s = base + (uint64_t)__builtin_ctzll(edges);
            edges &= edges - 1;
            if (!edges) {
                run_start = s;
                break;
            }
            uint64_t e = base + (uint64_t)__builtin_ctzll(edges);
            edges &= edges - 1;
            EMIT(s, e);
        }
        if (++w >= nw)
            break;
        x = bm[w];
        if (w == nw - 1)
            x &= tail;
    }
end_of_map:
    if (in_run)
        EMIT(run_start, nbits);
    *next = nbits;
    return n;
#undef EMIT
}

void bm_or(uint64_t *dst, const uint64_t *src, size_t nwords)
{
    for (size_t i = 0; i < nwords; i++)
        dst[i] |= src[i];
}

void bm_andnot(uint64_t *dst, const uint64_t *src, size_t nwords)
{
    for (size_t i = 0; i < nwords; i++)
        dst[i] &= ~src[i];
}

/* The write path's whole bookkeeping in one call: set the blocks that bytes
 * [offset, offset + length) touch in `blocks`, their regions in `touched`,
 * and say whether every such region is already set in `durable` (1) or the
 * write-intent map must be synced first (0).  length > 0, range checked by
 * the wrapper. */
int bm_mark_write(uint64_t *blocks, uint64_t nblocks, uint64_t *touched,
                  const uint64_t *durable, uint64_t nregions, uint64_t offset,
                  uint64_t length, unsigned block_shift, unsigned region_shift)
{
    uint64_t end = offset + length - 1;
    uint64_t b0 = offset >> block_shift, b1 = end >> block_shift;
    uint64_t r0 = offset >> region_shift, r1 = end >> region_shift;
    bm_set_range(blocks, nblocks, b0, b1 - b0 + 1);
    bm_set_range(touched, nregions, r0, r1 - r0 + 1);
    return bm_count(durable, nregions, r0, r1 - r0 + 1) == r1 - r0 + 1;
}
