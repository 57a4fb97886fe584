"""A real slave: nbdkit + plugin.py, driven by libnbd and the control socket."""

import os
import random
import socket
import subprocess
import threading
import time

import nbd
import pytest

from cgtest import need, wait_until
from coordinator import launch
from coordinator.control import ControlError
from nbdplugin.slave import Slave
from nbdplugin.volume import Volume

G = 64 * 1024
MB = 1 << 20


def connect(proc, vol="a"):
    h = nbd.NBD()
    h.set_handle_name(f"test-{vol}")
    h.connect_uri(proc.spec.uri(vol))
    return h


def dirty_blocks(proc, vol="a"):
    with proc.control() as c:
        runs = c.dirty_runs(vol)
    return {b for s, n in runs for b in range(s, s + n)}


def touched(offset, length):
    return set(range(offset // G, (offset + length - 1) // G + 1)) if length else set()


# ------------------------------------------------------------------ data path

def test_random_io_matches_a_shadow_copy_and_marks_exactly(slaves):
    """Random unaligned writes, zeroes and trims read back as a shadow copy does,
    and exactly the touched blocks are marked."""
    size = 8 * MB
    proc = slaves(volumes=[("a", size)])
    h = connect(proc)
    assert h.get_size() == size
    assert h.can_multi_conn() and h.can_fua() and h.can_trim() and h.can_zero()
    shadow = bytearray(size)
    want = set()
    rng = random.Random(7)
    for i in range(300):
        off = rng.randrange(size)
        n = rng.randrange(1, min(size - off, 200_000) + 1)
        kind = rng.random()
        if kind < 0.7:
            data = rng.randbytes(n)
            h.pwrite(data, off, nbd.CMD_FLAG_FUA if i % 10 == 0 else 0)
            shadow[off:off + n] = data
        elif kind < 0.85:
            h.zero(n, off)
            shadow[off:off + n] = bytes(n)
        else:
            h.trim(n, off)   # advisory: content after trim is unspecified
            shadow[off:off + n] = h.pread(n, off)
        want |= touched(off, n)
        if i % 25 == 0:
            o = rng.randrange(size)
            m = rng.randrange(1, min(size - o, 100_000) + 1)
            assert h.pread(m, o) == shadow[o:o + m]
    h.flush()
    assert h.pread(size, 0) == shadow
    assert dirty_blocks(proc) == want
    h.shutdown()


def test_exports_are_listed_and_unknown_export_is_refused(slaves):
    """list_exports names every volume; a wrong export name fails to open."""
    proc = slaves(volumes=[("a", MB), ("b", 2 * MB)])
    h = nbd.NBD()
    h.set_opt_mode(True)
    h.connect_unix(proc.spec.nbd_socket)
    names = []
    h.opt_list(lambda name, desc: names.append(name))
    h.opt_abort()
    assert sorted(names) == ["a", "b"]
    assert connect(proc, "b").get_size() == 2 * MB
    bad = nbd.NBD()
    with pytest.raises(nbd.Error):
        bad.connect_uri(f"nbd+unix:///nope?socket={proc.spec.nbd_socket}")


def test_write_beyond_end_fails(slaves):
    """A request past the end is an error, not a silent truncation."""
    proc = slaves(volumes=[("a", MB)])
    h = connect(proc)
    h.set_strict_mode(0)
    with pytest.raises(nbd.Error):
        h.pwrite(b"x" * 10, MB - 5)


# ------------------------------------------------------------------ gate

@pytest.mark.parametrize("threads", [1, 4])
def test_freeze_holds_writes_but_not_reads_and_thaw_releases(slaves, threads):
    """While frozen a write waits and a read does not; thaw lets the write in.
    With one nbdkit thread per connection, the read flows on another
    connection; with four, even on the connection of the held writes."""
    proc = slaves(volumes=[("a", MB)], threads=threads)
    h = connect(proc)
    reader = h if threads > 1 else connect(proc)
    h.pwrite(b"before", 0)
    with proc.control() as c:
        r = c.call("freeze", n=1, lease_ms=30_000)
        assert r["n"] == 1
        assert c.call("status")["volumes"]["a"]["gate"] == "closed"
        cookies = [h.aio_pwrite(nbd.Buffer.from_bytearray(bytearray(b"after%d" % i)),
                                4096 * (i + 1)) for i in range(3)]
        held = min(3, threads)      # the others queue in nbdkit, behind them
        wait_until(lambda: c.call("status")["volumes"]["a"]["waiting"] == held,
                 what=f"{held} held writes")
        assert reader.pread(6, 0) == b"before"          # reads flow while frozen
        h.poll(0)
        assert not any(h.aio_command_completed(ck) for ck in cookies)
        thawed = c.call("thaw", n=1)
        assert thawed["held_ms"] > 0
        for ck in cookies:
            while not h.aio_command_completed(ck):
                h.poll(1000)
        assert h.pread(6, 4096) == b"after0"
        st = c.call("status")
        assert st["phase"] == "cut" and st["volumes"]["a"]["gate"] == "open"
        c.call("abort", n=1)


def test_freeze_waits_for_writes_inside(tmp_path):
    """freeze answers only after a write already inside the plugin has finished
    (in-process: the write is made slow where nbdkit cannot reach)."""
    vol = Volume("a", str(tmp_path / "a.img"), str(tmp_path), G, MB, create_size=MB)
    slave = Slave({"a": vol}, str(tmp_path))
    real = vol.pwrite_all
    inside, release = threading.Event(), threading.Event()
    done_at = []

    def slow(buf, offset):
        inside.set()
        assert release.wait(30), "the test never released the write"
        real(buf, offset)
        done_at.append(time.monotonic())

    vol.pwrite_all = slow
    t = threading.Thread(target=vol.pwrite, args=(b"slow", 0))
    t.start()
    assert inside.wait(30), "the write never reached the volume"
    answer = []
    f = threading.Thread(target=lambda: answer.append(
        (slave.handle(b'{"op":"freeze","n":1,"lease_ms":10000}'), time.monotonic())))
    f.start()
    # The freeze has closed the gate and waits for the write inside, which
    # only the test can let finish: it cannot have answered yet.
    wait_until(lambda: vol.gate.closed, 30, "the freeze to close the gate")
    assert not answer and vol.gate.inside == 1
    release.set()
    f.join(30)
    t.join(30)
    r, answered = answer[0]
    assert r["ok"], r
    assert done_at and done_at[0] <= answered
    assert r["blocks"] == {"a": 1}           # the write is in cut 1
    assert slave.handle(b'{"op":"thaw","n":1}')["ok"]
    assert slave.handle(b'{"op":"abort","n":1}')["ok"]
    slave.shutdown()


def test_lease_expiry_thaws_and_aborts_the_cut(slaves):
    """A gate held past its lease opens by itself and the cut is aborted."""
    proc = slaves(volumes=[("a", MB)])
    h = connect(proc)
    h.pwrite(b"x", 0)
    with proc.control() as c:
        c.call("freeze", n=4, lease_ms=300)
        t0 = time.monotonic()
        h.pwrite(b"y", G)                 # held until the lease ends
        waited = time.monotonic() - t0
        assert 0.15 < waited < 5
        st = c.call("status")
        assert (st["phase"], st["n"], st["ended"]) == ("idle", 4, "expired")
        with pytest.raises(ControlError) as exc:
            c.call("thaw", n=4)
        assert exc.value.kind == "ended"
        # The aborted cut's changes are back in cr, nothing lost.
        assert dirty_blocks(proc) == {0, 1}
        assert st["volumes"]["a"]["oos_blocks"] == 0
    h.shutdown()


def test_cut_numbers_only_grow_across_restarts(slaves):
    """A restarted slave refuses a cut number it has already used."""
    proc = slaves(volumes=[("a", MB)])
    with proc.control() as c:
        c.call("freeze", n=5, lease_ms=5000)
        c.call("abort", n=5)
    proc.stop()
    proc = slaves.restart(proc.spec)
    with proc.control() as c:
        with pytest.raises(ControlError, match="not above the last cut 5"):
            c.call("freeze", n=5, lease_ms=5000)
        c.call("freeze", n=6, lease_ms=5000)
        c.call("abort", n=6)


# ------------------------------------------------------------------ crashes

def test_kill9_then_restart_keeps_every_change_marked(slaves):
    """After kill -9 every written block is marked; over-marking stays within
    the 1 MiB intent regions written since the last checkpoint."""
    proc = slaves(volumes=[("a", 16 * MB)], region=MB, checkpoint=3600)
    h = connect(proc)
    rng = random.Random(3)
    want = set()
    for _ in range(40):
        off = rng.randrange(0, 4 * MB)        # regions 0..4
        n = rng.randrange(1, 3 * G)
        h.pwrite(b"k" * n, off)
        want |= touched(off, n)
    h.shutdown()
    proc.kill9()
    proc = slaves.restart(proc.spec)
    got = dirty_blocks(proc)
    assert want <= got
    assert max(got) < 5 * (MB // G)


def test_clean_restart_neither_loses_nor_overmarks(slaves):
    """SIGTERM then restart: exactly the written blocks are marked."""
    proc = slaves(volumes=[("a", 16 * MB)], region=MB)
    h = connect(proc)
    h.pwrite(b"a" * 10, 5 * G + 3)
    h.pwrite(b"b" * G, 200 * G)
    h.shutdown()
    proc.stop()
    proc = slaves.restart(proc.spec)
    assert dirty_blocks(proc) == {5, 200}


@pytest.mark.parametrize("point", ["write:after-intent", "write:after-data"])
def test_crash_inside_a_write_keeps_it_marked(slaves, point):
    """Dying between intent and data, or between data and reply, loses no mark."""
    spec = slaves(volumes=[("a", 16 * MB)], region=MB, start=False)
    spec.env = {"CGMIRROR_FAILPOINTS": point}
    proc = slaves.restart(spec)
    h = connect(proc)
    with pytest.raises(nbd.Error):
        h.pwrite(b"z" * 100, 7 * MB + 5)
    proc.popen.wait(timeout=10)
    assert proc.popen.returncode == -9
    spec.env = {}
    proc = slaves.restart(spec)
    assert 7 * MB // G in dirty_blocks(proc)


@pytest.mark.parametrize("point", ["checkpoint:before-rename", "checkpoint:after-map"])
def test_crash_inside_a_checkpoint_keeps_every_mark(slaves, point):
    """Dying while the map is replaced or the intent map shrunk loses no mark."""
    spec = slaves(volumes=[("a", 16 * MB)], region=MB, checkpoint=3600, start=False)
    slaves.restart(spec).stop()      # the state exists from here on
    # Hit 1 is the checkpoint at start-up; hit 2 the one asked for below.
    spec.env = {"CGMIRROR_FAILPOINTS": point + "@2"}
    proc = slaves.restart(spec)
    h = connect(proc)
    h.pwrite(b"1", 0)
    h.pwrite(b"2", 9 * MB)
    with proc.control() as c:
        with pytest.raises(ControlError):
            c.call("checkpoint")
    proc.popen.wait(timeout=10)
    assert proc.popen.returncode == -9
    spec.env = {}
    proc = slaves.restart(spec)
    assert {0, 9 * MB // G} <= dirty_blocks(proc)


# ------------------------------------------------------------------ control

def test_control_channel_refuses_bad_input_and_keeps_serving(slaves):
    """Garbage, unknown ops and keys, wrong types and out-of-order ops each get
    a one-line error; the slave keeps serving data and control."""
    proc = slaves(volumes=[("a", MB)])
    h = connect(proc)
    with proc.control() as c:
        for line, kind in [(b"hello\n", "protocol"), (b'{"op":"launch"}\n', "protocol"),
                           (b'{"op":"status","verbose":true}\n', "protocol"),
                           (b'{"op":"thaw","n":1}\n', "order"),
                           (b'{"op":"freeze","n":1,"lease_ms":100,"volumes":["zz"]}\n',
                            "unknown"),
                           (b'{"op":"dirty","volume":"zz"}\n', "unknown")]:
            with pytest.raises(ControlError) as exc:
                c.call_raw(line)
            assert exc.value.kind == kind
            assert "\n" not in str(exc.value)
        st = c.call("status")
        assert st["phase"] == "idle" and st["n"] == 0
    # A peer that sends half a line and vanishes harms nothing.
    s = socket.socket(socket.AF_UNIX)
    s.connect(proc.spec.control)
    s.sendall(b'{"op":"sta')
    s.close()
    h.pwrite(b"still", 0)
    assert h.pread(5, 0) == b"still"
    h.shutdown()
    with proc.control() as c:
        assert c.call("status")["ok"]


def test_unknown_parameter_and_wrong_size_are_refused(slaves, run_dir):
    """Bad configuration stops nbdkit with a line that says what to fix."""
    spec = slaves(volumes=[("a", MB)], start=False)
    spec.filter_args = ["colour=blue"]
    with pytest.raises(launch.LaunchError, match="unknown parameter: 'colour'"):
        launch.start(spec, timeout=20)
    spec.filter_args = []
    proc = launch.start(spec)
    proc.stop()
    spec.volumes = [("a", spec.volumes[0][1], 2 * MB)]
    with pytest.raises(launch.LaunchError, match="is 1048576 bytes, the configuration says 2097152"):
        launch.start(spec, timeout=20)


def test_second_start_of_a_running_slave_is_refused(slaves):
    """Starting a slave that runs already names its pid."""
    proc = slaves(volumes=[("a", MB)])
    with pytest.raises(launch.LaunchError, match=f"already running as pid {proc.pid}"):
        launch.start(proc.spec)


# ------------------------------------------------------------------ block device

@pytest.fixture
def loop_device(run_dir):
    need("losetup")
    img = os.path.join(run_dir, "loop.img")
    with open(img, "wb") as f:
        f.truncate(8 * MB)
    r = subprocess.run(["losetup", "-f", "--show", img], capture_output=True, text=True)
    if r.returncode != 0:
        msg = f"cannot make a loop device here: {r.stderr.strip()}"
        if os.environ.get("CI") == "true" and os.path.exists("/dev/loop-control"):
            pytest.fail(msg)
        pytest.skip(msg)
    dev = r.stdout.strip()
    try:
        yield dev, img
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_block_device_backing(slaves, loop_device):
    """A real block device serves, marks and persists like a file."""
    dev, img = loop_device
    spec = slaves(volumes=[("a", None)], start=False)
    spec.volumes = [("a", dev, None)]
    proc = slaves.restart(spec)
    h = connect(proc)
    assert h.get_size() == 8 * MB
    h.pwrite(b"blockdev" * 512, 3 * G)
    h.zero(G, 5 * G)
    h.flush()
    assert h.pread(8, 3 * G) == b"blockdev"
    assert dirty_blocks(proc) == {3, 5}
    h.shutdown()
    proc.stop()
    with open(img, "rb") as f:
        f.seek(3 * G)
        assert f.read(8) == b"blockdev"


def test_control_client_survives_a_slave_restart(slaves):
    """A kept connection to a slave that restarted resends its request once."""
    proc = slaves(volumes=[("a", MB)])
    c = proc.control()
    try:
        first = c.call("status")["pid"]
        proc.stop()
        proc = slaves.restart(proc.spec)
        assert c.call("status")["pid"] == proc.pid != first
    finally:
        c.close()


def test_control_client_reports_a_dead_slave(slaves):
    """A slave that is gone is 'unreachable', not a traceback."""
    proc = slaves(volumes=[("a", MB)])
    c = proc.control()
    try:
        c.call("status")
        proc.kill9()
        with pytest.raises(ControlError) as exc:
            c.call("status")
        assert exc.value.kind == "unreachable"
    finally:
        c.close()


def test_dirty_runs_come_in_pages(slaves):
    """A large map is read page by page; the pages add up to every run."""
    proc = slaves(volumes=[("a", 4 * MB)])
    h = connect(proc)
    for b in range(0, 64, 3):
        h.pwrite(b"p", b * G)
    h.shutdown()
    want = [(b, 1) for b in range(0, 64, 3)]
    with proc.control() as c:
        first = c.call("dirty", volume="a", max_runs=5)
        assert [tuple(r) for r in first["runs"]] == want[:5] and first["next"] == 13
        assert c.dirty_runs("a") == want
        last = c.call("dirty", volume="a", start=60, max_runs=5)
        assert last["runs"] == [[60, 1], [63, 1]] and last["next"] is None
        with pytest.raises(ControlError, match="past the 64 blocks"):
            c.call("dirty", volume="a", start=65)
