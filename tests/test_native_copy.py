"""The native copy engine (native/copy.c through native.copyengine) against
real nbdkit targets: it sends the PiT (live volume with the saved blocks laid
over), zero runs as write-zeroes, reports confirm before flushed and nothing
flushed when the flush fails, fails on a dead, failing or silent target
with the target's fault, stops on cancel, runs without the GIL, and keeps
memory flat.  The Copy-level guarantees are the copier suites, run with
``CGMIRROR_COPY_ENGINE=native`` (the default) and ``=python``."""

from __future__ import annotations

import os
import threading
import time

import nbd
import psutil
import pytest

from cgtest import need
from harness import peers
from native import copyengine
from native.bitmap import Bitmap
from nbdplugin.blockstore import BlockStore
from nbdplugin.copier import Copy

G = 64 * 1024
MiB = 1 << 20
HERE = os.path.dirname(os.path.abspath(__file__))

pytestmark = pytest.mark.skipif(not copyengine.AVAILABLE and os.environ.get("CI") != "true",
                                reason="native._copy not built (make ext)")


# ------------------------------------------------------------------ overlay

def test_overlay_records_and_forgets_nothing():
    """An overlay answers what was set, None elsewhere, and checks its range."""
    ov = copyengine.Overlay(10_000)
    assert ov.get(5) is None
    ov.set(5, 4096)
    ov.set(9_999, 0)
    assert (ov.get(5), ov.get(9_999), ov.get(6)) == (4096, 0, None)
    with pytest.raises(ValueError, match="out of range"):
        ov.set(10_000, 0)
    with pytest.raises(ValueError):
        ov.set(1, -1)


