"""Bitmaps of changed blocks, backed by the C kernels in native/bitmap.c.

This module is the only importer of the cffi extension (``native._bitmap``,
built by ``python -m native.build``).  Every method checks its arguments in
Python and raises ``ValueError`` (bad value) or ``TypeError`` (not an int, not
a Bitmap) before any C runs; no cffi object is ever returned.

Layout: bit ``i`` is bit ``i % 64`` (least significant first) of 64-bit word
``i // 64``; ``to_bytes()``/``buffer()`` expose the words little-endian, which
is also the on-disk format.  Bits past ``nbits`` in the last word are always
zero (``from_bytes`` rejects data where they are not).

Ranges are ``(start, count)`` in bits.  A range must lie inside
``[0, nbits]``; an empty range (``count == 0``) is allowed anywhere up to
``nbits``.

Not thread-safe: a Bitmap has no lock of its own, and a ``runs()`` call uses
per-object scratch space.  Callers that share one across threads hold a lock
around every call, including reads.
"""

import operator
import sys

from native._bitmap import ffi, lib

__all__ = ["Bitmap", "mark_write"]

if sys.byteorder != "little":  # pragma: no cover - no such CI machine
    raise ImportError("native.bitmap assumes a little-endian machine")

#: Default number of runs per ``runs()`` batch.
DEFAULT_MAX_RUNS = 4096
#: Default (and largest) run length: effectively unlimited.
UNLIMITED_RUN = 2**63

_U64_FORMATS = frozenset(("Q", "<Q", "=Q", "@Q", "L", "<L", "=L", "@L"))


def _index(value, name):
    """Return ``value`` as a non-negative int, or raise."""
    if type(value) is int:
        i = value
    else:
        try:
            i = operator.index(value)
        except TypeError:
            raise TypeError(f"{name} must be an int, not {type(value).__name__}") from None
    if i < 0:
        raise ValueError(f"{name} must be >= 0, got {i}")
    return i


def _u64_out(buf, name):
    """Check that ``buf`` is a writable, contiguous array of 8-byte unsigned ints."""
    try:
        mv = memoryview(buf)
    except TypeError:
        raise TypeError(f"{name} must support the buffer protocol") from None
    with mv:
        if mv.readonly:
            raise ValueError(f"{name} must be writable")
        if not mv.c_contiguous:
            raise ValueError(f"{name} must be contiguous")
        if mv.itemsize != 8 or mv.format not in _U64_FORMATS:
            raise ValueError(f"{name} must hold unsigned 64-bit ints, got format {mv.format!r}")
        return mv.nbytes // 8


