"""Point-in-time preservation and the slave's copier, against a real nbdkit
file target (the coordinator's tests drive the same through the CLI)."""

import os
import subprocess
import time

import nbd
import pytest

from cgtest import need
from harness import peers
from coordinator.control import ControlError

G = 64 * 1024
MB = 1 << 20


@pytest.fixture
def target(run_dir):
    """Factory: an `nbdkit file` target of a given size on a unix socket."""
    need("nbdkit")
    servers = []

    def make(name, size):
        img = peers.make_image(os.path.join(run_dir, f"t-{name}.img"), size)
        srv = peers.nbdkit_file(img, os.path.join(run_dir, f"t-{name}.sock"))
        servers.append(srv)
        return srv.uri, img

    try:
        yield make
    finally:
        for srv in servers:
            srv.stop()


def wait_copy(c, n, timeout=30):
    deadline = time.monotonic() + timeout
    while True:
        st = c.call("status")
        if st["phase"] == "idle" and st["n"] == n:
            return st
        assert time.monotonic() < deadline, f"copy {n} did not end: {st}"
        time.sleep(0.02)


def read_file(path):
    with open(path, "rb") as f:
        return f.read()


def test_copy_holds_the_pit_while_the_host_overwrites(slaves, target):
    """Blocks overwritten after the cut reach the target with their cut content."""
    size = 4 * MB
    proc = slaves(volumes=[("a", size)])
    h = nbd.NBD()
    h.connect_uri(proc.spec.uri("a"))
    pit = bytes(range(256)) * (size // 256)
    h.pwrite(pit, 0)
    uri, img = target("a", size)
    with proc.control() as c:
        c.call("freeze", n=1, lease_ms=5000, full=["a"])
        c.call("thaw", n=1)
        # Overwrite every other block before the copy starts: all are preserved.
        for off in range(0, size, 2 * G):
            h.pwrite(b"\xee" * (G - 100), off + 50)
        assert c.call("status")["volumes"]["a"]["preserved_blocks"] == size // (2 * G)
        r = c.call("copy", n=1, targets={"a": uri})
        assert r["modes"] == {"a": "full"}
        st = wait_copy(c, 1)
        assert st["ended"] == "done" and st["last_copy"]["ok"]
        assert read_file(img) == pit
        # The preserve store is gone; the overwrites are the next cut's changes.
        assert not os.path.exists(os.path.join(proc.spec.statedir, "a.preserve"))
        live = h.pread(size, 0)
        c.call("freeze", n=2, lease_ms=5000)
        c.call("thaw", n=2)
        r = c.call("copy", n=2, targets={"a": uri})
        assert r["modes"] == {"a": "incremental"}
        assert r["bytes"]["a"] == size // 2         # just the overwritten blocks
        wait_copy(c, 2)
        assert read_file(img) == live
    h.shutdown()


def test_copy_to_a_too_small_target_fails_and_loses_nothing(slaves, target):
    """A target smaller than the volume fails the copy; the cut's changes stay marked."""
    proc = slaves(volumes=[("a", 2 * MB)])
    h = nbd.NBD()
    h.connect_uri(proc.spec.uri("a"))
    h.pwrite(b"x" * 10, 3 * G)
    uri, _ = target("small", MB)
    with proc.control() as c:
        c.call("freeze", n=1, lease_ms=5000, full=["a"])
        c.call("thaw", n=1)
        c.call("copy", n=1, targets={"a": uri})
        st = wait_copy(c, 1)
        assert st["ended"] == "failed"
        err = st["last_copy"]["volumes"]["a"]["error"]
        assert "too small" in err and "1048576" in err
        assert c.call("dirty", volume="a")["runs"] == [[3, 1]]
        assert st["volumes"]["a"]["oos_blocks"] == 0
    h.shutdown()


def test_copy_to_an_unreachable_target_fails_clearly(slaves, run_dir):
    """An NBD URI nobody serves is a one-line copy error."""
    proc = slaves(volumes=[("a", MB)])
    with proc.control() as c:
        c.call("freeze", n=1, lease_ms=5000, full=["a"])
        c.call("thaw", n=1)
        sock = os.path.join(run_dir, "nobody.sock")
        c.call("copy", n=1, targets={"a": f"nbd+unix://?socket={sock}"})
        st = wait_copy(c, 1)
        assert "cannot reach target" in st["last_copy"]["volumes"]["a"]["error"]


def test_full_copy_holds_blocks_clean_at_the_cut(slaves, target):
    """A full copy preserves every block written after the cut, not only the
    changed ones: the target gets the cut's content everywhere."""
    proc = slaves(volumes=[("a", MB)])
    h = nbd.NBD()
    h.connect_uri(proc.spec.uri("a"))
    h.pwrite(b"A" * G, 0)                       # changed before the cut
    uri, img = target("a", MB)
    with proc.control() as c:
        c.call("freeze", n=1, lease_ms=5000, full=["a"])
        c.call("thaw", n=1)
        h.pwrite(b"B" * G, 0)
        h.pwrite(b"N" * G, 10 * G)              # clean at the cut
        c.call("copy", n=1, targets={"a": uri})
        assert wait_copy(c, 1)["ended"] == "done"
    data = read_file(img)
    assert data[:G] == b"A" * G
    assert data[10 * G:11 * G] == bytes(G)
    h.shutdown()


def test_copy_mode_must_match_the_cut(slaves, target):
    """A cut taken for an incremental copy cannot be copied whole, and says how."""
    proc = slaves(volumes=[("a", MB)])
    uri, _ = target("a", MB)
    with proc.control() as c:
        c.call("freeze", n=1, lease_ms=5000)
        c.call("thaw", n=1)
        with pytest.raises(ControlError, match="freeze's 'full'") as exc:
            c.call("copy", n=1, targets={"a": uri}, mode="full")
        assert exc.value.kind == "mode"
        assert c.call("status")["phase"] == "cut"
        c.call("abort", n=1)


def test_incremental_without_a_baseline_is_refused(slaves, target):
    """Asking for an incremental copy to a target that never had a full one fails
    before anything is sent."""
    proc = slaves(volumes=[("a", MB)])
    uri, _ = target("a", MB)
    with proc.control() as c:
        c.call("freeze", n=1, lease_ms=5000)
        c.call("thaw", n=1)
        with pytest.raises(Exception, match="no completed copy"):
            c.call("copy", n=1, targets={"a": uri}, mode="incremental")
        assert c.call("status")["phase"] == "cut"
        c.call("abort", n=1)


@pytest.fixture
def small_fs(run_dir):
    """A 320 KiB tmpfs: room for the change maps and four preserved blocks."""
    path = os.path.join(run_dir, "small")
    os.mkdir(path)
    r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=320k", "tmpfs", path],
                       capture_output=True, text=True)
    if r.returncode != 0:
        msg = f"cannot mount a small tmpfs here: {r.stderr.strip()}"
        if os.environ.get("CI") == "true":
            pytest.fail(msg)
        pytest.skip(msg)
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", path], check=False)


