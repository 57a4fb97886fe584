"""Crash-safe change indicators of one volume (DESIGN.md, invariant C1).

In memory a volume has two bitmaps, one bit per ``granularity`` bytes:
``cr`` (changed since the last cut) and ``oos`` (in the cut being copied, not
yet confirmed at the target).  Their union is "changed since last confirmed".

On disk, in the slave's state directory, two files per volume:

``NAME.map``     a snapshot of ``cr | oos`` taken at the last checkpoint,
                 replaced atomically (write temp, fdatasync, rename, fsync dir).
``NAME.intent``  a coarse write-intent map, one bit per ``region`` bytes
                 (default 4 MiB): regions that may have been written since the
                 snapshot was taken.  Rewritten in place; a torn write is
                 harmless because a bit that must survive is set in both the
                 old and the new content (see below).

After a crash the volume recovers ``cr = map | expand(intent)``.

Durability ordering -- why a power cut cannot leave a changed block unmarked:

1. A write to block b in region r first sets b in ``cr`` and r in ``touched``
   (under ``lock``), then, if r is not in ``durable`` (regions known to be set
   on disk), sets r in the intent file and fdatasyncs it, and only then lets
   the data write proceed.  So the data cannot reach the disk before its
   region's intent bit has.
2. A checkpoint takes ``snap = cr | oos`` and empties ``touched`` atomically
   (under ``lock``), makes ``snap`` durable as ``NAME.map``, and only then
   shrinks the intent map to the regions touched since the snapshot (and,
   to spare busy regions a re-sync, those touched in the interval before).
   Every block dirty now is either in ``snap`` or was marked after it, and
   then its region is in ``touched`` and so stays in the intent map.
   Shrinking first lowers ``durable`` (under ``lock``) to the kept regions,
   so a concurrent writer to a dropped region waits for the intent file and
   re-syncs it.
3. A crash between the steps of 2 leaves the old intent map (a superset) with
   either snapshot, both of which cover what the other lacks.

Clearing bits (copy confirmed, or ``clear``) only happens in memory; the disk
keeps them until the next checkpoint, so a crash over-marks, never loses.
Over-marking after a crash is bounded by the regions written within the last
two checkpoint intervals.  A clean close checkpoints with nothing in flight, which
empties the intent map: nothing over-marked.

Rejected: fsync of the fine bitmap per write (one sync per write: 10-100x
slower); an append-only log of marked blocks (unbounded replay, compaction is
the same checkpoint with more code).
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib

from native.bitmap import Bitmap, mark_write

from . import failpoints

log = logging.getLogger(__name__)

_MAP_MAGIC = b"CGMMAP01"
_INT_MAGIC = b"CGMINT01"
_HDR = struct.Struct("<8sQQI4x")   # magic, nbits, unit bytes, crc32 of payload


class ChangeMapError(Exception):
    """The on-disk change map cannot be used (local state is damaged)."""


def fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class ChangeMap:
    def __init__(self, statedir: str, name: str, size: int, granularity: int,
                 region: int):
        if granularity & (granularity - 1) or region & (region - 1) or region < granularity:
            raise ValueError("granularity and region must be powers of two, region >= granularity")
        self.granularity = granularity
        self.region = region
        self.nblocks = -(-size // granularity)
        self.nregions = -(-size // region)
        self.map_path = os.path.join(statedir, name + ".map")
        self.intent_path = os.path.join(statedir, name + ".intent")
        self.statedir = statedir
        # ``lock`` guards cr, oos, touched and durable.  ``intent_lock``
        # serialises writes of the intent file and is taken before ``lock``.
        self.lock = threading.Lock()
        self.intent_lock = threading.Lock()
        self.cr = Bitmap(self.nblocks)
        self.oos = Bitmap(self.nblocks)
        self.touched = Bitmap(self.nregions)
        self.durable = Bitmap(self.nregions)
        self.recovered_blocks = 0
        self._changed = True
        self._recover()
        fd = os.open(self.intent_path, os.O_RDWR | os.O_CREAT, 0o600)
        self._intent_fd = fd
        self.checkpoint()

    # ------------------------------------------------------------ recovery

    def _read(self, path: str, magic: bytes, nbits: int, unit: int,
              check_crc: bool) -> Bitmap | None:
        try:
            with open(path, "rb") as f:
                data = f.read()
        except FileNotFoundError:
            return None
        if len(data) < _HDR.size:
            raise ChangeMapError(f"{path}: truncated header")
        m, n, u, crc = _HDR.unpack_from(data)
        payload = data[_HDR.size:]
        if m != magic:
            raise ChangeMapError(f"{path}: not a cgmirror change map")
        if n != nbits or u != unit:
            raise ChangeMapError(
                f"{path}: made for {n} x {u}-byte blocks, volume has {nbits} x {unit};"
                f" the volume size or granularity changed: remove the state to"
                f" start with a full copy")
        if len(payload) != 8 * ((nbits + 63) // 64):
            raise ChangeMapError(f"{path}: wrong payload length")
        if check_crc and zlib.crc32(payload) != crc:
            raise ChangeMapError(f"{path}: checksum mismatch")
        return Bitmap.from_bytes(nbits, payload)

    def _recover(self) -> None:
        snap = self._read(self.map_path, _MAP_MAGIC, self.nblocks,
                          self.granularity, True)
        intent = self._read(self.intent_path, _INT_MAGIC, self.nregions,
                            self.region, False)
        if snap is None and intent is not None:
            raise ChangeMapError(f"{self.map_path}: missing while the intent map exists")
        if snap is not None:
            self.cr.or_(snap)
        if intent is not None:
            per = self.region // self.granularity
            for start, length in intent.iter_runs():
                self.cr.set(start * per, min(length * per, self.nblocks - start * per))
            self.durable.or_(intent)
        self.recovered_blocks = self.cr.count()
        if snap is None:
            # First start: the map must exist before the intent map does.
            self._write_map(Bitmap(self.nblocks))
        if intent is None:
            self._write_intent(self.durable)

    # ------------------------------------------------------------ write path

    def mark(self, offset: int, length: int) -> None:
        """Record a change of bytes [offset, offset+length); durable on return."""
        if length <= 0:
            return
        with self.lock:
            self._changed = True
            if mark_write(self.cr, self.touched, self.durable, offset, length,
                          self.granularity, self.region):
                return
        first = offset // self.region
        count = (offset + length - 1) // self.region - first + 1
        with self.intent_lock:
            with self.lock:
                if self.durable.count(first, count) == count:
                    return
                want = self.durable.copy()
            want.set(first, count)
            self._write_intent(want)
            with self.lock:
                self.durable.set(first, count)
        failpoints.hit("write:after-intent")

    def _write_intent(self, bits: Bitmap) -> None:
        payload = bits.to_bytes()
        hdr = _HDR.pack(_INT_MAGIC, self.nregions, self.region, 0)
        fd = getattr(self, "_intent_fd", None)
        if fd is None:
            with open(self.intent_path, "wb") as f:
                f.write(hdr + payload)
                f.flush()
                os.fdatasync(f.fileno())
            fsync_dir(self.statedir)
            return
        os.pwrite(fd, hdr + payload, 0)
        os.fdatasync(fd)

    # ------------------------------------------------------------ checkpoint

    def checkpoint(self, final: bool = False) -> bool:
        """Make the in-memory state durable and shrink the intent map.

        Like md's bitmap, a region leaves the intent map only after a whole
        interval without writes, so a busy region is not re-synced after
        every checkpoint.  ``final`` (clean close, nothing in flight) empties
        it.  Returns False when there was nothing to do.
        """
        with self.intent_lock:
            with self.lock:
                if not (self._changed or final or self.touched.any()
                        or self.durable.any()):
                    return False
                snap = self.cr.copy()
                snap.or_(self.oos)
                recent = self.touched.copy()
                self.touched.clear_all()
                self._changed = False
            self._write_map(snap)
            failpoints.hit("checkpoint:after-map")
            with self.lock:
                keep = self.touched.copy()
                if not final:
                    keep.or_(recent)
                # Lower ``durable`` before the file shrinks; regions in keep
                # that are not durable yet belong to writers waiting for
                # intent_lock, and become durable with this very write.
                drop = self.durable.copy()
                drop.andnot(keep)
                self.durable.andnot(drop)
            self._write_intent(keep)
            with self.lock:
                self.durable.or_(keep)
            return True

    def _write_map(self, snap: Bitmap) -> None:
        payload = snap.to_bytes()
        tmp = self.map_path + ".tmp"
        with open(tmp, "wb") as f:
            f.write(_HDR.pack(_MAP_MAGIC, self.nblocks, self.granularity,
                              zlib.crc32(payload)))
            f.write(payload)
            f.flush()
            os.fdatasync(f.fileno())
        failpoints.hit("checkpoint:before-rename")
        os.rename(tmp, self.map_path)
        fsync_dir(self.statedir)

    def close(self) -> None:
        """Clean shutdown: call with no writes in flight."""
        self.checkpoint(final=True)
        os.close(self._intent_fd)
        self._intent_fd = None

    # ------------------------------------------------------------ cut / copy

    def cut(self) -> int:
        """Move cr into oos (gate closed, nothing in flight); return its count."""
        with self.lock:
            self.oos.or_(self.cr)
            self.cr.clear_all()
            return self.oos.count()

    def uncut(self) -> None:
        """Put every unconfirmed oos bit back into cr (abort or failed copy)."""
        with self.lock:
            self.cr.or_(self.oos)
            self.oos.clear_all()
            self._changed = True

    def confirm(self, start: int, count: int) -> None:
        """The target has blocks [start, start+count) of the cut."""
        with self.lock:
            self.oos.clear(start, count)
            self._changed = True

    def clear(self) -> None:
        """Forget every change (the target is known to equal the volume)."""
        with self.lock:
            self.cr.clear_all()
            self.oos.clear_all()
            self._changed = True

    def dirty(self) -> Bitmap:
        with self.lock:
            d = self.cr.copy()
            d.or_(self.oos)
            return d

    def counts(self) -> tuple[int, int]:
        with self.lock:
            return self.cr.count(), self.oos.count()