class Bitmap:
    """A fixed-size bitmap of ``nbits`` bits, all clear at creation.

    Not thread-safe: callers sharing a Bitmap hold their own lock around
    every method call (reads too).
    """

    __slots__ = ("_nbits", "_nwords", "_words", "_buf", "_mv", "_q", "_scratch", "__weakref__")

    def __init__(self, nbits):
        nbits = _index(nbits, "nbits")
        if nbits > 2**62:
            raise ValueError(f"nbits must be <= 2**62, got {nbits}")
        self._nbits = nbits
        self._nwords = (nbits + 63) // 64
        # ffi.new zero-fills and aligns for uint64_t; keep at least one word
        # so that the C side never sees a zero-length allocation.
        self._words = ffi.new("uint64_t[]", max(self._nwords, 1))
        self._buf = ffi.buffer(self._words, 8 * self._nwords)
        self._mv = memoryview(self._buf)
        self._q = self._mv.cast("Q")
        self._scratch = None

    # ---- construction and I/O ------------------------------------------

    @classmethod
    def from_bytes(cls, nbits, data):
        """Make a Bitmap of ``nbits`` bits from ``to_bytes()`` output.

        ``data`` must be exactly ``8 * ceil(nbits / 64)`` bytes with no bit
        set at or past ``nbits``; anything else raises ``ValueError``.
        """
        bm = cls(nbits)
        with memoryview(data) as src:
            if src.nbytes != 8 * bm._nwords:
                raise ValueError(
                    f"from_bytes: {nbits} bits need {8 * bm._nwords} bytes, got {src.nbytes}"
                )
            bm._mv[:] = src.cast("B")
        bm.check_tail()
        return bm

    def to_bytes(self):
        """Return the words as little-endian bytes (``8 * nwords`` long)."""
        return self._mv.tobytes()

    def buffer(self):
        """Return a writable memoryview of bytes over the words (zero-copy).

        For file I/O, e.g. ``os.pwrite(fd, bm.buffer(), 0)`` or
        ``os.preadv(fd, [bm.buffer()], 0)``.  Whoever writes through it must
        keep bits past ``nbits`` zero (``check_tail()`` verifies).
        """
        return memoryview(self._mv)

    def check_tail(self):
        """Raise ``ValueError`` if a bit at or past ``nbits`` is set.

        Use after filling ``buffer()`` from a file.
        """
        if self._nbits % 64 and self._q[-1] >> (self._nbits % 64):
            raise ValueError(f"bitmap has bits set at or past nbits={self._nbits}")

    @property
    def nbits(self):
        """Number of bits."""
        return self._nbits

    @property
    def nwords(self):
        """Number of 64-bit words (``ceil(nbits / 64)``)."""
        return self._nwords

    @property
    def address(self):
        """The words' address, for another C module that reads them
        (native/gate.py); valid while this Bitmap lives."""
        return int(ffi.cast("uintptr_t", self._words))

    # ---- argument checks ---------------------------------------------------

    def _range(self, start, count):
        start = _index(start, "start")
        if start > self._nbits:
            raise ValueError(f"start {start} is past the end (nbits={self._nbits})")
        if count is None:
            return start, self._nbits - start
        count = _index(count, "count")
        if count > self._nbits - start:
            raise ValueError(
                f"range [{start}, {start + count}) is past the end (nbits={self._nbits})"
            )
        return start, count

    def _pos(self, start):
        start = _index(start, "start")
        if start > self._nbits:
            raise ValueError(f"start {start} is past the end (nbits={self._nbits})")
        return start

    def _same_size(self, other, op):
        if not isinstance(other, Bitmap):
            raise TypeError(f"{op}: expected a Bitmap, not {type(other).__name__}")
        if other._nbits != self._nbits:
            raise ValueError(f"{op}: size mismatch: {self._nbits} bits vs {other._nbits} bits")

    # ---- single-range operations ------------------------------------------

    def set(self, start, count=1):
        """Set bits ``[start, start + count)``."""
        start, count = self._range(start, count)
        lib.bm_set_range(self._words, self._nbits, start, count)

    def clear(self, start, count=1):
        """Clear bits ``[start, start + count)``."""
        start, count = self._range(start, count)
        lib.bm_clear_range(self._words, self._nbits, start, count)

    def clear_all(self):
        """Clear every bit."""
        lib.bm_clear_range(self._words, self._nbits, 0, self._nbits)

    def count(self, start=0, count=None):
        """Number of set bits in ``[start, start + count)`` (to the end if None)."""
        start, count = self._range(start, count)
        return lib.bm_count(self._words, self._nbits, start, count)

    def any(self, start=0, count=None):
        """True if a bit in ``[start, start + count)`` is set (to the end if None)."""
        start, count = self._range(start, count)
        return bool(lib.bm_any(self._words, self._nbits, start, count))

    def test(self, i):
        """True if bit ``i`` is set."""
        i = _index(i, "i")
        if i >= self._nbits:
            raise ValueError(f"bit {i} is out of range (nbits={self._nbits})")
        return bool((self._q[i >> 6] >> (i & 63)) & 1)

    def next_set(self, start=0):
        """Index of the first set bit at or after ``start``, or None."""
        r = lib.bm_find_next_set(self._words, self._nbits, self._pos(start))
        return None if r < 0 else r

    def next_clear(self, start=0):
        """Index of the first clear bit at or after ``start``, or None."""
        r = lib.bm_find_next_clear(self._words, self._nbits, self._pos(start))
        return None if r < 0 else r

    # ---- runs ----------------------------------------------------------------

    def _check_run_args(self, start, max_run):
        start = self._pos(start)
        max_run = _index(max_run, "max_run")
        if not 1 <= max_run <= UNLIMITED_RUN:
            raise ValueError(f"max_run must be in [1, 2**63], got {max_run}")
        return start, max_run

    def runs(self, start=0, max_run=UNLIMITED_RUN, max_runs=DEFAULT_MAX_RUNS):
        """Return one batch of runs of set bits at or after ``start``.

        Returns ``(runs, next)``: ``runs`` is a list of ``(start, length)``
        with at most ``max_runs`` entries, a run longer than ``max_run`` split
        into pieces of ``max_run`` bits (the last piece shorter); ``next`` is
        where the following call resumes, ``nbits`` once the map is done.
        Bits below ``start`` are ignored, so a run that straddles ``start``
        is reported from ``start``.
        """
        start, max_run = self._check_run_args(start, max_run)
        max_runs = _index(max_runs, "max_runs")
        if max_runs < 1:
            raise ValueError(f"max_runs must be >= 1, got {max_runs}")
        sc = self._scratch
        if sc is None or sc[0] < max_runs:
            out_start = ffi.new("uint64_t[]", max_runs)
            out_len = ffi.new("uint64_t[]", max_runs)
            sc = self._scratch = (
                max_runs, out_start, out_len, ffi.new("uint64_t *"),
                # memoryview.tolist() makes the ints ~3x faster than ffi.unpack
                memoryview(ffi.buffer(out_start)).cast("Q"),
                memoryview(ffi.buffer(out_len)).cast("Q"),
            )
        _, out_start, out_len, nextp, mv_start, mv_len = sc
        n = lib.bm_runs(self._words, self._nbits, start, max_run,
                        out_start, out_len, max_runs, nextp)
        return list(zip(mv_start[:n].tolist(), mv_len[:n].tolist())), nextp[0]

    def runs_into(self, out_start, out_len, start=0, max_run=UNLIMITED_RUN):
        """Write one batch of runs into caller arrays; return ``(n, next)``.

        ``out_start`` and ``out_len`` are writable contiguous buffers of
        unsigned 64-bit ints of equal length (``array.array('Q')``, a numpy
        ``uint64`` array); the batch size is their length.  Same runs and
        ``next`` as ``runs()``, without building Python tuples: for callers
        that handle millions of runs.
        """
        start, max_run = self._check_run_args(start, max_run)
        ns = _u64_out(out_start, "out_start")
        nl = _u64_out(out_len, "out_len")
        if ns != nl:
            raise ValueError(f"out_start has {ns} entries but out_len has {nl}")
        if ns < 1:
            raise ValueError("out_start and out_len must hold at least one entry")
        nextp = ffi.new("uint64_t *")
        n = lib.bm_runs(self._words, self._nbits, start, max_run,
                        ffi.from_buffer("uint64_t[]", out_start, require_writable=True),
                        ffi.from_buffer("uint64_t[]", out_len, require_writable=True),
                        ns, nextp)
        return n, nextp[0]

    def iter_runs(self, start=0, max_run=UNLIMITED_RUN, batch=DEFAULT_MAX_RUNS):
        """Yield every ``(start, length)`` run at or after ``start``, in order.

        Runs longer than ``max_run`` come out split, as in ``runs()``.  The
        bitmap must not change while the generator is live.  Arguments are
        checked here, not at the first ``next()``.
        """
        start, max_run = self._check_run_args(start, max_run)
        batch = _index(batch, "batch")
        if batch < 1:
            raise ValueError(f"batch must be >= 1, got {batch}")
        return self._iter_runs(start, max_run, batch)

    def _iter_runs(self, pos, max_run, batch):
        while True:
            got, pos = self.runs(pos, max_run, batch)
            yield from got
            if pos >= self._nbits:
                return

    # ---- whole-map operations ------------------------------------------------

    def or_(self, other):
        """Set every bit that is set in ``other`` (same size)."""
        self._same_size(other, "or_")
        lib.bm_or(self._words, other._words, self._nwords)

    def andnot(self, other):
        """Clear every bit that is set in ``other`` (same size)."""
        self._same_size(other, "andnot")
        lib.bm_andnot(self._words, other._words, self._nwords)

    def copy(self):
        """Return an independent Bitmap with the same bits."""
        new = Bitmap(self._nbits)
        ffi.memmove(new._words, self._words, 8 * self._nwords)
        return new

    def __eq__(self, other):
        if not isinstance(other, Bitmap):
            return NotImplemented
        # cffi buffers compare with memcmp; memoryviews compare item by item.
        return self._nbits == other._nbits and self._buf == other._buf

    __hash__ = None  # mutable

    def __repr__(self):
        return f"<Bitmap nbits={self._nbits} set={self.count()}>"