def test_full_state_disk_breaks_the_pit_not_the_host(slaves, target, small_fs):
    """When the preserve store runs out of space, host writes still succeed, the
    copy fails with a clear error, nothing is lost, and the next copy works."""
    size = 2 * MB
    spec = slaves(volumes=[("a", size)], start=False)
    spec.statedir = small_fs
    proc = slaves.restart(spec)
    h = nbd.NBD()
    h.connect_uri(spec.uri("a"))
    h.pwrite(b"\x01" * size, 0)
    uri, img = target("a", size)
    with proc.control() as c:
        c.call("freeze", n=1, lease_ms=5000)
        c.call("thaw", n=1)
        for b in range(16):                     # more than the store can hold
            h.pwrite(b"\x02" * G, b * G)
        assert h.pread(G, 15 * G) == b"\x02" * G
        with pytest.raises(ControlError, match="No space left") as exc:
            c.call("copy", n=1, targets={"a": uri})
        assert exc.value.kind == "broken"
        c.call("abort", n=1)
        st = c.call("status")
        assert st["volumes"]["a"]["dirty_blocks"] == size // G
        c.call("freeze", n=2, lease_ms=5000, full=["a"])
        c.call("thaw", n=2)
        c.call("copy", n=2, targets={"a": uri})
        assert wait_copy(c, 2)["ended"] == "done"
        assert read_file(img) == h.pread(size, 0)
    h.shutdown()


def test_copy_to_a_silent_target_times_out(slaves, run_dir):
    """A target that accepts the connection but never speaks NBD fails the copy
    within its timeout, with a line saying so."""
    import socket
    proc = slaves(volumes=[("a", MB)])
    path = os.path.join(run_dir, "silent.sock")
    silent = socket.socket(socket.AF_UNIX)
    silent.bind(path)
    silent.listen(4)
    try:
        with proc.control() as c:
            c.call("freeze", n=1, lease_ms=5000, full=["a"])
            c.call("thaw", n=1)
            t0 = time.monotonic()
            c.call("copy", n=1, targets={"a": f"nbd+unix://?socket={path}"},
                   timeout_ms=1000)
            st = wait_copy(c, 1)
            assert time.monotonic() - t0 < 10
            err = st["last_copy"]["volumes"]["a"]["error"]
            assert "no answer within 1 s" in err
            assert st["last_copy"]["volumes"]["a"]["fault"] == "target"
    finally:
        silent.close()


def test_blocks_stay_marked_until_the_target_flushes(slaves, run_dir):
    """Writes the target acknowledged but could not flush are not confirmed:
    the copy fails and every block is still marked, to be sent again."""
    proc = slaves(volumes=[("a", 2 * MB)])
    h = nbd.NBD()
    h.connect_uri(proc.spec.uri("a"))
    h.pwrite(b"f" * (2 * MB), 0)
    h.shutdown()
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)),
                          "failing_flush_target.py")
    srv = peers.nbdkit(os.path.join(run_dir, "t-flush.sock"), "python", script,
                       f"size={2 * MB}")
    try:
        with proc.control() as c:
            c.call("freeze", n=1, lease_ms=5000, full=["a"])
            c.call("thaw", n=1)
            c.call("copy", n=1, targets={"a": srv.uri})
            st = wait_copy(c, 1)
            assert st["ended"] == "failed"
            assert "failed to flush" in st["last_copy"]["volumes"]["a"]["error"]
            assert st["volumes"]["a"]["dirty_blocks"] == 2 * MB // G
    finally:
        srv.stop()
