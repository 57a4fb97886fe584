"""A PiT ending (abort, copy end) while host writes run: the store's life is
under its lock (issue 7, item 8).  Volume driven directly by threads, as the
plugin's worker threads drive it, with the process's descriptor table watched."""

import os
import random
import sys
import threading

import pytest

from nbdplugin.volume import Volume

G = 4096
NBLOCKS = 64
WRITERS = 4


def fd_count():
    return len(os.listdir("/proc/self/fd"))


def test_pit_ends_under_concurrent_writes_without_stray_fds_or_files(tmp_path):
    """Hundreds of cuts ended by abort or by a full read (a copy end) while
    writers run: every PiT read equals the volume at its cut, no descriptor
    leaks, no preserve store is left or recreated, the data is the writers'."""
    state = tmp_path / "state"
    state.mkdir()
    vol = Volume("v", str(tmp_path / "v.img"), str(state), G, 16 * G,
                 create_size=NBLOCKS * G)
    baseline = fd_count()
    stop = threading.Event()
    errors = []
    # Writer w owns blocks w, w+WRITERS, ...: the shadow of each block is known.
    shadow = bytearray(NBLOCKS * G)
    shadow_lock = threading.Lock()

    def writer(w):
        rng = random.Random(w)
        mine = list(range(w, NBLOCKS, WRITERS))
        try:
            while not stop.is_set():
                b = rng.choice(mine)
                data = rng.randbytes(G)
                vol.pwrite(data, b * G)
                with shadow_lock:
                    shadow[b * G:(b + 1) * G] = data
        except Exception as exc:    # surfaced by the main thread
            errors.append(exc)

    old_interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-5)     # interleave the threads as much as we can
    threads = [threading.Thread(target=writer, args=(w,)) for w in range(WRITERS)]
    for t in threads:
        t.start()
    rng = random.Random(99)
    try:
        for n in range(1, 1001):
            assert vol.gate.close(10), "writers did not drain"
            image = bytearray(NBLOCKS * G)
            vol.pread(image, 0)
            vol.start_pit(n, full=True)
            vol.gate.open()
            if rng.random() < 0.5:
                # A copy end: read the whole PiT while the writers go on.
                buf = bytearray(NBLOCKS * G)
                for b in range(0, NBLOCKS, 8):
                    vol.pit.read(memoryview(buf)[b * G:(b + 8) * G], b)
                    vol.pit.confirm(b, 8)
                assert buf == image, f"PiT {n} differs from the volume at its cut"
            else:
                # An abort, timed to land while a writer is inside (between
                # picking up the PiT and saving into its store) as often as
                # we can make it.
                spin = rng.randrange(1, 2000)
                while vol.gate.inside == 0 and spin:
                    spin -= 1
            vol.end_pit()
            assert not errors, errors
        stop.set()
        for t in threads:
            t.join(timeout=30)
        assert not errors, errors
        assert fd_count() == baseline, "descriptors leaked or were closed twice"
        assert sorted(os.listdir(state)) == ["v.intent", "v.map"]
        data = bytearray(NBLOCKS * G)
        vol.pread(data, 0)
        assert data == shadow
    finally:
        stop.set()
        sys.setswitchinterval(old_interval)
        for t in threads:
            t.join(timeout=30)
        vol.close()


def test_a_write_holding_an_ended_pit_saves_nothing_and_a_read_fails(tmp_path):
    """A write that picked up the PiT before it ended finds it ended: nothing
    is saved, no store file is made; a copy still reading it gets an error."""
    vol = Volume("v", str(tmp_path / "v.img"), str(tmp_path), G, 16 * G,
                 create_size=NBLOCKS * G)
    try:
        vol.start_pit(1, full=True)
        pit = vol.pit                   # what a writer in _modify holds
        vol.end_pit()
        before = fd_count()
        pit.preserve(0, 4 * G)
        assert not pit.index and not os.path.exists(tmp_path / "v.preserve")
        assert fd_count() == before
        with pytest.raises(OSError, match="PiT 1 of v has ended"):
            pit.read(bytearray(G), 0)
    finally:
        vol.close()