def test_overlay_memory_grows_with_saved_spans_only():
    """1 TiB at 4 KiB granularity: a small top array; each saved block's
    4096-block span adds 32 KiB, and only once."""
    ov = copyengine.Overlay((1 << 40) // 4096)
    empty = ov.nbytes()
    assert empty < (1 << 20)
    ov.set(0, 0)
    ov.set(1, 4096)
    assert ov.nbytes() - empty == 4096 * 8


# ------------------------------------------------------------------ engine

class Volume:
    """A volume file with a BlockStore, as a PiT has them."""

    def __init__(self, d: str, size: int, g: int = G):
        self.path, self.size, self.g = os.path.join(d, "vol"), size, g
        self.data = bytearray(os.urandom(size))
        with open(self.path, "wb") as f:
            f.write(self.data)
        self.fd = os.open(self.path, os.O_RDWR)
        self.store = BlockStore(os.path.join(d, "store"), self.fd, g, size)

    def overwrite(self, block: int, byte: int) -> None:
        """A host write that saved the old content first (as Pit.preserve)."""
        self.store.save([block])
        os.pwrite(self.fd, bytes([byte]) * self.g, block * self.g)

    def close(self):
        self.store.close()
        os.close(self.fd)


@pytest.fixture
def vol(tmp_path):
    v = Volume(str(tmp_path), 8 * MiB)
    yield v
    v.close()


def connect(uri: str, n: int = 1) -> list:
    hs = []
    for i in range(n):
        h = nbd.NBD()
        h.set_handle_name(f"test-engine-{i}")
        h.connect_uri(uri)
        hs.append(h)
    return hs


def all_blocks(v: Volume) -> Bitmap:
    bm = Bitmap(-(-v.size // v.g))
    bm.set(0, bm.nbits)
    return bm


def engine(hs, v: Volume, blocks: Bitmap, timeout: float = 10, inflight: int = 4,
           flush_every: int = 64 * MiB):
    return copyengine.Engine(hs, v.fd, v.store.native_index, v.g, v.size, blocks,
                             max_run=MiB // v.g, flush_every=flush_every,
                             inflight=inflight, timeout=timeout)


def shutdown(hs) -> None:
    for h in hs:
        try:
            h.shutdown()
        except nbd.Error:
            pass


def test_engine_sends_the_pit_over_several_connections(vol, run_dir):
    """Blocks overwritten after the cut arrive with their saved (PiT)
    content; every block is confirmed, then flushed, exactly once."""
    need("nbdkit")
    pit = bytes(vol.data)
    for b in (0, 3, 77, 127):
        vol.overwrite(b, 0xEE)
    tgt = peers.nbdkit(os.path.join(run_dir, "t.sock"), "memory", "size=8M")
    hs = connect(tgt.uri, 4)
    e = engine(hs, vol, all_blocks(vol))
    try:
        e.run()
        events = e.take_events()
        assert e.done_bytes() == vol.size
        confirmed, flushed = [], []
        for kind, start, count in events:
            blocks = list(range(start, start + count))
            if kind == copyengine.CONFIRM:
                confirmed += blocks
            else:
                assert set(blocks) <= set(confirmed), "flushed before confirmed"
                flushed += blocks
        assert sorted(confirmed) == sorted(flushed) == list(range(128))
        assert connect(tgt.uri)[0].pread(vol.size, 0) == pit
    finally:
        shutdown(hs)
        e.close()
        tgt.stop()


def test_zero_runs_go_as_write_zeroes(vol, run_dir):
    """An all-zero run is sent as NBD_CMD_WRITE_ZEROES, data as writes."""
    need("nbdkit")
    os.pwrite(vol.fd, bytes(4 * MiB), 0)
    log = os.path.join(run_dir, "t.log")
    tgt = peers.nbdkit(os.path.join(run_dir, "t.sock"), "memory", "size=8M",
                       f"logfile={log}", filters=("log",))
    hs = connect(tgt.uri)
    e = engine(hs, vol, all_blocks(vol))
    try:
        e.run()
    finally:
        shutdown(hs)
        e.close()
        tgt.stop()
    with open(log) as f:
        text = f.read()
    assert text.count(" Zero ") == 4 and text.count(" Write ") == 4, text


def test_nothing_is_flushed_when_the_flush_fails(vol, run_dir):
    """Writes acked but never made durable: confirmed, never flushed, and
    the copy fails with the target's fault."""
    need("nbdkit")
    tgt = peers.nbdkit(os.path.join(run_dir, "t.sock"), "python",
                       os.path.join(HERE, "failing_flush_target.py"), f"size={vol.size}")
    hs = connect(tgt.uri)
    e = engine(hs, vol, all_blocks(vol))
    try:
        with pytest.raises(copyengine.EngineError, match="failed to flush") as ei:
            e.run()
        assert ei.value.fault == "target"
        kinds = {k for k, _, _ in e.take_events()}
        assert kinds == {copyengine.CONFIRM}
    finally:
        shutdown(hs)
        e.close()
        tgt.stop()


def test_a_failing_target_is_the_targets_fault(vol, run_dir):
    """Every write fails: one line naming the write, fault target."""
    need("nbdkit")
    tgt = peers.nbdkit(os.path.join(run_dir, "t.sock"), "memory", "size=8M",
                       "error=EIO", "error-pwrite-rate=1", filters=("error",))
    hs = connect(tgt.uri)
    e = engine(hs, vol, all_blocks(vol))
    try:
        with pytest.raises(copyengine.EngineError, match="failed a write at") as ei:
            e.run()
        assert ei.value.fault == "target"
        assert not e.take_events()
    finally:
        shutdown(hs)
        e.close()
        tgt.stop()


def test_a_silent_target_fails_after_the_timeout(vol, run_dir):
    """A target that answers nothing: the engine gives up after ``timeout``
    (and well before the target would have answered)."""
    need("nbdkit")
    tgt = peers.nbdkit(os.path.join(run_dir, "t.sock"), "memory", "size=8M",
                       "delay-write=60", filters=("delay",))
    hs = connect(tgt.uri)
    e = engine(hs, vol, all_blocks(vol), timeout=1)
    t0 = time.monotonic()
    try:
        with pytest.raises(copyengine.EngineError, match="did not answer for 1 s") as ei:
            e.run()
        assert ei.value.fault == "target"
        assert time.monotonic() - t0 < 30
    finally:
        tgt.stop()
        shutdown(hs)
        e.close()


def test_cancel_stops_a_copy_without_the_gil(vol, run_dir):
    """While the engine waits on a slow target, Python threads run (the GIL
    is released), and a cancel ends it well before the writes would."""
    need("nbdkit")
    tgt = peers.nbdkit(os.path.join(run_dir, "t.sock"), "memory", "size=8M",
                       "delay-write=60", filters=("delay",))
    hs = connect(tgt.uri)
    e = engine(hs, vol, all_blocks(vol), timeout=120)
    t = threading.Thread(target=e.run, daemon=True)
    try:
        t.start()
        spins, end = 0, time.monotonic() + 0.3
        while time.monotonic() < end:      # pure Python while C copies
            spins += 1
        assert t.is_alive() and spins > 1000
        t0 = time.monotonic()
        e.cancel()
        t.join(10)
        assert not t.is_alive() and time.monotonic() - t0 < 5
    finally:
        tgt.stop()
        t.join(10)
        shutdown(hs)
        e.close()


def test_an_ended_pit_fails_the_copy_as_the_sources_fault(vol, run_dir):
    """Reading a PiT whose store was closed is an error, never live data."""
    need("nbdkit")
    vol.store.close()
    tgt = peers.nbdkit(os.path.join(run_dir, "t.sock"), "memory", "size=8M")
    hs = connect(tgt.uri)
    e = engine(hs, vol, all_blocks(vol))
    try:
        with pytest.raises(copyengine.EngineError, match="PiT has ended") as ei:
            e.run()
        assert ei.value.fault == "source"
    finally:
        shutdown(hs)
        e.close()
        tgt.stop()


def test_rss_is_flat_over_200_engine_copies(vol, run_dir):
    """Buffers and events are freed with each engine: 200 copies of 8 MiB
    do not grow the process after warm-up."""
    need("nbdkit")
    tgt = peers.nbdkit(os.path.join(run_dir, "t.sock"), "memory", "size=8M")
    me = psutil.Process()
    rss = []
    try:
        for _ in range(200):
            hs = connect(tgt.uri, 2)
            e = engine(hs, vol, all_blocks(vol))
            try:
                e.run()
                e.take_events()
            finally:
                shutdown(hs)
                e.close()
            rss.append(me.memory_info().rss)
        grown = (rss[-1] - rss[19]) / MiB
        assert grown < 4, f"RSS grew {grown:.1f} MiB over 180 copies"
    finally:
        tgt.stop()


def test_engine_checks_its_arguments(vol):
    """Bad arguments are refused before any C runs."""
    with pytest.raises(ValueError, match="at least one handle"):
        engine([], vol, all_blocks(vol))
    with pytest.raises(ValueError, match="do not cover"):
        engine([nbd.NBD()], vol, Bitmap(3))
    with pytest.raises(TypeError):
        engine([nbd.NBD()], vol, [1, 2])


# ------------------------------------------------------------------ selection

def test_the_copier_refuses_an_unknown_engine(monkeypatch, vol, run_dir):
    """CGMIRROR_COPY_ENGINE=fast: one line naming the choices."""
    need("nbdkit")
    monkeypatch.setenv("CGMIRROR_COPY_ENGINE", "fast")

    class Src:
        name, size, granularity, broken = "v", vol.size, vol.g, None

        def blocks(self):
            return all_blocks(vol)

    tgt = peers.nbdkit(os.path.join(run_dir, "t.sock"), "memory", "size=8M")
    try:
        c = Copy(Src(), tgt.uri, timeout=10)
        c.run()
        assert c.state == "failed" and c.fault == "source"
        assert "CGMIRROR_COPY_ENGINE must be one of python, native, not 'fast'" == c.error
    finally:
        tgt.stop()


def test_engine_refuses_bad_sub_block_records():
    """A record's mask must fit the block's pieces and name a block being
    copied; the sub-block size must divide the granularity."""
    blocks = Bitmap(16)
    blocks.set(3, 1)
    args = (["not used"], 0, None, G, 16 * G, blocks)
    kw = dict(max_run=16, flush_every=1 << 20, inflight=1, timeout=1.0)
    with pytest.raises(ValueError, match="is not 16 bits"):
        copyengine.Engine(*args, **kw, partial={3: 1 << 16}, sub=4096)
    with pytest.raises(ValueError, match="of a block being copied"):
        copyengine.Engine(*args, **kw, partial={4: 1}, sub=4096)
    with pytest.raises(ValueError, match="sub must be a power of two"):
        copyengine.Engine(*args, **kw, partial={3: 1}, sub=3000)