def mark_write(blocks, touched, durable, offset, length, granularity, region):
    """Record a write of bytes ``[offset, offset + length)`` in one C call.

    Sets the touched blocks (``granularity`` bytes each) in ``blocks`` and
    their regions (``region`` bytes each) in ``touched``; returns True if all
    those regions are already set in ``durable``.  Both sizes are powers of
    two and ``length`` > 0.  This is the write path of every volume, so the
    checks are the few that keep the C in bounds.
    """
    if type(offset) is not int or type(length) is not int or offset < 0 or length <= 0:
        raise ValueError(f"offset and length must be ints >= 0 and > 0, got {offset}, {length}")
    if touched._nbits != durable._nbits:
        raise ValueError("touched and durable must have the same size")
    gshift = granularity.bit_length() - 1
    rshift = region.bit_length() - 1
    if (granularity != 1 << gshift or region != 1 << rshift
            or offset + length > blocks._nbits << gshift
            or offset + length > touched._nbits << rshift):
        raise ValueError(f"byte range [{offset}, {offset + length}) or sizes do not fit"
                         f" ({blocks._nbits} x {granularity}, {touched._nbits} x {region})")
    return bool(lib.bm_mark_write(blocks._words, blocks._nbits, touched._words,
                                  durable._words, durable._nbits, offset, length,
                                  gshift, rshift))
