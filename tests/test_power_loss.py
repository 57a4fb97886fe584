"""Power loss: the slave's state directory forgets every unsynced write.

The state directory lives on a LazyFS (tests/lazyfs.py); a power cut at a
random moment (or inside a sequence of file operations) drops what was not
fsync'd, and the slave is killed -9 at the same moment.  This is the only
test of the fsync ordering of the change map and the durable block store.

Which disk loses what: the volume stays on a normal directory, so every data
write the slave issued is kept, even one issued after the cut.  That is the
strict reading of invariant C1 ("the bit is durable no later than the data
change can be durable"): a real disk may write any issued block back at any
moment, so the bit must be durable before the write is issued.  A volume
on the lazy file system would lose its unflushed writes too, which only
shrinks the set of blocks that must be marked.
"""

import os
import random
import threading
import time

import pytest

from coordinator import launch
from harness import peers
from nbdplugin.blockstore import BlockStore
from wire.files import fsync_dir, write_atomic
from cgtest import need, soak
from cgtest import lazyfs_at

G = 64 * 1024            # change granularity
REGION = 256 * 1024      # intent region: 4 blocks, so regions come and go
SIZE = 64 << 20          # 1024 blocks, 256 regions
# The rounds of the change-map test: up to MAX_ROUNDS in BUDGET_S of wall
# time, never fewer than MIN_ROUNDS; `make soak` (cgtest.soak) runs 25 in 25 s.
BUDGET_S = soak(10.0, 25.0)
MAX_ROUNDS = soak(10, 25)
MIN_ROUNDS = 3


@pytest.fixture
def lazy_torn(run_dir):
    """A LazyFS where each unsynced page survives a cut with probability 1/2
    (a disk cache writes back in any order): lost, kept and torn writes.
    A test may switch to strict loss with ``set_survive(0)``."""
    with lazyfs_at(os.path.join(run_dir, "lazy"), survive=0.5) as fs:
        yield fs


