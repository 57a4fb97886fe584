"""The lazy file system keeps exactly what was synced across a power cut."""

import os

import pytest

from wire.files import fsync_dir, write_atomic
from cgtest import lazyfs_at, need_lazyfs
from lazyfs import LazyFS, mounted


@pytest.fixture
def lazy(run_dir):
    """A LazyFS where every unsynced byte is lost at a cut."""
    with lazyfs_at(os.path.join(run_dir, "lazy")) as fs:
        yield fs


def put(path, data, sync=False):
    with open(path, "wb") as f:
        f.write(data)
        f.flush()
        if sync:
            os.fsync(f.fileno())


def get(path):
    with open(path, "rb") as f:
        return f.read()


def cut(fs):
    fs.power_cut()
    fs.reboot()


def test_unsynced_file_is_lost(lazy):
    """A file written but never synced is gone after a cut."""
    p = os.path.join(lazy.mountpoint, "f")
    put(p, b"data")
    assert get(p) == b"data"          # visible at once
    cut(lazy)
    assert not os.path.exists(p)


def test_synced_file_and_dir_survive(lazy):
    """fsync of the file and of its directory keeps both name and data."""
    p = os.path.join(lazy.mountpoint, "f")
    put(p, b"data", sync=True)
    fsync_dir(lazy.mountpoint)
    cut(lazy)
    assert get(p) == b"data"


def test_synced_file_without_dir_sync_is_lost(lazy):
    """A new file's name is durable only with its directory's fsync."""
    p = os.path.join(lazy.mountpoint, "f")
    put(p, b"data", sync=True)
    cut(lazy)
    assert not os.path.exists(p)


def test_dir_sync_without_file_sync_keeps_an_empty_file(lazy):
    """The name survives, the unsynced data does not."""
    p = os.path.join(lazy.mountpoint, "f")
    put(p, b"data")
    fsync_dir(lazy.mountpoint)
    cut(lazy)
    assert get(p) == b""


def test_rename_without_dir_sync_is_lost(lazy):
    """os.replace is undone by a cut unless the directory was fsync'd."""
    m = lazy.mountpoint
    put(os.path.join(m, "a"), b"old", sync=True)
    put(os.path.join(m, "a.tmp"), b"new", sync=True)
    fsync_dir(m)
    os.replace(os.path.join(m, "a.tmp"), os.path.join(m, "a"))
    assert get(os.path.join(m, "a")) == b"new"
    cut(lazy)
    assert get(os.path.join(m, "a")) == b"old"
    assert get(os.path.join(m, "a.tmp")) == b"new"


def test_rename_with_dir_sync_is_kept(lazy):
    """The same rename followed by a directory fsync survives."""
    m = lazy.mountpoint
    put(os.path.join(m, "a"), b"old", sync=True)
    put(os.path.join(m, "a.tmp"), b"new", sync=True)
    os.replace(os.path.join(m, "a.tmp"), os.path.join(m, "a"))
    fsync_dir(m)
    cut(lazy)
    assert sorted(os.listdir(m)) == ["a"]
    assert get(os.path.join(m, "a")) == b"new"


def test_unlink_without_dir_sync_is_undone(lazy):
    """A removed durable file comes back after a cut; with the sync it stays gone."""
    m = lazy.mountpoint
    p = os.path.join(m, "a")
    put(p, b"kept", sync=True)
    fsync_dir(m)
    os.unlink(p)
    cut(lazy)
    assert get(p) == b"kept"
    os.unlink(p)
    fsync_dir(m)
    cut(lazy)
    assert not os.path.exists(p)


def test_append_to_durable_file_keeps_the_synced_part(lazy):
    """Appends after the last fsync are lost; those before it are kept."""
    m = lazy.mountpoint
    p = os.path.join(m, "log")
    put(p, b"A" * 5000, sync=True)
    fsync_dir(m)
    with open(p, "ab") as f:
        f.write(b"B" * 3000)
        f.flush()
        os.fsync(f.fileno())
        f.write(b"C" * 3000)
        f.flush()
    assert len(get(p)) == 11000
    cut(lazy)
    assert get(p) == b"A" * 5000 + b"B" * 3000


