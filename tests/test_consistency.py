"""Dependent-write consistency of copies, with the workload of workload.py.

First the checker itself (no processes): it accepts consistent images and
catches each kind of inconsistency.  Then real slaves: the workload writes
through establish and copy, and every copy must pass the checker, also when
a slave dies during the establish or the copy, a target fails writes, or a
target is too small.
"""

from __future__ import annotations

import random

import pytest

import workload as wl

# ------------------------------------------------------------------ checker

SMALL = wl.Layout(("s1/a", "s2/a", "s1/b", "s2/b"), 1 << 20, writers=4, slots=4)


def _steps(n: int, seed: int = 1) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(SMALL.writers) for _ in range(n)]


def _revert(images, layout, steps, w, seq):
    """Put back, in place of record (w, seq), what its slot held before it."""
    k = [i for i, s in enumerate(steps) if s == w][seq]
    before = wl.simulate(layout, steps[:k])
    v, slot = layout.place(w, seq)
    off = layout.offset(w, slot)
    images[v][off:off + wl.RECORD] = before[v][off:off + wl.RECORD]


def test_checker_accepts_consistent_images():
    """Every prefix of a serial history, and the empty image, is consistent."""
    steps = _steps(300)
    for k in (0, 1, 7, 64, 150, 299, 300):
        rep = wl.check(wl.readers_of(wl.simulate(SMALL, steps[:k])), SMALL)
        assert rep.ok, rep.summary()
    assert rep.records == SMALL.writers * SMALL.period   # every slot rewritten by now
    assert sum(h + 1 for h in rep.heads) == 300


def test_checker_catches_a_reverted_dependency():
    """A present record whose dependency (another writer's newest record) was
    reverted to the slot's older content is reported, naming both."""
    steps = _steps(300)
    images = wl.simulate(SMALL, steps)
    heads = wl.check(wl.readers_of(images), SMALL).heads
    # The last record written depends on another writer's newest record:
    # reverting that one leaves its own chain a clean (shorter) prefix, so
    # only the cross-writer dependency is broken.
    w = steps[-1]
    v, slot = SMALL.place(w, heads[w])
    off = SMALL.offset(w, slot)
    rec = wl.decode(bytes(images[v][off:off + wl.RECORD]))
    assert rec.seq == heads[w]
    dep = next((dw, dj) for dw, dj in rec.deps if dw != w)
    assert dep[1] == heads[dep[0]]
    holder = (w, heads[w])
    _revert(images, SMALL, steps, *dep)
    rep = wl.check(wl.readers_of(images), SMALL)
    assert not rep.ok
    assert any(f"depends on ({dep[0]},{dep[1]})" in v for v in rep.violations), rep.violations
    assert f"({holder[0]},{holder[1]})" in " ".join(rep.violations)
    with pytest.raises(wl.ConsistencyError, match="INCONSISTENT"):
        rep.raise_if_bad()


def test_checker_catches_a_record_missing_inside_a_chain():
    """A record older than its writer's head, reverted to the slot's previous
    version (or emptied), is reported as missing."""
    steps = _steps(300)
    base = wl.simulate(SMALL, steps)
    heads = wl.check(wl.readers_of(base), SMALL).heads
    w = 2
    seq = heads[w] - 3
    images = [bytearray(i) for i in base]
    _revert(images, SMALL, steps, w, seq)
    rep = wl.check(wl.readers_of(images), SMALL)
    assert any(f"record ({w},{seq}) is missing" in v for v in rep.violations), rep.violations
    # Emptied instead of reverted: also missing.
    images = [bytearray(i) for i in base]
    v, slot = SMALL.place(w, seq)
    off = SMALL.offset(w, slot)
    images[v][off:off + wl.RECORD] = bytes(wl.RECORD)
    rep = wl.check(wl.readers_of(images), SMALL)
    assert any(f"record ({w},{seq}) is missing" in x and "holds empty" in x
               for x in rep.violations), rep.violations


def test_checker_catches_torn_misplaced_and_foreign_records():
    """A damaged record, a record at the wrong place and a record of another
    run are each reported."""
    steps = _steps(100)
    base = wl.simulate(SMALL, steps)
    v, slot = SMALL.place(0, 5)
    off = SMALL.offset(0, slot)

    torn = [bytearray(i) for i in base]
    torn[0][SMALL.offset(1, 0) + 100] ^= 0xFF
    rep = wl.check(wl.readers_of(torn), SMALL)
    assert any("bad digest" in x for x in rep.violations), rep.violations

    moved = [bytearray(i) for i in base]
    moved[0][SMALL.offset(3, 1):SMALL.offset(3, 1) + wl.RECORD] = \
        moved[0][SMALL.offset(0, 0):SMALL.offset(0, 0) + wl.RECORD]
    rep = wl.check(wl.readers_of(moved), SMALL)
    assert any("belongs at" in x for x in rep.violations), rep.violations

    foreign = [bytearray(i) for i in base]
    other = wl.simulate(SMALL, steps, run=99)
    foreign[v][off:off + wl.RECORD] = other[v][off:off + wl.RECORD]
    rep = wl.check(wl.readers_of(foreign), SMALL)
    assert any("several runs" in x for x in rep.violations), rep.violations
    assert not wl.check(wl.readers_of(foreign), SMALL, run=1).ok


def test_checker_report_names_volume_and_offset():
    """The first violation says where to look."""
    steps = _steps(200)
    images = wl.simulate(SMALL, steps)
    heads = wl.check(wl.readers_of(images), SMALL).heads
    v, slot = SMALL.place(1, heads[1] - 1)
    off = SMALL.offset(1, slot)
    images[v][off:off + wl.RECORD] = bytes(wl.RECORD)
    with pytest.raises(wl.ConsistencyError) as exc:
        wl.check(wl.readers_of(images), SMALL).raise_if_bad()
    assert f"{SMALL.names[v]} offset {off}" in str(exc.value)
