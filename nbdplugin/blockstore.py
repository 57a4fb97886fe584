"""A block store: saves blocks of a volume before they are overwritten and
lays the saved blocks over reads of the live volume.

The PiT uses it to keep a cut's content while the host goes on writing; the
secondary's undo store will use it to keep what a mirror write replaced.

Life and locking: ``lock`` guards the store file, its descriptor and the
index, from the first save to ``close``.  Every use of the descriptor
happens under it and checks ``closed`` first, so a writer that picked up
the store just before it was closed finds it closed and does nothing: no
write into a closed (or reused) descriptor, no store file recreated after
``close`` deleted it.

Two modes:

non-durable  the store file and an in-memory index; nothing is synced.
             For state that dies with the process (a PiT).
durable      before ``save`` returns, the saved data is fdatasynced, then
             its index records are appended to ``PATH.idx`` and that is
             fdatasynced too.  The caller overwrites a block only after
             ``save`` returns, so after a crash every block whose overwrite
             may have reached the disk is listed in the index, with its old
             content durable.  ``BlockStore.reopen`` reads that index back.

For readers in C (the native copy engine), the index is mirrored in
``native_index`` (native.copyengine.Overlay; None where the extension is not
built): each entry is published there, under ``lock``, before ``save``
returns, i.e. before the caller overwrites the block; ``close`` marks it
closed.  native/copy.c gives the ordering argument and the memory cost.

Crash points (durable): before the data sync, the index does not list the
block and the block was not overwritten; between the data sync and the
index sync, a torn or missing last record is skipped at reopen (its block
was not overwritten either); after the index sync, the block is listed.
Each record carries a CRC, so a torn record is told from a good one.
"""

from __future__ import annotations

import errno
import os
import struct
import threading
import zlib
from collections.abc import Iterable

from native import copyengine

from wire.files import fsync_dir, open_private, pwrite_all

# copy_file_range: tried until a file system refuses it with one of these.
_KERNEL_COPY = [hasattr(os, "copy_file_range")]
_NO_KERNEL_COPY = (errno.EXDEV, errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP,
                   errno.EBADF)

_REC = struct.Struct("<QQII")   # block, offset in the store, length, crc32 of the first 20 bytes


class StoreClosed(Exception):
    """The store was closed: its PiT (or undo run) has ended."""


