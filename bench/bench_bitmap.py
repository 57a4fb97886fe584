"""Benchmark native.bitmap run extraction and popcount against memcpy and numpy.

    .venv/bin/python bench/bench_bitmap.py [--repeats 3] [--log2-bits 28]

A 32 MiB bitmap (2^28 bits) of random bits at 0.1 %, 1 % and 50 % density
(fixed seed).  Per density and repeat, interleaved, it times:

  memcpy      np.copyto of the words into a preallocated buffer (the bar)
  runs        ours: Bitmap.runs_into() in batches of 16384 runs into numpy
              uint64 arrays, i.e. the C kernel plus one call per batch
  iter_runs   ours: Bitmap.iter_runs(), every run as a Python tuple
  np_runs     numpy: unpackbits -> diff -> flatnonzero -> starts, lengths
  count       ours: Bitmap.count()
  np_count    numpy: bitwise_count(words).sum()

Speeds are GB/s of bitmap scanned (2^log2 / 8 bytes / median seconds).
The ratios in the JSON line compare like with like: `runs` (arrays out) to
memcpy and to np_runs (arrays out), at the density where `runs` is slowest.
iter_runs pays ~40 ns per Python tuple on top and is shown for what a pure
Python consumer gets.  max_run is unlimited for both sides: the outputs are
identical and are checked to be.

The last line printed is JSON; everything before it is for people.
"""

import argparse
import json
import os
import statistics
import sys
import time

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

from native.bitmap import Bitmap  # noqa: E402

DENSITIES = (0.001, 0.01, 0.5)
SEED = 20261125
BATCH = 16384   # 256 KiB of output per call: stays in L2


def make_words(nbits, density, rng):
    """Random bits at `density` as uint64 words (bits drawn with replacement)."""
    nwords = nbits // 64
    if density == 0.5:
        return rng.integers(0, 2**64, size=nwords, dtype=np.uint64, endpoint=False)
    idx = rng.integers(0, nbits, size=int(nbits * density), dtype=np.uint64)
    words = np.zeros(nwords, dtype=np.uint64)
    np.bitwise_or.at(words, idx >> np.uint64(6), np.uint64(1) << (idx & np.uint64(63)))
    return words


def ours_runs(bm, out_s, out_l):
    """All runs through the C kernel into arrays; returns the run count."""
    total, pos, nbits = 0, 0, bm.nbits
    while pos < nbits:
        n, pos = bm.runs_into(out_s, out_l, pos)
        total += n
    return total


def ours_iter_runs(bm):
    """All runs as Python tuples; returns the run count."""
    n = 0
    for n, _ in enumerate(bm.iter_runs(batch=BATCH), 1):
        pass
    return n


def numpy_runs(words):
    """Runs as (starts, lengths) arrays, the usual numpy way."""
    bits = np.unpackbits(words.view(np.uint8), bitorder="little")
    edges = np.flatnonzero(np.diff(bits, prepend=np.uint8(0), append=np.uint8(0)))
    starts = edges[0::2]
    return starts, edges[1::2] - starts


def numpy_count(words):
    return int(np.bitwise_count(words).sum())


def timed(fn, *args):
    t0 = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - t0, result


