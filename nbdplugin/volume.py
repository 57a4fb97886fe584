"""One volume served by a slave: I/O, change indicators, gate, PiT image.

nbdkit callbacks in plugin.py hand every request to a ``Volume``; nothing here
knows about nbdkit, so unit tests drive it directly.

Write path order (every write, trim and zero):
    gate.enter -> changes.mark (durable intent) -> pit.preserve -> data -> gate.leave
Marking before preserving and writing is what invariant C1 needs; preserving
before writing is what keeps the PiT image intact; both happen inside the gate
so that a freeze, which waits for requests inside to leave, sees them whole.
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

from . import failpoints
from native.bitmap import Bitmap

from .changemap import ChangeMap
from .gate import Gate

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


def parse_size(text: str) -> int:
    """'64M' -> 67108864.  Suffixes K, M, G, T (powers of 1024), optional 'iB'/'B'."""
    t = text.strip().upper().removesuffix("IB").removesuffix("B")
    mult = 1
    if t and t[-1] in "KMGT":
        mult = 1024 ** ("KMGT".index(t[-1]) + 1)
        t = t[:-1]
    try:
        value = int(t) * mult
    except ValueError:
        raise ValueError(f"not a size: {text!r} (examples: 4096, 64M, 1G)") from None
    if value <= 0:
        raise ValueError(f"size must be positive: {text!r}")
    return value


def _fallocate(fd: int, mode: int, offset: int, length: int) -> bool:
    """fallocate(2); False if the file system does not support ``mode``."""
    if _libc.fallocate(fd, mode, offset, length) == 0:
        return True
    e = ctypes.get_errno()
    if e in (errno.EOPNOTSUPP, errno.ENOSYS, errno.EINVAL):
        return False
    raise OSError(e, os.strerror(e))


class Volume:
    def __init__(self, name: str, path: str, statedir: str, granularity: int,
                 region: int, create_size: int | None = None):
        self.name = name
        self.path = path
        self.granularity = granularity
        try:
            if create_size is not None and not os.path.exists(path):
                fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
                os.ftruncate(fd, create_size)
            else:
                fd = os.open(path, os.O_RDWR)
        except OSError as exc:
            raise VolumeError(f"volume {name}: cannot open {path}: {exc.strerror}") from exc
        self.fd = fd
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
        self.changes = ChangeMap(statedir, name, self.size, granularity, region)
        self.statedir = statedir
        self.pit: Pit | None = None
        # A PiT never outlives its process (its blocks went back to cr at
        # recovery): a store left by a crash is garbage.
        try:
            os.unlink(os.path.join(statedir, f"{name}.preserve"))
        except FileNotFoundError:
            pass

    # ------------------------------------------------------------ host I/O

    def pread(self, buf, offset: int) -> None:
        n = os.preadv(self.fd, [buf], offset)
        if n != len(buf):
            raise OSError(errno.EIO, f"short read at {offset}: {n} of {len(buf)}")

    def _pwrite_all(self, buf, offset: int) -> None:
        n = os.pwrite(self.fd, buf, offset)
        if n == len(buf):
            return
        view = memoryview(buf)
        while n < len(view):     # short writes are legal: finish them
            if n <= 0:
                raise OSError(errno.EIO, f"short write at {offset}")
            view, offset = view[n:], offset + n
            n = os.pwrite(self.fd, view, offset)

    def _modify(self, offset: int, length: int, action, *args) -> None:
        if offset < 0 or length < 0 or offset + length > self.size:
            raise OSError(errno.EINVAL, f"request [{offset}, +{length}) beyond {self.size}")
        self.gate.enter()
        try:
            self.changes.mark(offset, length)
            pit = self.pit
            if pit is not None:
                pit.preserve(offset, length)
            action(*args)
            failpoints.hit("write:after-data")
        finally:
            self.gate.leave()

    def pwrite(self, buf, offset: int, fua: bool = False) -> None:
        self._modify(offset, len(buf), self._pwrite_all, buf, offset)
        if fua:
            self.flush()

    def zero(self, length: int, offset: int, may_trim: bool = False,
             fua: bool = False) -> None:
        self._modify(offset, length, self._zero, length, offset, may_trim)
        if fua:
            self.flush()

    def trim(self, length: int, offset: int, fua: bool = False) -> None:
        self._modify(offset, length, self._trim, length, offset)
        if fua:
            self.flush()

    def flush(self) -> None:
        os.fdatasync(self.fd)

    def _zero(self, length: int, offset: int, may_trim: bool) -> None:
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
            self._pwrite_all(zeros[:n], offset)
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
        for an aborted cut, none after a complete copy) go back into cr."""
        pit, self.pit = self.pit, None
        self.changes.uncut()
        if pit is not None:
            pit.close()

    def close(self) -> None:
        if self.pit is not None:
            self.end_pit()
        self.changes.close()
        os.close(self.fd)

    def status(self) -> dict:
        cr, oos = self.changes.counts()
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
            "pit": self.pit.n if self.pit else None,
            "pit_full": self.pit.full if self.pit else None,
            "preserved_blocks": len(self.pit.index) if self.pit else 0,
        }