class BlockStore:
    """Saved copies of blocks of the volume open at ``source_fd``."""

    def __init__(self, path: str, source_fd: int, granularity: int, size: int,
                 durable: bool = False):
        self.path = path
        self.index_path = path + ".idx"
        self.source_fd = source_fd
        self.granularity = granularity
        self.size = size
        self.durable = durable
        self.lock = threading.Lock()
        self.index: dict[int, int] = {}   # block -> offset of its copy in the store
        self.closed = False
        self._fd: int | None = None       # created by the first save: a PiT's
        self._idx_fd: int | None = None   # cut stays free of file system work
        self._end = 0
        self.native_index = (copyengine.Overlay(-(-size // granularity))
                        if copyengine.AVAILABLE else None)

    @classmethod
    def reopen(cls, path: str, source_fd: int, granularity: int, size: int) -> BlockStore:
        """Open a durable store left by a crash: its index lists exactly the
        blocks whose ``save`` returned (and maybe some whose save was cut
        after the data sync, whose old content is intact either way)."""
        store = cls(path, source_fd, granularity, size, durable=True)
        try:
            with open(store.index_path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            data = b""
        good = 0
        for pos in range(0, len(data) - _REC.size + 1, _REC.size):
            block, off, length, crc = _REC.unpack_from(data, pos)
            if zlib.crc32(data[pos:pos + 20]) != crc:
                break                     # a torn last record: its save never returned
            store.index[block] = off
            if store.native_index is not None:
                store.native_index.set(block, off)
            store._end = max(store._end, off + length)
            good = pos + _REC.size
        if store.index and not os.path.exists(path):
            # The index is written only after its data: the store was removed.
            raise FileNotFoundError(errno.ENOENT, "block store missing; its index"
                                    f" lists {len(store.index)} blocks", path)
        if os.path.exists(path):
            store._fd = open_private(path)
            store._idx_fd = open_private(store.index_path)
            if store.native_index is not None:
                store.native_index.set_fd(store._fd)
            os.ftruncate(store._idx_fd, good)   # appends go after the last good record
        return store

    def block_len(self, block: int) -> int:
        return min(self.granularity, self.size - block * self.granularity)

    def __contains__(self, block: int) -> bool:
        with self.lock:
            return block in self.index

    def __len__(self) -> int:
        with self.lock:
            return len(self.index)

    def save(self, blocks: Iterable[int]) -> list[int]:
        """Save the current content of each block not saved yet; return those
        saved now.  Raise StoreClosed if the store was closed, OSError if the
        store cannot be written (nothing saved then counts as saved)."""
        with self.lock:
            if self.closed:
                raise StoreClosed(self.path)
            need = [b for b in blocks if b not in self.index]
            if not need:
                return []
            if self._fd is None:
                self._create()
            g = self.granularity
            placed = []                   # (block, offset, length)
            end = self._end
            for b in need:
                n = self.block_len(b)
                self._copy_block(b * g, end, n, b)
                placed.append((b, end, n))
                end += n
            if self.durable:
                # Data before index: a listed block always has its copy.
                os.fdatasync(self._fd)
                pwrite_all(self._idx_fd, b"".join(map(_record, placed)),
                            os.fstat(self._idx_fd).st_size)
                os.fdatasync(self._idx_fd)
            self._end = end
            for b, off, _ in placed:
                self.index[b] = off
                if self.native_index is not None:
                    self.native_index.set(b, off)
            return need

    def _copy_block(self, src_off: int, dst_off: int, n: int, block: int) -> None:
        """Copy ``n`` bytes of the volume at ``src_off`` to the store at
        ``dst_off``.  In the kernel (copy_file_range) where the file systems
        allow: no 64 KiB bytes object per block, and no GIL held while the
        bytes move -- a PiT's save runs in the host writer's request, and the
        secondary's in every first replication write of a block, so on a busy
        volume these copies were the largest Python cost of both.  Else (an
        older kernel, two file systems that refuse it) read and write."""
        if _KERNEL_COPY[0]:
            done = 0
            try:
                while done < n:
                    got = os.copy_file_range(self.source_fd, self._fd, n - done,
                                             src_off + done, dst_off + done)
                    if got <= 0:
                        raise OSError(errno.EIO, f"short read of block {block}")
                    done += got
                return
            except OSError as exc:
                if exc.errno not in _NO_KERNEL_COPY or done:
                    raise
                _KERNEL_COPY[0] = False
        data = os.pread(self.source_fd, n, src_off)
        if len(data) != n:
            raise OSError(errno.EIO, f"short read of block {block}")
        pwrite_all(self._fd, data, dst_off)

    def _create(self) -> None:
        flags = os.O_RDWR | os.O_CREAT | os.O_TRUNC
        self._fd = open_private(self.path, flags)
        if self.native_index is not None:
            self.native_index.set_fd(self._fd)
        if self.durable:
            self._idx_fd = open_private(self.index_path, flags)
            fsync_dir(os.path.dirname(os.path.abspath(self.path)))

    def overlay(self, buf, block: int) -> None:
        """Lay saved copies over ``buf``, which holds live content from ``block``."""
        g = self.granularity
        view = memoryview(buf)
        nblocks = -(-len(view) // g)
        with self.lock:
            if self.closed:
                raise StoreClosed(self.path)
            for b in range(block, block + nblocks):
                pos = self.index.get(b)
                if pos is not None:
                    part = view[(b - block) * g:(b - block) * g + self.block_len(b)]
                    if os.preadv(self._fd, [part], pos) != len(part):
                        raise OSError(errno.EIO, f"short read of saved block {b}")

    def close(self, remove: bool = True) -> None:
        """End the store: close its files and (by default) delete them.
        Idempotent; waits for a save or overlay in progress."""
        with self.lock:
            if self.closed:
                return
            self.closed = True
            if self.native_index is not None:
                self.native_index.close()
            fds = [fd for fd in (self._fd, self._idx_fd) if fd is not None]
            self._fd = self._idx_fd = None
            if remove:
                for p in (self.path, self.index_path):
                    try:
                        os.unlink(p)
                    except FileNotFoundError:
                        pass
        if remove and fds:
            # Freeing the pages of a large store (a group's undo blocks: up
            # to the volume's size) made the secondary's commit take 100-160
            # ms for two 128 MiB volumes on tmpfs (bench-mirror), and the
            # next group waited for it.  The files are unlinked already (nothing can
            # open them), nobody uses these descriptors any more (``closed``
            # is set), so the truncate and the close go to a thread.
            threading.Thread(target=_discard, args=(fds,), name="store-discard",
                             daemon=True).start()
        else:
            for fd in fds:
                os.close(fd)


def _discard(fds: list[int]) -> None:
    """Truncate a removed store's data to nothing and close its descriptors
    (the native overlay's own descriptor then closes on an empty file)."""
    try:
        os.ftruncate(fds[0], 0)
    except OSError:
        pass                   # the data file may be gone already: nothing to free
    for fd in fds:
        os.close(fd)


def _record(entry: tuple[int, int, int]) -> bytes:
    head = _REC.pack(*entry, 0)[:20]
    return head + struct.pack("<I", zlib.crc32(head))