def check_same(bm, words):
    """Our runs equal numpy's, and our count equals numpy's (untimed)."""
    starts, lens = numpy_runs(words)
    got_s = np.empty(len(starts) + 1, dtype=np.uint64)
    got_l = np.empty(len(starts) + 1, dtype=np.uint64)
    n, nxt = bm.runs_into(got_s, got_l, 0)
    if n != len(starts) or nxt != bm.nbits:
        raise SystemExit(f"run count differs: ours {n} (next {nxt}), numpy {len(starts)}")
    if not (np.array_equal(got_s[:n], starts) and np.array_equal(got_l[:n], lens)):
        raise SystemExit("runs differ between ours and numpy")
    if bm.count() != numpy_count(words):
        raise SystemExit("count differs between ours and numpy")
    return n


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--log2-bits", type=int, default=28)
    args = ap.parse_args(argv)

    nbits = 1 << args.log2_bits
    nbytes = nbits // 8
    rng = np.random.default_rng(SEED)
    maps = {}
    for d in DENSITIES:
        words = make_words(nbits, d, rng)
        bm = Bitmap.from_bytes(nbits, words.view(np.uint8))
        nruns = check_same(bm, words)
        maps[d] = (words, bm, nruns)

    out_s = np.empty(BATCH, dtype=np.uint64)
    out_l = np.empty(BATCH, dtype=np.uint64)
    dst = np.empty(nbits // 64, dtype=np.uint64)
    dst[:] = 0  # fault the pages in before timing

    impls = {
        "memcpy": lambda w, b: np.copyto(dst, w),
        "runs": lambda w, b: ours_runs(b, out_s, out_l),
        "iter_runs": lambda w, b: ours_iter_runs(b),
        "np_runs": lambda w, b: numpy_runs(w),
        "count": lambda w, b: b.count(),
        "np_count": lambda w, b: numpy_count(w),
    }
    times = {d: {k: [] for k in impls} for d in DENSITIES}
    for rep in range(args.repeats):
        for d in DENSITIES:
            words, bm, _ = maps[d]
            # Rotate the order each repeat so no one always runs after numpy
            # has trashed the caches.
            names = list(impls)
            k = rep % len(names)
            for name in names[k:] + names[:k]:
                dt, _ = timed(impls[name], words, bm)
                times[d][name].append(dt)
        print(f"repeat {rep + 1}/{args.repeats} done", file=sys.stderr)

    gbps = {d: {k: nbytes / statistics.median(v) / 1e9 for k, v in times[d].items()}
            for d in DENSITIES}

    cols = list(impls)
    print(f"bitmap of 2^{args.log2_bits} bits ({nbytes >> 20} MiB), "
          f"{args.repeats} interleaved repeats, median GB/s of bitmap scanned")
    print(f"{'density':>8} {'runs':>10} " + " ".join(f"{c:>10}" for c in cols))
    for d in DENSITIES:
        print(f"{d:>8.3%} {maps[d][2]:>10} " + " ".join(f"{gbps[d][c]:>10.3f}" for c in cols))

    worst = min(DENSITIES, key=lambda d: gbps[d]["runs"])
    r_mem = gbps[worst]["runs"] / gbps[worst]["memcpy"]
    r_np = gbps[worst]["runs"] / gbps[worst]["np_runs"]
    count_worst = min(DENSITIES, key=lambda d: gbps[d]["count"])
    print(f"\nworst density for runs: {worst:.1%}: "
          f"{r_mem:.3f} x memcpy (goal >= 0.5: {'met' if r_mem >= 0.5 else 'MISSED'}), "
          f"{r_np:.1f} x numpy (goal >= 10: {'met' if r_np >= 10 else 'MISSED'})")
    for d in DENSITIES:
        print(f"  {d:.1%}: runs {gbps[d]['runs'] / gbps[d]['memcpy']:.3f} x memcpy, "
              f"{gbps[d]['runs'] / gbps[d]['np_runs']:.1f} x numpy; "
              f"iter_runs {gbps[d]['iter_runs'] / gbps[d]['np_runs']:.2f} x numpy; "
              f"count {gbps[d]['count'] / gbps[d]['memcpy']:.2f} x memcpy")
    print(f"load average during run: {os.getloadavg()[0]:.2f} "
          f"(other processes on this {os.cpu_count()}-CPU machine skew every number)")

    result = {
        "bench": "bitmap",
        "nbits": nbits,
        "bytes": nbytes,
        "repeats": args.repeats,
        "seed": SEED,
        "worst_density": worst,
        "ratio_vs_memcpy": round(r_mem, 4),
        "ratio_vs_numpy": round(r_np, 3),
        "count_ratio_vs_memcpy": round(gbps[count_worst]["count"] / gbps[count_worst]["memcpy"], 4),
        "count_ratio_vs_numpy": round(gbps[count_worst]["count"] / gbps[count_worst]["np_count"], 3),
        "iter_runs_ratio_vs_numpy": round(gbps[worst]["iter_runs"] / gbps[worst]["np_runs"], 3),
        "gbps": {str(d): {k: round(v, 4) for k, v in gbps[d].items()} for d in DENSITIES},
        "runs_per_density": {str(d): maps[d][2] for d in DENSITIES},
        "seconds": {str(d): {k: [round(t, 6) for t in v] for k, v in times[d].items()}
                    for d in DENSITIES},
        "loadavg_1min": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
