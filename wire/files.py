"""Files the slave owns: private modes, atomic replacement, exclusive locks.

Everything the plugin writes under its state directory is readable by its
owner only, whatever the umask: the directory is 0700 and every file 0600.
A local user who could write a change map could make a copy skip changed
blocks; one who could read a preserve store reads the volume.  Modes are
set with ``fchmod`` as well as at creation, because ``open``'s mode passes
through the umask and does not apply to a file that already exists.

Locks: a slave holds ``flock(LOCK_EX | LOCK_NB)`` on its state directory
and on each volume for the life of the process, so a second slave on the
same state or the same volume (under any path spelling: a lock belongs to
the inode) is refused instead of overwriting the first one's change maps.
flock rather than POSIX ``fcntl`` locks: those are dropped by any ``close``
of the file in the process and are not inherited across nbdkit's daemonizing
fork.  Rejected: a pidfile as the lock (stale after a crash, racy to check).
"""

from __future__ import annotations

import errno
import fcntl
import os

from . import failpoints

PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600
# The coordinator's session state (history, lock): its owner writes, anyone
# may read it (`cgmirror history` for a monitoring user); nothing secret.
READABLE_DIR = 0o755
READABLE_FILE = 0o644


class LockedError(Exception):
    """Another process holds the lock; the message names it when it can."""


def pwrite_all(fd: int, buf, offset: int) -> None:
    """``os.pwrite`` all of ``buf`` at ``offset``: short writes are legal (a
    signal, a full pipe of a FUSE file system) and are finished here; a write
    that makes no progress is EIO."""
    n = os.pwrite(fd, buf, offset)
    if n == len(buf):
        return
    view = memoryview(buf)
    while n < len(view):
        if n <= 0:
            raise OSError(errno.EIO, f"short write at {offset}")
        view, offset = view[n:], offset + n
        n = os.pwrite(fd, view, offset)


def fsync_dir(path: str) -> None:
    """Make a directory's entries (a create, rename or unlink) durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def make_dirs(path: str, mode: int = PRIVATE_DIR) -> None:
    """Create ``path`` and any missing parents with ``mode`` whatever the
    umask (``os.makedirs`` gives the parents 0777 less the umask: 0777 under
    ``umask 000``).  A directory that already exists, like /tmp, is left
    alone; one made meanwhile by someone else is not ours to change."""
    missing = []
    path = os.path.abspath(path)
    while not os.path.isdir(path):
        missing.append(path)
        path = os.path.dirname(path)
    for d in reversed(missing):
        try:
            os.mkdir(d, mode)
        except FileExistsError:
            continue
        os.chmod(d, mode)


def private_dir(path: str) -> None:
    """Create ``path`` (and parents, see ``make_dirs``) if needed and make it
    0700.  A directory made earlier by someone else's ``makedirs`` under a
    lax umask is tightened too: what counts is its mode while we use it."""
    make_dirs(path)
    os.chmod(path, PRIVATE_DIR)


def open_private(path: str, flags: int = os.O_RDWR | os.O_CREAT,
                 mode: int = PRIVATE_FILE) -> int:
    """``os.open`` a file with ``mode`` (0600 unless told) whatever the umask
    or its old mode."""
    fd = os.open(path, flags | os.O_CLOEXEC, mode)
    try:
        os.fchmod(fd, mode)
    except BaseException:
        os.close(fd)
        raise
    return fd


def write_atomic(path: str, data: bytes, sync: bool = True,
                 failpoint: str | None = None) -> None:
    """Replace ``path`` with ``data``, all or nothing, mode 0600.

    Write a temp file, fdatasync it, rename it over ``path``, fsync the
    directory: after a crash ``path`` holds the old or the new content,
    never a mix.  ``sync=False`` keeps the atomic rename but not the
    durability (for state a crash may forget): it skips only the directory
    fsync.  The temp file's data is synced either way: otherwise the rename
    can reach the disk before the data (any later fsync of the directory,
    e.g. a change-map checkpoint, makes it durable) and a power cut leaves
    an empty file, neither old nor new.  ``failpoint`` is hit between the
    temp file and the rename (crash tests).
    """
    tmp = path + ".tmp"
    fd = open_private(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fdatasync(fd)
    finally:
        os.close(fd)
    if failpoint:
        failpoints.hit(failpoint)
    os.rename(tmp, path)
    if sync:
        fsync_dir(os.path.dirname(os.path.abspath(path)))


def lock_exclusive(fd: int, what: str) -> None:
    """Take a non-blocking exclusive flock on ``fd`` for the process's life.

    Raise LockedError naming the holder's pid when /proc/locks shows it
    (it shows the pid that took the lock: for a slave that daemonized
    afterwards, the pid of nbdkit's parent, so say so).
    """
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise
        pid = lock_holder(fd)
        if pid == os.getpid():
            who = "this slave (it is named twice)"
        elif pid is not None:
            who = f"pid {pid}" + ("" if _alive(pid) else
                                  " (or the process it forked into)")
        else:
            who = "another process"
        raise LockedError(f"{what} is in use by {who}: one slave per state"
                          f" directory and per volume; stop the other slave"
                          f" or choose another path") from None


def lock_holder(fd: int) -> int | None:
    """The pid /proc/locks gives for a FLOCK on the file open at ``fd``."""
    st = os.fstat(fd)
    dev = f"{os.major(st.st_dev):02x}:{os.minor(st.st_dev):02x}:{st.st_ino}"
    try:
        with open("/proc/locks") as f:
            for line in f:
                # "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"
                parts = line.split()
                if len(parts) >= 6 and parts[1] == "FLOCK" and parts[5] == dev:
                    return int(parts[4])
    except (OSError, ValueError):
        pass
    return None


def _alive(pid: int) -> bool:
    return os.path.exists(f"/proc/{pid}")
