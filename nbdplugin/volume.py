"""One volume served by a slave: I/O, change indicators, gate, PiT image.

nbdkit callbacks in plugin.py hand every request to a ``Volume``; nothing here
knows about nbdkit, so unit tests drive it directly.

Write path order (every write, trim and zero):
    gate.enter (catch up if a cut began or ended) -> changes.mark (durable
    intent) -> pit.preserve -> data -> gate.leave
Marking before preserving and writing is what invariant C1 needs; preserving
before writing is what keeps the PiT image intact; both happen inside the gate
so that a freeze, which waits for requests inside to leave, sees them whole.
During a DR test (``keep``, nbdplugin/secondary.py "DR test") the hardened
group's content of a block is saved, durably, before its first test write.

Identity (``problem``): a volume is the file (or device) it opened, and it
must still be the one at its path: a file unlinked or replaced under a
running node would otherwise take writes into an inode nobody will ever open
again while every status says all is well.  ``problem()`` compares the
path's ``stat`` with the open descriptor's (regular file: st_dev, st_ino
and the size; block device: st_rdev).  It is
asked on control ops (status, prepare, commit, checksums): one syscall a
volume and op, never on the write path, which
stays exactly as it was.  Polling it in a thread was rejected: a status
must be true when it is asked, and a group must not harden between polls.
"""

from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import stat
import struct
import threading

from wire import failpoints
from native.bitmap import Bitmap
from native.gate import Gate

from .blockstore import BlockStore, StoreClosed
from .changemap import ChangeMap
from wire.files import LockedError, lock_exclusive, lock_holder, pwrite_all

log = logging.getLogger(__name__)

_libc = ctypes.CDLL(None, use_errno=True)
_libc.fallocate.argtypes = [ctypes.c_int, ctypes.c_int, ctypes.c_long, ctypes.c_long]
FALLOC_FL_KEEP_SIZE = 0x01
FALLOC_FL_PUNCH_HOLE = 0x02
FALLOC_FL_ZERO_RANGE = 0x10
BLKGETSIZE64 = 0x80081272
BLKDISCARD = 0x1277
BLKZEROOUT = 0x127F

ZERO_CHUNK = 1 << 20


class VolumeError(Exception):
    """A volume cannot be opened or used as configured (the operator's fault)."""


def _fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    """fallocate(2); False if the file system does not support ``mode``."""
    if _libc.fallocate(fd, mode, offset, length) == 0:
        return True
    e = ctypes.get_errno()
    if e in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(e, os.strerror(e))


