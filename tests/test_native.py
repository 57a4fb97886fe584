"""Tests for native.bitmap: smoke, known answers, and properties against a
plain-Python reference (a set of ints)."""

import array
import os

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from native.bitmap import Bitmap, mark_write

# ---------------------------------------------------------------------------
# Known-answer vectors.
#
# Made by hand from the layout rule alone (bit i is bit i % 64 of word i // 64,
# words stored little-endian), writing each word as a hex literal and the
# runs by reading the bit list; none of it came from running native/bitmap.c.
# Each entry: (nbits, bits set as (start, count) ranges, words, runs).
KAT = [
    # One bit at each end of word 0, bit 0 of word 1; 130 bits = 3 words.
    (130, [(0, 1), (63, 2)],
     [0x8000000000000001, 0x0000000000000001, 0],
     [(0, 1), (63, 2)]),
    # A range unaligned at both ends spanning a full middle word.
    (200, [(60, 72)],
     [0xF000000000000000, 0xFFFFFFFFFFFFFFFF, 0x000000000000000F, 0],
     [(60, 72)]),
    # The last bit of a map that is not a multiple of 64 bits.
    (70, [(69, 1), (5, 3)],
     [0x00000000000000E0, 0x0000000000000020],
     [(5, 3), (69, 1)]),
    # A full map of exactly two words: one run that ends at nbits.
    (128, [(0, 128)],
     [0xFFFFFFFFFFFFFFFF, 0xFFFFFFFFFFFFFFFF],
     [(0, 128)]),
    # Alternating bits in word 0 low byte (0x55).
    (64, [(0, 1), (2, 1), (4, 1), (6, 1)],
     [0x0000000000000055],
     [(0, 1), (2, 1), (4, 1), (6, 1)]),
]


def words_to_bytes(words):
    return b"".join(w.to_bytes(8, "little") for w in words)


def test_smoke():
    """The extension imports and gives one known answer."""
    bm = Bitmap(130)
    bm.set(63, 2)
    assert bm.count() == 2
    assert bm.to_bytes()[7] == 0x80 and bm.to_bytes()[8] == 0x01


@pytest.mark.parametrize("nbits,ranges,words,runs", KAT)
def test_known_answers(nbits, ranges, words, runs):
    """Setting the ranges gives the hand-made words and runs."""
    bm = Bitmap(nbits)
    for s, c in ranges:
        bm.set(s, c)
    assert bm.to_bytes() == words_to_bytes(words)
    assert bm.runs() == (runs, nbits)
    assert bm.count() == sum(c for _, c in runs)
    assert Bitmap.from_bytes(nbits, words_to_bytes(words)) == bm


# ---------------------------------------------------------------------------
# Reference model.


def ref_runs(bits, start=0, max_run=2**63):
    """Runs of consecutive ints in ``bits`` at or after ``start``, split at max_run."""
    out = []
    run_s = prev = None
    for b in sorted(b for b in bits if b >= start):
        if prev is not None and b == prev + 1:
            prev = b
            continue
        if run_s is not None:
            out.append((run_s, prev + 1 - run_s))
        run_s = prev = b
    if run_s is not None:
        out.append((run_s, prev + 1 - run_s))
    split = []
    for s, n in out:
        while n > max_run:
            split.append((s, max_run))
            s += max_run
            n -= max_run
        split.append((s, n))
    return split


def make(nbits, bits):
    bm = Bitmap(nbits)
    for b in bits:
        bm.set(b)
    return bm


# Sizes around word boundaries, plus a few larger maps so the four-word
# zero-skipping loops run.
nbits_st = st.one_of(
    st.integers(0, 260),
    st.sampled_from([63, 64, 65, 127, 128, 129, 191, 192, 193, 255, 256, 257]),
    st.integers(256, 4000),
)