def test_truncate_is_durable_only_when_synced(lazy):
    """A shrink (or growth) by ftruncate follows the same rule as data."""
    m = lazy.mountpoint
    p = os.path.join(m, "t")
    put(p, b"x" * 10000, sync=True)
    fsync_dir(m)
    fd = os.open(p, os.O_RDWR)
    try:
        os.ftruncate(fd, 100)
        assert os.fstat(fd).st_size == 100
    finally:
        os.close(fd)
    cut(lazy)
    assert get(p) == b"x" * 10000
    fd = os.open(p, os.O_RDWR)
    try:
        os.ftruncate(fd, 100)
        os.fdatasync(fd)
    finally:
        os.close(fd)
    cut(lazy)
    assert get(p) == b"x" * 100


def test_in_place_rewrite_without_sync_is_undone(lazy):
    """pwrite over durable data: the old bytes come back unless fdatasync'd."""
    m = lazy.mountpoint
    p = os.path.join(m, "i")
    put(p, b"0" * 8192, sync=True)
    fsync_dir(m)
    fd = os.open(p, os.O_RDWR)
    try:
        os.pwrite(fd, b"1" * 10, 4096)
    finally:
        os.close(fd)
    cut(lazy)
    assert get(p) == b"0" * 8192


def test_write_atomic_is_all_or_nothing_at_every_cut_point(lazy):
    """files.write_atomic leaves the old or the new content, whatever
    operation the cut lands on, and the new one once it returned."""
    m = lazy.mountpoint
    p = os.path.join(m, "state")
    write_atomic(p, b"old" * 1000)
    seen = set()
    for n in range(0, 20):
        lazy.arm(after=n)
        try:
            write_atomic(p, b"new" * 2000)
            returned = True
        except OSError:
            returned = False
        lazy.power_cut()              # the rest of the sequence never ran
        lazy.reboot()
        got = get(p)
        assert got in (b"old" * 1000, b"new" * 2000), n
        if returned:
            assert got == b"new" * 2000, n
        seen.add(got[:3])
        write_atomic(p, b"old" * 1000)
    assert seen == {b"old", b"new"}   # the cut landed before and after


def test_cut_freezes_until_reboot(lazy):
    """Between the cut and the reboot nothing reaches the file system."""
    m = lazy.mountpoint
    lazy.power_cut()
    with pytest.raises(OSError):
        put(os.path.join(m, "late"), b"x", sync=True)
    assert lazy.is_cut()
    lazy.reboot()
    assert os.listdir(m) == []


def test_armed_cut_counts_mutations(lazy):
    """arm(after=N) lets exactly N mutating operations through."""
    m = lazy.mountpoint
    fd = os.open(os.path.join(m, "f"), os.O_RDWR | os.O_CREAT, 0o600)
    try:
        lazy.arm(after=2)
        os.pwrite(fd, b"a", 0)
        os.pwrite(fd, b"b", 1)
        with pytest.raises(OSError):
            os.pwrite(fd, b"c", 2)
    finally:
        os.close(fd)
    assert lazy.wait_cut(timeout=5)


def test_torn_pages_survive_only_in_survive_mode(run_dir):
    """survive=1 keeps every unsynced page (the disk wrote all of them back)."""
    need_lazyfs()
    with LazyFS(os.path.join(run_dir, "torn"), survive=1.0) as fs:
        p = os.path.join(fs.mountpoint, "f")
        put(p, b"x" * 5000)
        fsync_dir(fs.mountpoint)
        cut(fs)
        assert get(p) == b"x" * 5000
    assert not mounted(fs.mountpoint)


def test_unmount_after_a_failing_test_leaves_no_mount(run_dir):
    """An exception inside the with block still unmounts."""
    need_lazyfs()
    fs = LazyFS(os.path.join(run_dir, "m"))
    with pytest.raises(RuntimeError):
        with fs:
            assert mounted(fs.mountpoint)
            raise RuntimeError("test failed")
    assert not mounted(fs.mountpoint)