class Volume:
    # What else to do when the volume's file is gone (``problem``).

    def __init__(self, name: str, path: str, statedir: str, granularity: int,
                 region: int, create_size: int | None = None,
                 extra_maps: tuple[str, ...] = ()):
        self.name = name
        self.path = path
        self.granularity = granularity
        fd = self.fd = _open_exclusive(name, path, create_size)
        st = os.fstat(fd)
        self.is_blockdev = stat.S_ISBLK(st.st_mode)
        if self.is_blockdev:
            buf = fcntl.ioctl(fd, BLKGETSIZE64, b"\0" * 8)
            self.size = struct.unpack("Q", buf)[0]
        elif stat.S_ISREG(st.st_mode):
            self.size = st.st_size
        else:
            os.close(fd)
            raise VolumeError(f"volume {name}: {path} is neither a file nor a block device")
        if create_size is not None and self.size != create_size:
            os.close(fd)
            raise VolumeError(
                f"volume {name}: {path} is {self.size} bytes, the configuration"
                f" says {create_size}: fix the size or the path")
        if self.size == 0:
            os.close(fd)
            raise VolumeError(f"volume {name}: {path} is empty")
        self.gate = Gate()
        # The gate generation this volume's owner (slave.py) has caught up
        # with, and how it catches up; a gate outside a core stays at 0.
        self.gen = 0
        self.catch_up = lambda: None
        self.changes = ChangeMap(statedir, name, self.size, granularity, region,
                                 extra_maps)
        self.statedir = statedir
        self.preserve_path = os.path.join(statedir, f"{name}.preserve")
        self.pit: Pit | None = None
        # The DR test's store of the hardened group (None outside a test).
        self.keep: BlockStore | None = None
        self.identity = (st.st_rdev,) if self.is_blockdev else (st.st_dev, st.st_ino)
        # A PiT never outlives its process (its blocks went back to cr at
        # recovery): a store left by a crash is garbage.
        try:
            os.unlink(self.preserve_path)
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------ host I/O

    def pread(self, buf, offset: int) -> None:
        n = os.preadv(self.fd, [buf], offset)
        if n != len(buf):
            raise OSError(errno.EIO, f"short read at {offset}: {n} of {len(buf)}")

    def pwrite_all(self, buf, offset: int) -> None:
        """Write ``buf`` at ``offset`` of the volume, with no change
        indicator, gate or preservation: the caller owns all three."""
        pwrite_all(self.fd, buf, offset)

    def _modify(self, offset: int, length: int, action, *args) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OSError(errno.EINVAL, f"request [{offset}, +{length}) beyond {self.size}")
        gen = self.gate.enter()
        try:
            if gen != self.gen:
                self.catch_up()     # a cut began or ended: take it before marking
            self.changes.mark(offset, length)
            pit = self.pit
            if pit is not None:
                pit.preserve(offset, length)
            keep = self.keep
            if keep is not None and length:
                # Durable before the overwrite; a failed save fails the
                # write: a test write the end of the test could not undo
                # must not reach the volume.
                g = self.granularity
                if keep.save(range(offset // g, (offset + length - 1) // g + 1)):
                    failpoints.hit("keep:after-save")
            action(*args)
            failpoints.hit("write:after-data")
        finally:
            self.gate.leave()

    def pwrite(self, buf, offset: int, fua: bool = False) -> None:
        self._modify(offset, len(buf), self.pwrite_all, buf, offset)
        if fua:
            self.flush()

    def zero(self, length: int, offset: int, may_trim: bool = False,
             fua: bool = False) -> None:
        self._modify(offset, length, self.zero_raw, length, offset, may_trim)
        if fua:
            self.flush()

    def trim(self, length: int, offset: int, fua: bool = False) -> None:
        self._modify(offset, length, self._trim, length, offset)
        if fua:
            self.flush()

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def zero_raw(self, length: int, offset: int, may_trim: bool) -> None:
        """Zero the range on the image itself: no change marked, no gate (the
        caller does both: ``zero``, the secondary's packed batches)."""
        if self.is_blockdev:
            fcntl.ioctl(self.fd, BLKZEROOUT, struct.pack("QQ", offset, length))
            return
        mode = (FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE) if may_trim else FALLOC_FL_ZERO_RANGE
        if _fallocate(self.fd, mode, offset, length):
            return
        zeros = bytes(min(length, ZERO_CHUNK))
        end = offset + length
        while offset < end:
            n = min(len(zeros), end - offset)
            self.pwrite_all(zeros[:n], offset)
            offset += n

    def _trim(self, length: int, offset: int) -> None:
        # Trim is advisory: where the storage cannot punch, the data stays.
        if self.is_blockdev:
            try:
                fcntl.ioctl(self.fd, BLKDISCARD, struct.pack("QQ", offset, length))
            except OSError as exc:
                if exc.errno not in (errno.EOPNOTSUPP, errno.ENOTTY, errno.EINVAL):
                    raise
            return
        _fallocate(self.fd, FALLOC_FL_PUNCH_HOLE | FALLOC_FL_KEEP_SIZE, offset, length)

    # ------------------------------------------------------------ identity

    def problem(self) -> str | None:
        """Why this volume is no longer the one at its path (one line that
        says what happened and what to do), or None if it still is."""
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            what = "was deleted"
        except OSError as exc:
            what = f"cannot be looked up ({exc.strerror})"
        else:
            ident = (st.st_rdev,) if stat.S_ISBLK(st.st_mode) else (st.st_dev, st.st_ino)
            if stat.S_ISBLK(st.st_mode) != self.is_blockdev or ident != self.identity:
                what = "was replaced by another " + ("device" if stat.S_ISBLK(st.st_mode)
                                                     else "file")
            elif not self.is_blockdev and st.st_size != self.size:
                return (f"volume {self.name}: {self.path} is now {st.st_size} bytes, it"
                        f" was {self.size} when this node opened it: restore its size"
                        f" (truncate -s {self.size} {self.path}) or stop the node")
            else:
                return None
        pid = os.getpid()
        if self.is_blockdev:
            rdev = self.identity[0]
            fix = (f"put device {os.major(rdev)}:{os.minor(rdev)} back at {self.path}"
                   f" and restart the node")
        else:
            fix = self.lost_fix(pid)
        return (f"volume {self.name}: {self.path} {what} while this node (pid {pid})"
                f" kept using the one it opened: {fix}")

    def lost_fix(self, pid: int) -> str:
        """What brings back a deleted file (``problem``'s last clause)."""
        return (f"copy it back with `cp /proc/{pid}/fd/{self.fd} {self.path}` before"
                f" stopping the node, then restart the node")

    # ------------------------------------------------------------ cut

    def start_pit(self, n: int, full: bool = False) -> int:
        """Take cut n (gate closed, nothing inside): cr -> oos, preservation on.

        The PiT will be copied whole if ``full``, else only its oos blocks;
        either way exactly the blocks still to be copied are preserved.
        """
        blocks = self.changes.cut()
        if full:
            pending = Bitmap(self.changes.nblocks)
            pending.set(0, self.changes.nblocks)
        else:
            with self.changes.lock:
                pending = self.changes.oos.copy()
        self.pit = Pit(self, n, pending, full)
        return blocks

    def end_pit(self) -> None:
        """Drop the PiT; oos blocks the target has not confirmed (all of them
        for an aborted cut, none after a complete copy) go back into cr.

        Host writes run during this: one that picked up the PiT before it
        was dropped finds it ended (``Pit.close`` waits for a save in
        progress), and its change bit was set before it looked.
        """
        pit, self.pit = self.pit, None
        self.changes.uncut()
        if pit is not None:
            pit.close()

    def close(self) -> None:
        if self.pit is not None:
            self.end_pit()
        if self.keep is not None:
            self.keep.close(remove=False)       # the end of the test needs it
        self.changes.close()
        os.close(self.fd)

    def status(self) -> dict:
        cr, oos = self.changes.counts()
        pit = self.pit
        return {
            "size": self.size,
            "granularity": self.granularity,
            "path": self.path,
            "blockdev": self.is_blockdev,
            "dirty_blocks": self.changes.dirty().count(),
            "cr_blocks": cr,
            "oos_blocks": oos,
            "gate": "closed" if self.gate.closed else "open",
            "inflight": self.gate.inside,
            "waiting": self.gate.waiting,
            "pit": pit.n if pit else None,
            "pit_full": pit.full if pit else None,
            "preserved_blocks": len(pit.store) if pit else 0,
            "kept_blocks": len(self.keep) if self.keep is not None else 0,
            "problem": self.problem(),
        }


class Pit:
    """Point-in-time image n of a volume: the live volume overlaid with the
    pre-cut content of blocks the host overwrote since the cut.

    ``pending`` holds the blocks the copy has still to read: all of them for a
    full copy, the cut's oos blocks for an incremental one.  A host write to a
    pending block that is not saved yet first saves its old content in
    ``store``, and only then writes; ``lock`` guards ``pending`` and
    ``ended`` and is taken before the store's lock.  The copier reads live
    blocks first and consults the store after (see ``read``).

    The store (a non-durable BlockStore in the state directory) holds at
    most one copy of each pending block, so it is bounded by the copy's
    size; it is deleted when the PiT ends.  It needs no fsync: after a crash
    the PiT is gone anyway and its blocks are back in ``cr``.
    """

    def __init__(self, volume: Volume, n: int, pending: Bitmap, full: bool):
        self.volume = volume
        self.n = n
        self.full = full
        self.pending = pending
        self.lock = threading.Lock()
        self.ended = False
        self.broken: str | None = None
        self.store = BlockStore(volume.preserve_path, volume.fd, volume.granularity,
                                volume.size)

    @property
    def index(self) -> dict[int, int]:
        """Saved blocks -> their place in the store (read it under ``store.lock``)."""
        return self.store.index

    def preserve(self, offset: int, length: int) -> None:
        if length <= 0 or self.broken:
            return
        g = self.volume.granularity
        first = offset // g
        count = (offset + length - 1) // g - first + 1
        with self.lock:
            if self.ended or not self.pending.any(first, count):
                return
            try:
                saved = self.store.save(b for b in range(first, first + count)
                                        if self.pending.test(b))
            except OSError as exc:
                # The host write goes on; the PiT cannot be completed.
                self.broken = f"preserve store of {self.volume.name}: {exc.strerror}"
                log.error("%s: PiT %d broken", self.broken, self.n)
                return
        if saved:
            failpoints.hit("preserve:after-save")

    def remaining(self) -> Bitmap:
        with self.lock:
            return self.pending.copy()

    def confirm(self, start: int, count: int) -> None:
        """Blocks [start, start+count) are at the target: no need to keep them."""
        with self.lock:
            self.pending.clear(start, count)

    def read(self, buf, block: int) -> None:
        """Fill ``buf`` (a writable buffer) with PiT content starting at ``block``.

        The live read takes no lock, so several copy streams read at once.  It
        may race with a host write, but a host write saves the old content
        and records it in the store's index *before* it touches the live
        block, so a block whose live read could have seen new data is in the
        index by the time we look, after the read, and its saved copy
        (immutable) is laid over it.
        """
        view = memoryview(buf)
        n = os.preadv(self.volume.fd, [view], block * self.volume.granularity)
        if n != len(buf):
            raise OSError(errno.EIO, f"short read of {self.volume.name} at block {block}")
        try:
            self.store.overlay(view, block)
        except StoreClosed:
            raise OSError(errno.ECANCELED, f"PiT {self.n} of {self.volume.name}"
                          f" has ended") from None

    def close(self) -> None:
        """End the PiT: later saves do nothing, later reads fail, the store
        goes (after any save in progress)."""
        with self.lock:
            self.ended = True
        self.store.close()


def _open_exclusive(name: str, path: str, create_size: int | None) -> int:
    """Open (or create) a volume and lock it for this process's life.

    Any path spelling of a regular file (symlink, hard link, ``..``) reaches
    the same inode, so the flock refuses a second slave whichever it uses.
    A block device is also opened O_EXCL: the kernel then refuses it while
    it is mounted or claimed by another exclusive opener (mkfs, another
    slave) through any device node.  Neither stops a program that opens
    the device or file without asking (dd, a plain ``open``).
    """
    flags = os.O_RDWR | os.O_CLOEXEC
    try:
        if stat.S_ISBLK(os.stat(path).st_mode):
            flags |= os.O_EXCL
    except OSError:
        pass
    try:
        if create_size is not None and not os.path.exists(path):
            fd = os.open(path, flags | os.O_CREAT | os.O_EXCL, 0o600)
            os.ftruncate(fd, create_size)
        else:
            fd = os.open(path, flags)
    except OSError as exc:
        if exc.errno == errno.EBUSY:
            raise VolumeError(f"volume {name} ({path}) is in use by {_device_user(path)}:"
                              f" unmount it or stop the program using it") from None
        raise VolumeError(f"volume {name}: cannot open {path}: {exc.strerror}") from exc
    try:
        lock_exclusive(fd, f"volume {name} ({path})")
    except LockedError as exc:
        os.close(fd)
        raise VolumeError(str(exc)) from None
    return fd


def _device_user(path: str) -> str:
    """Who holds a block device that O_EXCL refused: a slave if its flock says so."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return "the system (mounted) or another exclusive opener"
    try:
        pid = lock_holder(fd)
    finally:
        os.close(fd)
    return f"pid {pid}" if pid else "the system (mounted) or another exclusive opener"