@st.composite
def bitmaps(draw, min_bits=0):
    """(nbits, set of bits) with a mix of isolated bits and long ranges."""
    nbits = draw(nbits_st.filter(lambda n: n >= min_bits))
    bits = set()
    if nbits:
        idx = st.integers(0, nbits - 1)
        for b in draw(st.lists(idx, max_size=40)):
            bits.add(b)
        for s in draw(st.lists(idx, max_size=6)):
            n = draw(st.integers(1, min(nbits - s, 300)))
            bits.update(range(s, s + n))
        if draw(st.booleans()) and draw(st.booleans()):
            bits.update(range(nbits))  # sometimes full
    return nbits, bits


@st.composite
def bitmap_and_range(draw):
    nbits, bits = draw(bitmaps())
    start = draw(st.integers(0, nbits))
    count = draw(st.integers(0, nbits - start))
    return nbits, bits, start, count


FAST = settings(max_examples=150, deadline=None)


@FAST
@given(bitmaps())
def test_set_bits_and_bytes_match_reference(data):
    """Bit layout, test(), to_bytes() and from_bytes() agree with the model."""
    nbits, bits = data
    bm = make(nbits, bits)
    assert all(bm.test(i) == (i in bits) for i in range(nbits))
    expect = sum(1 << b for b in bits).to_bytes(8 * bm.nwords, "little")
    assert bm.to_bytes() == expect
    assert len(bm.to_bytes()) == 8 * ((nbits + 63) // 64) == 8 * bm.nwords
    assert Bitmap.from_bytes(nbits, expect) == bm


@FAST
@given(bitmap_and_range(), st.booleans())
def test_set_clear_range_match_reference(data, do_set):
    """set()/clear() of an unaligned range change exactly that range."""
    nbits, bits, start, count = data
    bm = make(nbits, bits)
    if do_set:
        bm.set(start, count)
        want = bits | set(range(start, start + count))
    else:
        bm.clear(start, count)
        want = bits - set(range(start, start + count))
    assert bm == make(nbits, want)
    assert bm.count() == len(want)


@FAST
@given(bitmap_and_range())
def test_count_and_any_match_reference(data):
    """count() and any() over a range match the model."""
    nbits, bits, start, count = data
    bm = make(nbits, bits)
    inside = [b for b in bits if start <= b < start + count]
    assert bm.count(start, count) == len(inside)
    assert bm.any(start, count) == bool(inside)
    assert bm.count(start) == len([b for b in bits if b >= start])
    assert bm.any() == bool(bits)


@FAST
@given(bitmaps(), st.data())
def test_next_set_and_next_clear_match_reference(data, d):
    """next_set()/next_clear() from any start match the model."""
    nbits, bits = data
    bm = make(nbits, bits)
    starts = d.draw(st.lists(st.integers(0, nbits), max_size=20)) + [0, nbits]
    for s in starts:
        want_set = min((b for b in bits if b >= s), default=None)
        want_clear = next((i for i in range(s, nbits) if i not in bits), None)
        assert bm.next_set(s) == want_set
        assert bm.next_clear(s) == want_clear


@FAST
@given(bitmaps(), st.data())
def test_runs_batches_resume_to_reference(data, d):
    """runs() batches, resumed at `next`, give the model's split runs."""
    nbits, bits = data
    bm = make(nbits, bits)
    start = d.draw(st.integers(0, nbits))
    max_run = d.draw(st.one_of(st.integers(1, 70), st.just(2**63)))
    max_runs = d.draw(st.integers(1, 9))
    got, pos, calls = [], start, 0
    while pos < nbits:
        batch, nxt = bm.runs(pos, max_run=max_run, max_runs=max_runs)
        assert len(batch) <= max_runs
        if len(batch) < max_runs:
            assert nxt == nbits
        elif batch:
            assert nxt == batch[-1][0] + batch[-1][1]
        assert nxt > pos or not batch
        got += batch
        pos = nxt
        calls += 1
        assert calls <= nbits + 2
    assert got == ref_runs(bits, start, max_run)
    assert all(0 < n <= max_run for _, n in got)
    assert list(bm.iter_runs(start, max_run=max_run, batch=max_runs)) == got


@FAST
@given(bitmaps(), st.integers(1, 5))
def test_runs_into_matches_runs(data, size):
    """runs_into() fills caller arrays with the same runs as runs()."""
    nbits, bits = data
    bm = make(nbits, bits)
    starts, lens = array.array("Q", [0] * size), array.array("Q", [0] * size)
    got, pos = [], 0
    while pos < nbits:
        n, pos = bm.runs_into(starts, lens, pos)
        got += list(zip(starts[:n], lens[:n]))
    assert got == ref_runs(bits)


@FAST
@given(bitmaps(), st.data())
def test_or_andnot_copy_eq_match_reference(data, d):
    """or_(), andnot(), copy() and == match set union/difference."""
    nbits, a_bits = data
    b_bits = set(d.draw(st.lists(st.integers(0, max(nbits - 1, 0)), max_size=40))) if nbits else set()
    a, b = make(nbits, a_bits), make(nbits, b_bits)
    c = a.copy()
    assert c == a and c is not a
    c.or_(b)
    assert c == make(nbits, a_bits | b_bits)
    assert a == make(nbits, a_bits)  # copy is independent
    c = a.copy()
    c.andnot(b)
    assert c == make(nbits, a_bits - b_bits)
    c.clear_all()
    assert c.count() == 0 and not c.any() and c == Bitmap(nbits)


# ---------------------------------------------------------------------------
# Fast paths on a larger map, zero-copy I/O, and argument checks.


def test_large_sparse_and_dense_maps():
    """Zero-word skipping and all-ones skipping give correct runs."""
    n = 1 << 20
    bm = Bitmap(n)
    bm.set(5)
    bm.set(700_000, 3)
    bm.set(n - 1)
    assert list(bm.iter_runs()) == [(5, 1), (700_000, 3), (n - 1, 1)]
    bm.set(1000, 500_000)
    assert bm.count() == 500_005
    assert bm.runs(0, max_run=200_000) == (
        [(5, 1), (1000, 200_000), (201_000, 200_000), (401_000, 100_000),
         (700_000, 3), (n - 1, 1)], n)
    assert bm.next_clear(1000) == 501_000
    assert bm.next_set(700_003) == n - 1


def test_buffer_is_zero_copy_for_file_io(tmp_path):
    """pwrite from buffer() and preadv into it round-trip through a file."""
    bm = make(1000, {0, 63, 64, 999})
    fd = os.open(tmp_path / "bm", os.O_RDWR | os.O_CREAT, 0o600)
    try:
        assert os.pwrite(fd, bm.buffer(), 0) == 8 * bm.nwords
        other = Bitmap(1000)
        assert os.preadv(fd, [other.buffer()], 0) == 8 * bm.nwords
    finally:
        os.close(fd)
    other.check_tail()
    assert other == bm
    buf = other.buffer()
    buf[0] = 0
    assert not other.test(0)


def test_tail_bits_are_rejected():
    """from_bytes() and check_tail() refuse bits at or past nbits."""
    data = words_to_bytes([1 << 6])
    with pytest.raises(ValueError, match="past nbits"):
        Bitmap.from_bytes(6, data)
    assert Bitmap.from_bytes(7, data).test(6)
    bm = Bitmap(6)
    bm.buffer()[0] = 0x40
    with pytest.raises(ValueError, match="past nbits"):
        bm.check_tail()


@pytest.mark.parametrize("call", [
    lambda b: b.set(100),
    lambda b: b.set(99, 2),
    lambda b: b.set(-1),
    lambda b: b.clear(0, 101),
    lambda b: b.count(101),
    lambda b: b.count(50, 51),
    lambda b: b.any(0, 101),
    lambda b: b.test(100),
    lambda b: b.next_set(101),
    lambda b: b.next_clear(-1),
    lambda b: b.runs(101),
    lambda b: b.runs(0, max_run=0),
    lambda b: b.runs(0, max_runs=0),
    lambda b: b.iter_runs(batch=0),
    lambda b: b.or_(Bitmap(101)),
    lambda b: b.andnot(Bitmap(99)),
    lambda b: Bitmap.from_bytes(100, bytes(8)),
    lambda b: Bitmap(-1),
    lambda b: b.runs_into(array.array("Q", [0]), array.array("Q", [0, 0])),
    lambda b: b.runs_into(array.array("I", [0]), array.array("I", [0])),
    lambda b: b.runs_into(bytes(8), bytes(8)),
])
def test_bad_arguments_raise_value_error(call):
    """Out-of-range, negative and mismatched arguments raise ValueError."""
    bm = Bitmap(100)
    bm.set(3)
    before = bm.to_bytes()
    with pytest.raises(ValueError):
        call(bm)
    assert bm.to_bytes() == before


def test_wrong_types_raise_type_error():
    """Non-ints and non-Bitmaps raise TypeError."""
    bm = Bitmap(100)
    with pytest.raises(TypeError):
        bm.set(1.0)
    with pytest.raises(TypeError):
        bm.or_(b"\0" * 16)
    assert bm != b"\0" * 16


def test_edges_empty_ranges_and_zero_bits():
    """Empty ranges are allowed up to nbits; a 0-bit map works."""
    bm = Bitmap(100)
    bm.set(100, 0)
    assert bm.count(100) == 0 and not bm.any(100)
    assert bm.next_set(100) is None and bm.next_clear(100) is None
    assert bm.runs(100) == ([], 100)
    z = Bitmap(0)
    assert z.nwords == 0 and z.to_bytes() == b"" and z.count() == 0
    assert z.runs() == ([], 0) and list(z.iter_runs()) == []
    assert Bitmap.from_bytes(0, b"") == z


def test_garbage_tail_never_reported():
    """Bits past nbits written through buffer() stay invisible to the kernels."""
    bm = Bitmap(70)
    bm.set(68)
    # Bits 64..69 set, 70..71 clear, then every other bit: runs in the tail.
    bm.buffer()[8:16] = b"\x3f" + b"\xaa" * 7
    with pytest.raises(ValueError):
        bm.check_tail()
    assert bm.runs() == ([(64, 6)], 70)
    assert bm.next_set(69) == 69 and bm.next_clear(64) is None
    assert bm.runs(0, max_run=4) == ([(64, 4), (68, 2)], 70)
    assert bm.count() == 6


@given(st.integers(0, 6), st.integers(0, 4), st.integers(1, 200), st.data())
def test_mark_write_matches_reference(gshift, extra, nblocks, d):
    """mark_write sets exactly the touched blocks and regions and reports
    whether every touched region was durable (reference: sets of ints)."""
    g, r = 1 << gshift, 1 << (gshift + extra)
    size = nblocks * g
    nregions = -(-size // r)
    blocks, touched, durable = Bitmap(nblocks), Bitmap(nregions), Bitmap(nregions)
    dur = set(d.draw(st.sets(st.integers(0, nregions - 1))))
    for i in dur:
        durable.set(i)
    offset = d.draw(st.integers(0, size - 1))
    length = d.draw(st.integers(1, size - offset))
    got = mark_write(blocks, touched, durable, offset, length, g, r)
    want_blocks = set(range(offset // g, (offset + length - 1) // g + 1))
    want_regions = set(range(offset // r, (offset + length - 1) // r + 1))
    assert {i for i in range(nblocks) if blocks.test(i)} == want_blocks
    assert {i for i in range(nregions) if touched.test(i)} == want_regions
    assert got == (want_regions <= dur)


def test_mark_write_refuses_out_of_range():
    """A byte range past the end never reaches the C code."""
    b, t = Bitmap(4), Bitmap(1)
    with pytest.raises(ValueError):
        mark_write(b, t, t, 4 * 4096 - 1, 2, 4096, 16384)
    with pytest.raises(ValueError):
        mark_write(b, t, t, 0, 0, 4096, 16384)
