"""A slave owns its state and its volumes (issue 7, items 3, 9 and 10):
exclusive locks, private files, one-line configuration errors.  Real nbdkit
slaves throughout."""

import os
import stat
import subprocess

import nbd
import pytest

from cgtest import need
from coordinator import launch

G = 64 * 1024
MB = 1 << 20


def run_refused(cmd, timeout=30):
    """Run a slave that must refuse to start; return its stderr lines.

    A slave that starts anyway is killed and reaped, and the test fails.
    """
    p = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                         stderr=subprocess.PIPE, text=True)
    try:
        _, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        p.communicate()
        pytest.fail(f"the slave started instead of refusing: {cmd}")
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode != 0
    return err.splitlines()


def other_spec(run_dir, name, statedir, volumes):
    """A second slave's spec: its own sockets, the given state dir and volumes."""
    return launch.SlaveSpec(name=name, statedir=statedir,
                            nbd_socket=os.path.join(run_dir, name + ".sock"),
                            control=os.path.join(run_dir, name + ".ctl"),
                            volumes=volumes)


def dirty(proc, vol="a"):
    with proc.control() as c:
        return {b for s, n in c.dirty_runs(vol) for b in range(s, s + n)}


def test_a_second_slave_on_the_same_state_dir_is_refused(slaves, run_dir):
    """A second plugin on a live slave's state directory stops with one line
    naming the holder; the first one's change maps stay whole, and a crash
    of the first afterwards loses nothing."""
    proc = slaves(volumes=[("a", 4 * MB)])
    h = nbd.NBD()
    h.connect_uri(proc.spec.uri("a"))
    h.pwrite(b"1" * 10, 3 * G)
    with proc.control() as c:
        c.call("checkpoint")
    spec2 = other_spec(run_dir, "s2", proc.spec.statedir,
                       [("a", os.path.join(run_dir, "s2-a.img"), 4 * MB)])
    lines = run_refused(spec2.command())
    assert lines == [f"cgmirror: error: state directory {proc.spec.statedir} is in use"
                     f" by pid {proc.pid}: one slave per state directory and per"
                     f" volume; stop the other slave or choose another path"]
    h.pwrite(b"2" * 10, 40 * G)
    assert dirty(proc) == {3, 40}
    h.shutdown()
    proc.kill9()
    again = slaves.restart(proc.spec)
    assert {3, 40} <= dirty(again)


def test_a_volume_served_by_another_slave_is_refused_under_any_spelling(slaves, run_dir):
    """Another slave (its own state directory) naming a served volume by its
    path, a symlink or a hard link is refused with the holder's pid."""
    proc = slaves(volumes=[("a", 2 * MB)])
    path = proc.spec.volumes[0][1]
    link = os.path.join(run_dir, "link.img")
    os.symlink(path, link)
    hard = os.path.join(run_dir, "hard.img")
    os.link(path, hard)
    for i, spelling in enumerate((path, link, hard)):
        spec2 = other_spec(run_dir, f"o{i}", os.path.join(run_dir, f"o{i}"),
                           [("b", spelling, None)])
        lines = run_refused(spec2.command())
        assert len(lines) == 1, lines
        assert lines[0].startswith(f"cgmirror: error: volume b ({spelling}) is in use"
                                   f" by pid {proc.pid}:")
        # Refused before it touched anything: no change map of its own.
        assert not os.path.exists(os.path.join(run_dir, f"o{i}", "b.map"))
    h = nbd.NBD()
    h.connect_uri(proc.spec.uri("a"))
    h.pwrite(b"x", 7 * G)
    h.shutdown()
    assert dirty(proc) == {7}


def test_one_file_named_twice_in_one_slave_is_refused(slaves, run_dir):
    """Two volumes of one slave on the same file would write over each other."""
    need("nbdkit")
    img = os.path.join(run_dir, "one.img")
    spec = other_spec(run_dir, "twice", os.path.join(run_dir, "twice"),
                      [("a", img, MB), ("b", img, None)])
    lines = run_refused(spec.command())
    assert len(lines) == 1 and "volume b" in lines[0] and "this slave" in lines[0], lines