def _writer(uri, stop, rng_seed, counts):
    """Write random data until ``stop`` or an error (the slave died).

    The writer walks the volume's blocks in a random order, so new regions
    (each needing its intent bit synced) keep coming for the whole round,
    and rewrites some blocks it passed; some writes carry FUA, some are
    followed by a flush, some write zeroes.
    """
    import nbd
    rng = random.Random(rng_seed)
    order = rng.sample(range(SIZE // G), SIZE // G)
    h = nbd.NBD()
    h.set_handle_name(f"writer-{rng_seed}")
    try:
        h.connect_uri(uri)
        for i in range(1 << 30):
            if stop.is_set():
                break
            b = order[i % len(order)] if rng.random() < 0.7 else rng.choice(order[:i + 1])
            off = b * G + rng.randrange(0, G - 4096, 512)
            kind = rng.random()
            if kind < 0.1:
                h.zero(4096, off)
            else:
                flags = nbd.CMD_FLAG_FUA if kind < 0.3 else 0
                h.pwrite(os.urandom(4096), off, flags)
            counts["writes"] += 1
            if rng.random() < 0.1:
                h.flush()
    except nbd.Error:
        pass                      # the power went, the slave with it


def _dirty(proc):
    """Every block the running slave's change map marks."""
    out, start = set(), 0
    with proc.control() as c:
        while start is not None:
            r = c.call("dirty", volume="a", start=start)
            for s, n in r["runs"]:
                out.update(range(s, s + n))
            start = r["next"]
    return out


def _blocks(path):
    with open(path, "rb") as f:
        data = f.read()
    return [data[i:i + G] for i in range(0, SIZE, G)]


def _start_copy(proc, uri, full=False) -> int:
    """Cut the next group and start copying it to ``uri``; return its n."""
    with proc.control() as c:
        n = c.call("status")["n"] + 1
        c.call("freeze", n=n, lease_ms=5000, **({"full": ["a"]} if full else {}))
        c.call("thaw", n=n)
        c.call("copy", n=n, targets={"a": uri})
    return n


def _copy(proc, uri, full=False, timeout=60.0) -> None:
    """A whole copy to ``uri``: afterwards the target is the confirmed copy."""
    n = _start_copy(proc, uri, full)
    deadline = time.monotonic() + timeout
    with proc.control() as c:
        while True:
            st = c.call("status")
            if st["phase"] == "idle" and st["n"] == n:
                assert st["last_copy"]["ok"], st["last_copy"]
                return
            assert time.monotonic() < deadline, f"copy {n} did not end: {st}"
            time.sleep(0.02)


def test_power_cut_never_loses_a_changed_block(lazy_torn, run_dir):
    """After cut + kill -9 + restart, every block of the volume that differs
    from the target (the last confirmed copy) is marked in the recovered map,
    also when the cut lands in the middle of a copy."""
    need("nbdkit")
    fs = lazy_torn
    statedir = os.path.join(fs.mountpoint, "s1")
    os.makedirs(statedir)
    fs.sync()                     # the state dir exists since installation
    spec = launch.SlaveSpec(
        name="s1", statedir=statedir,
        nbd_socket=os.path.join(run_dir, "s1.sock"),
        control=os.path.join(run_dir, "s1.ctl"),
        volumes=[("a", os.path.join(run_dir, "a.img"), SIZE)],
        granularity=G, region=REGION, checkpoint=0.05)
    vol = spec.volumes[0][1]
    rng = random.Random()
    seed = rng.randrange(1 << 32)
    rng.seed(seed)
    rounds = cuts = checked = violations = armed = writes = mid_copy = 0
    target = peers.nbdkit_file(peers.make_image(os.path.join(run_dir, "t.img"), SIZE),
                               os.path.join(run_dir, "t.sock"))
    proc = None
    t0 = time.monotonic()
    try:
        proc = launch.start(spec)
        _copy(proc, target.uri, full=True)
        while rounds < MIN_ROUNDS or (rounds < MAX_ROUNDS
                                      and time.monotonic() - t0 < BUDGET_S):
            # Confirm everything the last round left marked: the baseline is
            # the target, and the map starts (nearly) empty.
            _copy(proc, target.uri)
            # Strict loss in half the rounds (the sharpest test of a missing
            # sync), torn write-back in the others.
            fs.set_survive(rng.choice((0.0, 0.5)))
            stop = threading.Event()
            counts = {"writes": 0}
            threads = [threading.Thread(target=_writer, args=(
                spec.uri("a"), stop, rng.randrange(1 << 30), counts))
                for _ in range(2)]
            for t in threads:
                t.start()
            try:
                time.sleep(rng.uniform(0.02, 0.4))
                if rng.random() < 0.5:
                    # Cut (maybe) in the middle of a copy: bits are being
                    # confirmed and the cut's oos map is being checkpointed.
                    mid_copy += 1
                    _start_copy(proc, target.uri)
                    time.sleep(rng.uniform(0.0, 0.3))
                # A random moment: now, or inside the next few file
                # operations (between a write and its sync, a rename and
                # the directory's fsync, ...).
                if rng.random() < 0.5:
                    armed += 1
                    fs.arm(after=rng.randrange(0, 6))
                    if not fs.wait_cut(timeout=10):
                        fs.power_cut()
                else:
                    fs.power_cut()
                proc.kill9()          # the same moment for the slave
            finally:
                stop.set()
                for t in threads:
                    t.join(30)
            cuts += 1
            writes += counts["writes"]
            fs.reboot()
            # Checkpoints often (races with the writers) or seldom (long
            # windows in which only the intent map speaks for new writes).
            spec.checkpoint = rng.choice((0.05, 0.5))
            proc = launch.start(spec)
            marked = _dirty(proc)
            now, base = _blocks(vol), _blocks(target.image)
            changed = {b for b in range(len(now)) if now[b] != base[b]}
            checked += len(now)
            violations += len(changed - marked)
            assert not changed - marked, (
                f"round {rounds} (seed {seed}): blocks differ from the target but"
                f" are not marked after a power cut: {sorted(changed - marked)[:10]}")
            rounds += 1
    finally:
        if proc is not None:
            proc.stop(timeout=10)
        target.stop()
    print(f"\npower loss (change map): rounds={rounds} cuts={cuts} armed={armed}"
          f" mid_copy={mid_copy} writes={writes} blocks_checked={checked}"
          f" violations={violations} seed={seed}")
    assert rounds >= MIN_ROUNDS and violations == 0


def test_unsynced_atomic_write_is_old_or_new_after_power_loss(lazy_torn):
    """write_atomic(sync=False) (the slave's cut number in slave.json) may be
    forgotten by a power cut, but never leaves an empty file behind, even when
    another state file's write_atomic then fsyncs the same directory."""
    fs = lazy_torn
    fs.set_survive(0.0)
    meta = os.path.join(fs.mountpoint, "slave.json")
    write_atomic(meta, b'{"synced": {"a": "nbd://t"}}')
    write_atomic(meta, b'{"synced": {"a": "nbd://t"}, "last_n": 7}', sync=False)
    write_atomic(os.path.join(fs.mountpoint, "a.map"), b"map")   # fsyncs the dir
    fs.power_cut()
    fs.reboot()
    with open(meta, "rb") as f:
        got = f.read()
    assert got in (b'{"synced": {"a": "nbd://t"}}',
                   b'{"synced": {"a": "nbd://t"}, "last_n": 7}'), got


BS_G = 4096
BS_BLOCKS = 64


def test_block_store_lists_only_what_it_saved(lazy_torn, run_dir):
    """A durable BlockStore cut at random moments reopens with every block
    whose save returned, each with exactly its saved content, and no block
    whose content is not there."""
    fs = lazy_torn
    rng = random.Random()
    seed = rng.randrange(1 << 32)
    rng.seed(seed)
    vol = os.path.join(run_dir, "bs.img")
    rounds = listed = violations = 0
    for rounds in range(1, 41):
        # A fresh volume (on a disk that keeps everything) and a fresh store.
        with open(vol, "wb") as f:
            f.write(os.urandom(BS_G * BS_BLOCKS))
        src = os.open(vol, os.O_RDWR)
        path = os.path.join(fs.mountpoint, f"undo{rounds}")
        try:
            orig = {b: os.pread(src, BS_G, b * BS_G) for b in range(BS_BLOCKS)}
            store = BlockStore(path, src, BS_G, BS_G * BS_BLOCKS, durable=True)
            returned = set()
            fs.arm(after=rng.randrange(0, 60))
            try:
                while True:
                    blocks = rng.sample(range(BS_BLOCKS), rng.randint(1, 3))
                    returned.update(store.save(blocks))
                    # Only now may the caller overwrite them.
                    for b in blocks:
                        os.pwrite(src, os.urandom(BS_G), b * BS_G)
                    if len(returned) == BS_BLOCKS:
                        fs.power_cut()
                        break
            except OSError:
                pass                  # the cut
            assert fs.is_cut()
            store.closed = True       # the process died: no close, no cleanup
            for fd in (store._fd, store._idx_fd):
                if fd is not None:
                    try:
                        os.close(fd)
                    except OSError:
                        pass
            fs.reboot()
            if not returned and not os.path.exists(path + ".idx"):
                continue              # cut before the store existed durably
            again = BlockStore.reopen(path, src, BS_G, BS_G * BS_BLOCKS)
            try:
                got = set(again.index)
                listed += len(got)
                missing = returned - got
                wrong = []
                for b in got:
                    buf = bytearray(BS_G)
                    again.overlay(buf, b)
                    if bytes(buf) != orig[b]:
                        wrong.append(b)
                violations += len(missing) + len(wrong)
                assert not missing, f"seed {seed}: saved but not listed: {sorted(missing)}"
                assert not wrong, f"seed {seed}: listed with wrong content: {sorted(wrong)}"
            finally:
                again.close()
                fsync_dir(fs.mountpoint)
        finally:
            os.close(src)
    print(f"\npower loss (block store): rounds={rounds} blocks_listed={listed}"
          f" violations={violations} seed={seed}")
    assert violations == 0
