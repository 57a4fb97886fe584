"""The crash-safe change map, in-process (a "crash" = abandoning the object:
everything it wrote has reached the kernel, as after kill -9)."""

import os

import pytest

from nbdplugin.changemap import ChangeMap, ChangeMapError

G = 64 * 1024
R = 1 << 20          # 16 blocks per intent region
SIZE = 8 << 20       # 128 blocks, 8 regions


def blocks(cm):
    return {b for s, n in cm.dirty().iter_runs() for b in range(s, s + n)}


def touched(offset, length, unit=G):
    return set(range(offset // unit, (offset + length - 1) // unit + 1))


@pytest.fixture
def new(tmp_path):
    def make():
        return ChangeMap(str(tmp_path), "v", SIZE, G, R)
    return make


def test_marks_exactly_the_blocks_touched(new):
    """Unaligned writes mark every block they touch and no other."""
    cm = new()
    writes = [(3, 100), (G - 1, 2), (5 * G, G), (20 * G + 7, 3 * G), (SIZE - 1, 1)]
    want = set()
    for off, n in writes:
        cm.mark(off, n)
        want |= touched(off, n)
    assert blocks(cm) == want
    cm.close()


def test_clean_close_and_reopen_keeps_exactly_the_marks(new):
    """A clean shutdown loses nothing and over-marks nothing."""
    cm = new()
    cm.mark(10 * G, 5)
    cm.mark(100 * G, 2 * G)
    want = blocks(cm)
    cm.close()
    cm2 = new()
    assert blocks(cm2) == want
    assert cm2.recovered_blocks == len(want)
    cm2.close()


def test_crash_before_checkpoint_overmarks_only_touched_regions(new):
    """After a crash, recovery covers every change and at most their regions."""
    cm = new()
    cm.mark(3 * G + 5, 10)            # region 0
    cm.mark(70 * G, G)                # region 4
    want = blocks(cm)
    crashed = new()                   # the first object is abandoned un-closed
    got = blocks(crashed)
    assert want <= got
    regions = {b // (R // G) for b in got}
    assert regions == {0, 4}
    crashed.close()


def test_checkpoint_shrinks_the_intent_map(new):
    """A region idle for a whole checkpoint interval leaves the intent map:
    then a crash recovers exactly the marks."""
    cm = new()
    cm.mark(3 * G, 10)
    assert cm.checkpoint()            # region 0 was written in this interval
    assert cm.checkpoint()            # ... and not in this one: dropped
    assert not cm.checkpoint()        # nothing left to do
    crashed = new()
    assert blocks(crashed) == {3}
    crashed.close()


def test_writes_during_checkpoint_keep_their_region(new):
    """A region written after the snapshot stays in the intent map."""
    cm = new()
    cm.mark(3 * G, 10)
    cm.checkpoint()
    cm.mark(50 * G, 10)               # after the checkpoint, not in the map
    crashed = new()
    assert {3, 50} <= blocks(crashed)
    crashed.close()


def test_cleared_bits_come_back_after_a_crash_not_lost(new):
    """Clearing is in memory only until a checkpoint: a crash over-marks."""
    cm = new()
    cm.mark(0, 10)
    cm.checkpoint()
    cm.checkpoint()
    cm.clear()
    assert blocks(cm) == set()
    crashed = new()
    assert blocks(crashed) == {0}
    crashed.close()


def test_cut_confirm_and_uncut(new):
    """cr moves into oos at a cut; confirmed blocks leave; the rest go back."""
    cm = new()
    cm.mark(0, 3 * G)
    assert cm.cut() == 3
    assert cm.counts() == (0, 3)
    cm.mark(10 * G, 1)                # a write after the cut goes to cr
    cm.confirm(0, 1)
    cm.uncut()
    assert blocks(cm) == {1, 2, 10}
    cm.close()


def test_oos_survives_a_crash(new):
    """Blocks of a cut not yet confirmed are not lost by a crash."""
    cm = new()
    cm.mark(0, 2 * G)
    cm.cut()
    cm.checkpoint()
    cm.checkpoint()
    crashed = new()
    assert blocks(crashed) == {0, 1}
    crashed.close()


# A write inside one already-marked block takes mark's lock-free fast path
# only when the locked path would change nothing; these pin each of the
# three bits it reads (cr, touched, durable).

def test_a_block_written_again_after_a_cut_is_marked_again(new):
    """A block in the cut (oos) written again is in cr too: the next cut
    must copy it again."""
    cm = new()
    cm.mark(5 * G, 100)
    cm.cut()
    cm.mark(5 * G + 200, 100)
    assert cm.counts() == (1, 1)
    cm.close()


def test_a_block_written_in_every_interval_keeps_its_region_in_the_intent_map(new):
    """Rewriting an already-marked block keeps its region busy, as a first
    write would: it stays in the intent map across the next checkpoint."""
    cm = new()
    cm.mark(3 * G, 10)
    cm.checkpoint()
    cm.mark(3 * G + 20, 10)           # only touched is new
    cm.checkpoint()
    crashed = new()
    assert blocks(crashed) == set(range(R // G)), "region 0 left the intent map"
    crashed.close()


def test_a_write_retried_after_its_intent_failed_makes_the_intent_durable(new):
    """A write whose intent write failed left its block in cr and its region
    in touched, but not durable: the retried write still writes the intent
    before it returns."""
    cm = new()
    good = cm._intent_fd
    cm._intent_fd = os.open(cm.intent_path, os.O_RDONLY)   # the state disk fails
    try:
        with pytest.raises(OSError):
            cm.mark(3 * G, 10)
    finally:
        os.close(cm._intent_fd)
        cm._intent_fd = good
    assert not cm.durable.any()
    cm.mark(3 * G, 10)                # the host retries
    assert cm.durable.test(0)
    crashed = new()
    assert 3 in blocks(crashed)
    crashed.close()


def test_size_change_is_refused(tmp_path, new):
    """A map made for another size is not silently reused."""
    new().close()
    with pytest.raises(ChangeMapError, match="size or granularity changed"):
        ChangeMap(str(tmp_path), "v", SIZE * 2, G, R)


def test_corrupt_map_is_refused(tmp_path, new):
    """A damaged map is an error, never an empty bitmap."""
    cm = new()
    cm.mark(0, 1)
    cm.close()
    path = os.path.join(tmp_path, "v.map")
    with open(path, "r+b") as f:
        f.seek(-1, os.SEEK_END)
        last = f.read(1)[0]
        f.seek(-1, os.SEEK_END)
        f.write(bytes([last ^ 0xFF]))
    with pytest.raises(ChangeMapError, match="checksum"):
        new()


# ------------------------------------------------------------------ named maps

def test_an_extra_named_map_persists_and_recovers(tmp_path):
    """A map set with a name beyond cr/oos saves and recovers that map as it
    was, next to the others, with no file of its own."""
    cm = ChangeMap(str(tmp_path), "v", SIZE, G, R, extra=("tgt2",))
    cm.maps["tgt2"].set(5, 3)
    cm.maps["tgt2"].set(127, 1)
    cm.mark(40 * G, 1)
    cm.checkpoint()
    assert sorted(os.listdir(tmp_path)) == ["v.intent", "v.map"]
    crashed = ChangeMap(str(tmp_path), "v", SIZE, G, R, extra=("tgt2",))
    assert list(crashed.maps["tgt2"].iter_runs()) == [(5, 3), (127, 1)]
    got = blocks(crashed)              # 40's region, over-marked by the crash
    assert 40 in got and not got & {5, 6, 7, 127}   # tgt2 does not leak into cr
    crashed.close()
    again = ChangeMap(str(tmp_path), "v", SIZE, G, R, extra=("tgt2",))
    assert list(again.maps["tgt2"].iter_runs()) == [(5, 3), (127, 1)]
    again.close()


def test_a_saved_map_this_slave_does_not_keep_is_refused(tmp_path):
    """Opening a map file with a name the slave does not know fails, naming
    it, instead of dropping what it records."""
    cm = ChangeMap(str(tmp_path), "v", SIZE, G, R, extra=("tgt2",))
    cm.close()
    with pytest.raises(ChangeMapError, match="'tgt2'"):
        ChangeMap(str(tmp_path), "v", SIZE, G, R)


def test_a_new_map_name_starts_empty_on_old_state(new, tmp_path):
    """State saved without an extra map opens with it empty, marks intact."""
    cm = new()
    cm.mark(9 * G, 1)
    cm.close()
    cm2 = ChangeMap(str(tmp_path), "v", SIZE, G, R, extra=("tgt2",))
    assert cm2.maps["tgt2"].count() == 0
    assert blocks(cm2) == {9}
    cm2.close()


def test_map_names_must_be_distinct_identifiers(tmp_path):
    """A duplicate or unsavable name is a programming error, caught at once."""
    for extra in (("cr",), ("a b",), ("x" * 17,)):
        with pytest.raises(ValueError):
            ChangeMap(str(tmp_path), "v", SIZE, G, R, extra=extra)


def test_a_map_file_of_the_previous_format_is_read(tmp_path, new):
    """A map written before maps had names (cr | oos, one crc) still recovers."""
    import struct
    import zlib

    from native.bitmap import Bitmap
    bits = Bitmap(SIZE // G)
    bits.set(17, 2)
    payload = bits.to_bytes()
    with open(tmp_path / "v.map", "wb") as f:
        f.write(struct.pack("<8sQQI4x", b"CGMMAP01", SIZE // G, G, zlib.crc32(payload)))
        f.write(payload)
    cm = new()
    assert blocks(cm) == {17, 18}
    cm.close()


def test_state_files_are_private_under_umask_000(new, tmp_path):
    """Map and intent map are 0600 whatever the umask, also files left with
    a lax mode by an older version."""
    import stat
    old = os.umask(0)
    try:
        cm = new()
        cm.mark(0, 1)
        cm.close()
        os.chmod(tmp_path / "v.intent", 0o666)      # as an older version left it
        cm = new()
        cm.checkpoint()
        cm.close()
    finally:
        os.umask(old)
    for name in ("v.map", "v.intent"):
        assert stat.S_IMODE(os.stat(tmp_path / name).st_mode) == 0o600, name