def test_state_is_private_under_umask_000(slaves):
    """Under umask 000 the state directory is 0700 and every file the plugin
    writes there (maps, intent maps, slave.json, the preserve store) 0600."""
    old = os.umask(0)
    try:
        proc = slaves(volumes=[("a", MB)])
    finally:
        os.umask(old)
    h = nbd.NBD()
    h.connect_uri(proc.spec.uri("a"))
    with proc.control() as c:
        c.call("freeze", n=1, lease_ms=5000, full=["a"])
        c.call("thaw", n=1)                      # writes slave.json
        h.pwrite(b"p" * G, 0)                    # saves block 0 in the store
        c.call("checkpoint")
        state = proc.spec.statedir
        assert stat.S_IMODE(os.stat(state).st_mode) == 0o700
        mine = ["a.map", "a.intent", "slave.json", "a.preserve"]
        assert set(mine) <= set(os.listdir(state))
        modes = {f: oct(stat.S_IMODE(os.stat(os.path.join(state, f)).st_mode))
                 for f in mine}
        assert modes == {f: "0o600" for f in mine}
        c.call("abort", n=1)
    h.shutdown()


@pytest.mark.parametrize("args, says", [
    (["bogus=1"], "unknown parameter: 'bogus'"),
    (["volume=a"], "expected volume=NAME:PATH"),
    (["volume=a/b:{d}/v.img"], "NAME made of letters, digits"),
    (["volume=a:{d}/v.img"], "missing parameter: statedir="),
    (["statedir={d}/s", "control={d}/c"], "no volume=NAME:PATH given"),
    (["granularity=3"], "granularity must be a power of two"),
    (["checkpoint=soon"], "checkpoint='soon'"),
    (["statedir={d}/s", "control={d}/c", "volume=a:{d}/v.img", "create=b:1M"],
     "create=b:... names no volume"),
    (["statedir={d}/s", "control={d}/c", "volume=a:{d}/missing.img"],
     "cannot open"),
    (["statedir={d}/s", "control={d}/c", "volume=a:{d}/v.img", "create=a:2M"],
     "the configuration says 2097152"),
])
def test_configuration_errors_are_one_line(run_dir, args, says):
    """Each configuration error: exit status non-zero, and stderr is one
    `cgmirror: error:` line naming the problem, no traceback."""
    need("nbdkit")
    with open(os.path.join(run_dir, "v.img"), "wb") as f:
        f.truncate(MB)
    cmd = ["nbdkit", "-f", "-U", os.path.join(run_dir, "n.sock"), "python",
           launch.PLUGIN] + [a.format(d=run_dir) for a in args]
    lines = run_refused(cmd)
    assert len(lines) == 1, lines
    assert lines[0].startswith("cgmirror: error: ") and says in lines[0], lines


@pytest.fixture
def loop_device(run_dir):
    """A 4 MiB loop device (needs root and loop support; skipped without)."""
    img = os.path.join(run_dir, "loop.img")
    with open(img, "wb") as f:
        f.truncate(4 * MB)
    r = subprocess.run(["losetup", "-f", "--show", img], capture_output=True, text=True)
    if r.returncode != 0:
        pytest.skip(f"no loop device here: {r.stderr.strip()}")
    dev = r.stdout.strip()
    try:
        yield dev
    finally:
        subprocess.run(["losetup", "-d", dev], check=False)


def test_a_served_block_device_is_refused_through_any_node(slaves, run_dir, loop_device):
    """A block device a slave serves is opened O_EXCL: a second slave is
    refused naming the holder, and so is one that reaches the device
    through another device node (which the flock alone would not stop)."""
    spec = slaves(volumes=[], start=False)
    spec.volumes = [("a", loop_device, None)]
    proc = slaves.restart(spec)
    spec2 = other_spec(run_dir, "o1", os.path.join(run_dir, "o1"), [("b", loop_device, None)])
    lines = run_refused(spec2.command())
    assert lines == [f"cgmirror: error: volume b ({loop_device}) is in use by pid"
                     f" {proc.pid}: unmount it or stop the program using it"]
    node = os.path.join(run_dir, "node")
    os.mknod(node, 0o600 | stat.S_IFBLK, os.stat(loop_device).st_rdev)
    spec3 = other_spec(run_dir, "o2", os.path.join(run_dir, "o2"), [("b", node, None)])
    lines = run_refused(spec3.command())
    assert len(lines) == 1 and lines[0].startswith(f"cgmirror: error: volume b ({node})"
                                                   f" is in use by"), lines
    h = nbd.NBD()
    h.connect_uri(proc.spec.uri("a"))
    h.pwrite(b"d" * 10, 2 * G)
    assert h.pread(10, 2 * G) == b"d" * 10
    h.shutdown()
    assert dirty(proc) == {2}