class Pit:
    """Point-in-time image n of a volume: the live volume overlaid with the
    pre-cut content of blocks the host overwrote since the cut.

    ``pending`` holds the blocks the copy has still to read: all of them for a
    full copy, the cut's oos blocks for an incremental one.  A host write to a
    pending block that is not saved yet first saves its old content, and
    only then writes; ``lock`` guards ``pending`` and the index.  The copier
    reads live blocks first and consults the index after (see ``read``).

    The store is a file in the state directory holding at most one copy of
    each pending block, so it is bounded by the copy's size; it is deleted
    when the PiT ends.  It needs no fsync: after a crash the PiT is gone
    anyway and its blocks are back in ``cr``.
    """

    def __init__(self, volume: Volume, n: int, pending: Bitmap, full: bool):
        self.volume = volume
        self.n = n
        self.full = full
        self.pending = pending
        self.lock = threading.Lock()
        self.index: dict[int, int] = {}
        self.broken: str | None = None
        self.path = os.path.join(volume.statedir, f"{volume.name}.preserve")
        self.fd: int | None = None      # the store is created by the first save:
        self._end = 0                   # the cut itself stays free of file system work

    def _block_len(self, block: int) -> int:
        g = self.volume.granularity
        return min(g, self.volume.size - block * g)

    def preserve(self, offset: int, length: int) -> None:
        if length <= 0 or self.broken:
            return
        g = self.volume.granularity
        first = offset // g
        count = (offset + length - 1) // g - first + 1
        with self.lock:
            if not self.pending.any(first, count):
                return
            need = [b for b in range(first, first + count)
                    if self.pending.test(b) and b not in self.index]
            try:
                if need and self.fd is None:
                    self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
                for b in need:
                    data = os.pread(self.volume.fd, self._block_len(b), b * g)
                    os.pwrite(self.fd, data, self._end)
                    self.index[b] = self._end
                    self._end += len(data)
            except OSError as exc:
                # The host write goes on; the PiT cannot be completed.
                self.broken = f"preserve store of {self.volume.name}: {exc.strerror}"
                log.error("%s: PiT %d broken", self.broken, self.n)
                return
        if need:
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
        and records it in the index *before* it touches the live block, so a
        block whose live read could have seen new data is in the index by the
        time we look, after the read, and its saved copy (immutable) is laid
        over it.
        """
        g = self.volume.granularity
        view = memoryview(buf)
        n = os.preadv(self.volume.fd, [view], block * g)
        if n != len(buf):
            raise OSError(errno.EIO, f"short read of {self.volume.name} at block {block}")
        with self.lock:
            if not self.index:
                return
            nblocks = -(-len(buf) // g)
            saved = [(b, pos) for b in range(block, block + nblocks)
                     if (pos := self.index.get(b)) is not None]
        for b, pos in saved:
            part = view[(b - block) * g:(b - block) * g + self._block_len(b)]
            os.preadv(self.fd, [part], pos)

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            os.unlink(self.path)
