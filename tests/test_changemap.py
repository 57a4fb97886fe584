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


# ------------------------------------------------------------ sub-blocks
# In-memory sub-records of cr and oos (block -> mask of dirty 4 KiB pieces;
# a set block without one is dirty whole).

S = 4096


def cover(cm, name="oos"):
    """{block: mask} of what a copy of ``name`` would send (full mask = whole)."""
    bits = cm.maps[name]
    sub = cm.sub_oos if name == "oos" else cm.sub_cr
    full = (1 << (G // S)) - 1
    return {b: sub.get(b, full) for s, n in bits.iter_runs() for b in range(s, s + n)}


def test_partial_writes_keep_their_sub_blocks_and_whole_writes_drop_them(new):
    """A partial write to a clean block records its pieces, another ORs in,
    a write covering the block makes it whole, a partial one then adds nothing."""
    cm = new()
    cm.mark(3 * G + S, 100)                  # piece 1
    cm.mark(3 * G + 3 * S - 1, 2)            # pieces 2 and 3
    assert cm.sub_cr == {3: 0b1110}
    cm.mark(3 * G + S + 10, 10)              # inside piece 1 again: no change
    assert cm.sub_cr == {3: 0b1110}
    cm.mark(3 * G, G)                         # whole
    assert cm.sub_cr == {}
    cm.mark(3 * G + 8 * S, 1)                # dirty whole: stays whole
    assert cm.sub_cr == {} and blocks(cm) == {3}
    cm.close()


def test_a_write_over_several_blocks_records_only_its_partial_ends(new):
    """The end blocks of a long unaligned write get records, the ones it
    covers are whole, and a record inside it is dropped."""
    cm = new()
    cm.mark(6 * G + 3 * S, 1)
    cm.mark(5 * G + 15 * S, 2 * G + 2 * S)  # 5: piece 15, 6, 7: whole, 8: piece 0
    assert cm.sub_cr == {5: 1 << 15, 8: 1}
    assert blocks(cm) == {5, 6, 7, 8}
    cm.close()


def test_the_short_last_block_is_whole_once_its_bytes_are_covered(tmp_path):
    """A volume whose last block is short: a write to its end is whole."""
    cm = ChangeMap(str(tmp_path), "v", SIZE - 100, G, R)
    cm.mark(SIZE - G + S, S)                  # last block, piece 1
    assert cm.sub_cr == {127: 0b10}
    cm.mark(SIZE - G, G - 100)
    assert cm.sub_cr == {}
    cm.close()


def test_pieces_far_apart_keep_their_record_until_nearly_all_are_dirty(new):
    """A record is kept, however far apart its pieces, while they plus one
    request's worth stay under the block (14 of 16 pieces here)."""
    cm = new()
    cm.mark(2 * G, S)
    cm.mark(2 * G + 15 * S, S)                # pieces 0 and 15: kept
    assert cm.sub_cr == {2: 0b1000000000000001}
    cm.mark(3 * G + S, 12 * S)                # pieces 1-12: kept
    cm.mark(3 * G + 14 * S, S)                # 13 pieces: kept
    assert cm.sub_cr[3] == 0b101111111111110
    cm.mark(3 * G, S)                         # 14 pieces: kept
    cm.mark(3 * G + 15 * S, S)                # 15: whole
    assert cm.sub_cr == {2: 0b1000000000000001} and blocks(cm) == {2, 3}
    cm.close()


def test_cut_moves_records_uncut_merges_them_and_whole_wins(new):
    """cut hands cr's records to oos; uncut ORs them back, and a block whole
    on either side comes back whole."""
    cm = new()
    cm.mark(1 * G, 10)                        # 1: piece 0
    cm.mark(2 * G + S, 10)                    # 2: piece 1
    cm.mark(3 * G, G)                         # 3: whole
    cm.cut()
    assert cm.sub_cr == {} and cm.sub_oos == {1: 1, 2: 2}
    cm.mark(1 * G + S, 10)                    # 1: piece 1 in cr
    cm.mark(2 * G, G)                         # 2: whole in cr
    cm.mark(3 * G + S, 10)                    # 3: piece 1 in cr, whole in oos
    cm.mark(4 * G + S, 10)                    # 4: only in cr
    cm.uncut()
    assert cm.sub_cr == {1: 0b11, 4: 2}
    assert blocks(cm) == {1, 2, 3, 4}
    cm.close()


def test_confirm_and_clear_drop_records_and_a_restart_has_none(new):
    """Confirmed blocks lose their records; clear drops all; after a
    restart every set block is whole."""
    cm = new()
    for b in range(10):
        cm.mark(b * G + S, 1)
    cm.cut()
    cm.confirm(0, 4)
    assert sorted(cm.oos_records()) == list(range(4, 10))
    cm.mark(20 * G, 1)
    cm.close()
    again = new()
    assert again.sub_cr == {} and again.sub_oos == {}
    assert blocks(again) == set(range(4, 10)) | {20}
    again.clear()
    assert blocks(again) == set()
    again.close()


def test_a_partial_write_to_a_block_with_a_record_is_recorded(new):
    """mark's lock-free path returns early for a block with a record only
    if the record already holds the write's pieces."""
    cm = new()
    cm.mark(7 * G, 10)
    cm.checkpoint()                           # touched and durable: all set
    cm.mark(7 * G + S, 10)
    assert cm.sub_cr == {7: 0b11}
    cm.mark(7 * G, G)                         # covering write: the slow path
    assert cm.sub_cr == {}
    cm.close()


def test_past_the_cap_partial_writes_count_whole(new, monkeypatch):
    """With the record table full a new partial write marks its block whole."""
    from nbdplugin import changemap
    monkeypatch.setattr(changemap, "SUB_RECORDS_MAX", 3)
    cm = new()
    for b in range(5):
        cm.mark(b * G, 1)
    assert sorted(cm.sub_cr) == [0, 1, 2]
    assert blocks(cm) == set(range(5))
    cm.close()


def test_sub_blocks_off_and_bad_sizes(tmp_path, monkeypatch):
    """sub == granularity keeps no records; a bad $CGMIRROR_SUBBLOCK is one line."""
    cm = ChangeMap(str(tmp_path), "v", SIZE, G, R, sub=G)
    cm.mark(0, 1)
    assert cm.sub_cr == {} and blocks(cm) == {0}
    cm.close()
    monkeypatch.setenv("CGMIRROR_SUBBLOCK", "4k")
    with pytest.raises(ValueError, match="CGMIRROR_SUBBLOCK must be a size in bytes"):
        ChangeMap(str(tmp_path), "w", SIZE, G, R)
    monkeypatch.setenv("CGMIRROR_SUBBLOCK", "1000")
    with pytest.raises(ValueError, match="power of two >= 512"):
        ChangeMap(str(tmp_path), "w", SIZE, G, R)
    monkeypatch.setenv("CGMIRROR_SUBBLOCK", str(1 << 20))
    cm = ChangeMap(str(tmp_path), "w", SIZE, G, R)
    assert cm.sub == G
    cm.close()


def test_records_always_cover_what_was_written(new):
    """Random writes, cuts, confirms and uncuts against a byte-level model:
    what a copy of oos or cr would send always covers every piece written
    since its block was last confirmed, and is exact while no write covered
    a block whole."""
    import random
    rng = random.Random(11)
    cm = new()
    nb = SIZE // G
    model = {"cr": {}, "oos": {}}             # block -> set of pieces written
    cut = False
    for step in range(3000):
        op = rng.random()
        if op < 0.85:
            if rng.random() < 0.9:
                off, n = rng.randrange(SIZE - S) & ~511, rng.choice([512, S, 2 * S, 3 * S])
            else:
                off, n = rng.randrange(SIZE - 3 * G), rng.randrange(1, 3 * G)
            cm.mark(off, n)
            for p in range(off // S, (off + n - 1) // S + 1):
                model["cr"].setdefault(p * S // G, set()).add(p % (G // S))
        elif not cut and op < 0.9:
            cm.cut()
            cut = True
            for b, ps in model["cr"].items():
                model["oos"].setdefault(b, set()).update(ps)
            model["cr"] = {}
        elif cut and op < 0.95:
            start = rng.randrange(nb)
            count = min(rng.randrange(1, 8), nb - start)
            cm.confirm(start, count)
            for b in range(start, start + count):
                model["oos"].pop(b, None)
        elif cut:
            cm.uncut()
            cut = False
            for b, ps in model["oos"].items():
                model["cr"].setdefault(b, set()).update(ps)
            model["oos"] = {}
        for name in ("cr", "oos"):
            got = cover(cm, name)
            assert set(got) == set(model[name])
            for b, ps in model[name].items():
                want = sum(1 << p for p in ps)
                assert got[b] & want == want, (step, name, b)
    cm.close()
