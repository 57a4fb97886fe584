"""Crash-safe change indicators of one volume (DESIGN.md, invariant C1).

In memory a volume has named bitmaps (``maps``), one bit per
``granularity`` bytes: ``cr`` (changed since the last cut) and ``oos`` (in
the cut being copied, not yet confirmed at the target); their union is
"changed since last confirmed".  A caller may name more (``extra``, e.g. the
coming ``tgt`` target indicators): they are saved and recovered with the
others and need no file-name code of their own.

On disk, in the slave's state directory, two files per volume (mode 0600):

``NAME.map``     a snapshot of every named map taken at the last checkpoint,
                 each under its name with its own checksum, replaced
                 atomically (write temp, fdatasync, rename, fsync dir).
``NAME.intent``  a coarse write-intent map, one bit per ``region`` bytes
                 (default 4 MiB): regions that may have been written since the
                 snapshot was taken.  Rewritten in place; a torn write is
                 harmless because a bit that must survive is set in both the
                 old and the new content (see below).

After a crash the volume recovers ``cr = map.cr | map.oos | expand(intent)``
(the PiT died with the process, so its unconfirmed blocks are changes
again); an extra map recovers as saved.  Only host writes go through the
intent map, and only ``cr`` records them: an extra map is changed by
control operations, which call ``checkpoint()`` when the change must be
durable at once.

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

Sub-blocks (in memory only).  A 4 KiB write marks a whole 64 KiB block, and a
copy of the block sends 16x what the host wrote.  So ``cr`` and ``oos`` keep,
beside their bits, *sub-records*: block -> mask of the ``sub``-byte pieces
(default ``SUB`` = 4 KiB, or ``$CGMIRROR_SUBBLOCK``; ``sub`` = granularity:
off) written since the block's bit was set, for blocks whose changes so far
were all smaller than the block and few enough to be worth
sending alone (``keeps_record``).  The rule: a set bit without a record is
a block dirty *whole*.  A partial write to a clean block creates a record,
one to a block with a record ORs its pieces in, one to a block dirty whole
adds nothing; a write covering a block (``op_mark`` included) makes it
whole.
``cut`` moves cr's records into oos and ``uncut`` back (merge: OR, and a
block whole on either side is whole), ``confirm`` and ``clear`` drop them
with the bits.  A copy of an incremental PiT sends of a block with a record
only its dirty pieces (nbdplugin/copier.py says why that is enough).

Nothing of it is persisted: the bits on disk and their recovery are those
above, and after a restart every set block is whole (recovery over-marks
anyway).  Memory: a dict of block -> int, 88-104 bytes a record measured
(tracemalloc), at most ``SUB_RECORDS_MAX`` records a map (~3 MiB); past that
a partial write to a clean block marks it whole, which only costs bytes on
the link.  Rejected:
a fixed array of masks per 4 MiB region allocated on its first partial write
(smaller for dense writes, 128 bytes a region, but per-block merges in Python
over packed ints cost more code, and it needs a cap just the same).
"""

from __future__ import annotations

import logging
import os
import struct
import threading
import zlib

from native.bitmap import Bitmap, mark_write

from wire import failpoints
from wire.files import open_private, write_atomic

log = logging.getLogger(__name__)

# Sub-blocks (see the module doc): default size, smallest allowed, cap.
SUB = 4096
SUB_MIN = 512
SUB_RECORDS_MAX = 1 << 15
# What one more request of a copy costs, in bytes of payload (see
# ``sends_pieces``).  Measured (bench-mirror, 4 KiB random writes over
# 64 KiB blocks, ~5 writes a block a group): at 32 KiB a block hit twice
# far apart went whole and a group sent 3.0-3.6x what the host wrote, at
# 4 KiB 0.7-0.95x; a block dense enough to cost more requests than bytes
# (over ~8 runs of pieces) still goes whole.  On loopback too, once the
# drain packs pieces into batches and confirms adjacent blocks as one
# (native/copy.c), pieces cost less CPU per host write than whole blocks
# (primaries 17 vs 23 us, secondaries 12 vs 13) and served more writes
# (22.1k/s vs 12.4k/s asked ~26k, rpo_p99 5.5 s vs 7.5 s; 2 cores, load
# 8-18).  Over a link the bytes decide: 1 Gbit/s carries the ~500 MiB of
# a whole-block group in ~4 s, its ~90 MiB of pieces in ~0.7 s.
PIECE_REQUEST_BYTES = 4 << 10


def sends_pieces(mask: int, sub: int, length: int) -> bool:
    """Whether a copy sends a block of ``length`` bytes dirty in the pieces
    of ``mask`` as those pieces: only if their bytes plus
    ``PIECE_REQUEST_BYTES`` per request (one per run of pieces; sent whole,
    the block is one request or none, merged into its neighbours' run)
    stay under the block's.  So a dense group is not split into thousands
    of small requests."""
    runs = (mask & ~(mask << 1)).bit_count()
    return mask.bit_count() * sub + runs * PIECE_REQUEST_BYTES < length


def keeps_record(mask: int, sub: int, length: int) -> bool:
    """Whether the map keeps a sub-record: while the pieces' bytes plus one
    request stay under the block -- what ``sends_pieces`` asks of a mask of
    a single run, and any mask has at least one.  Past that no superset
    could be sent as pieces, so the block is whole at once and its later
    writes take mark's lock-free path.  Monotonic (a superset has no fewer
    pieces): which blocks end whole does not depend on the order of the
    writes.  (It once asked this of the pieces' span, first to last: with
    random writes nearly every block hit twice went whole.)"""
    return mask.bit_count() * sub + PIECE_REQUEST_BYTES < length

_MAP_MAGIC_V1 = b"CGMMAP01"      # one map (cr | oos) under the header's crc
_MAP_MAGIC = b"CGMMAP02"         # header's last field: number of named maps
_INT_MAGIC = b"CGMINT01"
_HDR = struct.Struct("<8sQQI4x")   # magic, nbits, unit bytes, crc32 (or count)
_ENTRY = struct.Struct("<16sI4x")  # map name (ASCII, NUL padded), crc32 of payload

# The maps every volume has; recovery folds each into the map named here.
MAPS = ("cr", "oos")
_RECOVER_INTO = {"oos": "cr"}


class ChangeMapError(Exception):
    """The on-disk change map cannot be used (local state is damaged)."""


def sub_size(granularity: int, sub: int | None = None) -> int:
    """The sub-block size for a map of ``granularity``: ``sub``, else
    ``$CGMIRROR_SUBBLOCK``, else ``SUB``, capped at the granularity (which
    turns sub-blocks off).  A bad value is refused in one line."""
    if sub is None:
        raw = os.environ.get("CGMIRROR_SUBBLOCK")
        if raw is None:
            sub = SUB
        else:
            try:
                sub = int(raw)
            except ValueError:
                sub = 0
            if sub <= 0:
                raise ValueError(f"CGMIRROR_SUBBLOCK must be a size in bytes (a power"
                                 f" of two >= {SUB_MIN}), not {raw!r}")
    if sub & (sub - 1) or sub < SUB_MIN:
        raise ValueError(f"the sub-block size must be a power of two >= {SUB_MIN},"
                         f" not {sub}")
    return min(sub, granularity)


class ChangeMap:
    def __init__(self, statedir: str, name: str, size: int, granularity: int,
                 region: int, extra: tuple[str, ...] = (), sub: int | None = None):
        names = MAPS + tuple(extra)
        if len(set(names)) != len(names) or not all(
                n.isascii() and n.isidentifier() and len(n) <= _ENTRY.size - 8
                for n in names):
            raise ValueError(f"map names must be distinct short identifiers: {names}")
        if granularity & (granularity - 1) or region & (region - 1) or region < granularity:
            raise ValueError("granularity and region must be powers of two, region >= granularity")
        self.granularity = granularity
        self.region = region
        self.size = size
        self.sub = sub_size(granularity, sub)
        self.nblocks = -(-size // granularity)
        self.nregions = -(-size // region)
        self.map_path = os.path.join(statedir, name + ".map")
        self.intent_path = os.path.join(statedir, name + ".intent")
        self.statedir = statedir
        # ``lock`` guards cr, oos, their sub-records, touched and durable.
        # ``intent_lock`` serialises writes of the intent file and is taken
        # before ``lock``.
        self.lock = threading.Lock()
        self.intent_lock = threading.Lock()
        self.maps = {n: Bitmap(self.nblocks) for n in names}
        self.cr = self.maps["cr"]
        self.oos = self.maps["oos"]
        self.touched = Bitmap(self.nregions)
        self.durable = Bitmap(self.nregions)
        # For mark's lock-free fast path: byte views of the three bitmaps it
        # reads (bit i is bit i % 8 of byte i // 8, Bitmap's little-endian
        # layout) and the shifts that turn a byte offset into a bit number.
        self._cr_bytes = self.cr.buffer()
        self._touched_bytes = self.touched.buffer()
        self._durable_bytes = self.durable.buffer()
        self._gshift = granularity.bit_length() - 1
        self._rshift = region.bit_length() - 1
        # Sub-records of cr and oos (block -> mask of dirty sub-blocks; see
        # the module doc), under ``lock``; none at all when sub == granularity.
        self._sshift = self.sub.bit_length() - 1
        self._spb = granularity // self.sub
        self.sub_cr: dict[int, int] = {}
        self.sub_oos: dict[int, int] = {}
        self.recovered_blocks = 0
        self._changed = True
        self._recover()
        fd = open_private(self.intent_path)
        self._intent_fd = fd
        self.checkpoint()

    # ------------------------------------------------------------ recovery

    def _geometry(self, path: str, nbits: int, unit: int, want_bits: int,
                  want_unit: int) -> None:
        if nbits != want_bits or unit != want_unit:
            raise ChangeMapError(
                f"{path}: made for {nbits} x {unit}-byte blocks, volume has"
                f" {want_bits} x {want_unit}; the volume size or granularity"
                f" changed: remove the state to start with a full copy")

    def _read_intent(self) -> Bitmap | None:
        path = self.intent_path
        data = _load(path)
        if data is None:
            return None
        m, n, u, _ = _HDR.unpack_from(data)
        if m != _INT_MAGIC:
            raise ChangeMapError(f"{path}: not a cgmirror intent map")
        self._geometry(path, n, u, self.nregions, self.region)
        if len(data) != _HDR.size + _payload_len(n):
            raise ChangeMapError(f"{path}: wrong payload length")
        return Bitmap.from_bytes(n, data[_HDR.size:])

    def _read_maps(self) -> dict[str, Bitmap] | None:
        """The named maps of the last checkpoint (None: no map file yet)."""
        path = self.map_path
        data = _load(path)
        if data is None:
            return None
        m, n, u, field = _HDR.unpack_from(data)
        pos = _HDR.size
        if m == _MAP_MAGIC_V1:          # written before maps had names
            entries = [("cr", field)]
        elif m == _MAP_MAGIC:
            if len(data) < pos + field * _ENTRY.size:
                raise ChangeMapError(f"{path}: truncated map table")
            entries = []
            for _ in range(field):
                raw, crc = _ENTRY.unpack_from(data, pos)
                entries.append((raw.rstrip(b"\0").decode("ascii", "replace"), crc))
                pos += _ENTRY.size
        else:
            raise ChangeMapError(f"{path}: not a cgmirror change map")
        self._geometry(path, n, u, self.nblocks, self.granularity)
        plen = _payload_len(n)
        if len(data) != pos + plen * len(entries):
            raise ChangeMapError(f"{path}: wrong payload length")
        maps = {}
        for name, crc in entries:
            payload = data[pos:pos + plen]
            pos += plen
            if zlib.crc32(payload) != crc:
                raise ChangeMapError(f"{path}: checksum mismatch in map {name!r}")
            if name not in self.maps:
                # Dropping it would lose what it records: refuse instead.
                raise ChangeMapError(
                    f"{path}: holds a map {name!r} this slave does not keep"
                    f" (it keeps {', '.join(self.maps)}): run the cgmirror"
                    f" version that wrote it")
            maps[name] = Bitmap.from_bytes(n, payload)
        return maps

    def _recover(self) -> None:
        saved = self._read_maps()
        intent = self._read_intent()
        if saved is None and intent is not None:
            raise ChangeMapError(f"{self.map_path}: missing while the intent map exists")
        for name, bits in (saved or {}).items():
            self.maps[_RECOVER_INTO.get(name, name)].or_(bits)
        if intent is not None:
            per = self.region // self.granularity
            for start, length in intent.iter_runs():
                self.cr.set(start * per, min(length * per, self.nblocks - start * per))
            self.durable.or_(intent)
        self.recovered_blocks = self.cr.count()
        if saved is None:
            # First start: the map must exist before the intent map does.
            self._write_map(self._snapshot())
        if intent is None:
            self._write_intent(self.durable)

    # ------------------------------------------------------------ write path

    def mark(self, offset: int, length: int) -> None:
        """Record a change of bytes [offset, offset+length); durable on return."""
        if length <= 0:
            return
        # Fast path (most writes of a busy volume): a write inside one block
        # whose bit is set in cr and whose region is set in touched and in
        # durable would change nothing below, so it returns without the
        # lock or a C call.  Read without the lock, each bit is a single
        # byte load, and in this order it is safe: cr's bit stays set until
        # a cut, and no cut runs during a mark (a host write is inside the
        # gate the cut closes; op_mark holds the slave's lock, as the cut
        # does); touched's bit is cleared only by a checkpoint, which keeps that
        # region in the intent map for one more interval; a durable bit
        # read as set means the region was in the intent file at that
        # moment, and any checkpoint that later drops it writes a map
        # holding our cr bit first.  Last the block's sub-record (a dict
        # read is atomic under the GIL): none means dirty whole, one that
        # holds the write's sub-blocks already covers it.  While we are
        # inside the gate cr's dirty bytes of the block only grow (a record
        # gains sub-blocks or becomes whole; only a cut, a confirm of oos or
        # a clear shrink them), and a record is made before its block's bit
        # is set (see _note), so a set bit with no record is never a
        # record about to appear.  Anything else takes the locked path.
        b = offset >> self._gshift
        if 0 <= offset and b == (offset + length - 1) >> self._gshift and b < self.nblocks:
            r = offset >> self._rshift
            if (self._cr_bytes[b >> 3] >> (b & 7) & 1
                    and self._touched_bytes[r >> 3] >> (r & 7) & 1
                    and self._durable_bytes[r >> 3] >> (r & 7) & 1):
                m = self.sub_cr.get(b)
                if m is None:
                    return
                base = b << self._gshift
                lo = (offset - base) >> self._sshift
                want = ((2 << (((offset + length - 1 - base) >> self._sshift) - lo)) - 1) << lo
                if m & want == want:
                    return
        with self.lock:
            self._changed = True
            if self._spb > 1:
                self._note(offset, length)
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

    # ------------------------------------------------------------ sub-blocks

    def _mask(self, lo: int, hi: int) -> int:
        """The sub-block bits of bytes [lo, hi) of a block (0 <= lo < hi <= g)."""
        s = self._sshift
        return ((2 << (((hi - 1) >> s) - (lo >> s))) - 1) << (lo >> s)

    def _len(self, b: int) -> int:
        """Bytes of block ``b`` (fewer for a short last block)."""
        return min(self.granularity, self.size - (b << self._gshift))

    def _note(self, offset: int, length: int) -> None:
        """Update cr's sub-records for a write of [offset, offset+length)
        (``lock`` held).  Called *before* the write's bits are set, so that
        mark's lock-free path never sees a set bit whose record is still to
        come."""
        sub, g = self.sub_cr, self.granularity
        end = offset + length
        first, last = offset >> self._gshift, (end - 1) >> self._gshift
        if last - first > 1 and sub:       # blocks inside the write: whole
            if last - first - 1 <= len(sub):
                for b in range(first + 1, last):
                    sub.pop(b, None)
            else:
                for b in [b for b in sub if first < b < last]:
                    del sub[b]
        for b in (first,) if first == last else (first, last):
            base = b << self._gshift
            top = min(g, self.size - base)
            lo, hi = max(offset - base, 0), min(end - base, top)
            m = sub.get(b)
            if m is None:
                if self.cr.test(b) or len(sub) >= SUB_RECORDS_MAX:
                    continue            # dirty whole already, or no room: whole
                m = 0
            m |= self._mask(lo, hi)
            if not keeps_record(m, self.sub, top):
                sub.pop(b, None)        # not worth pieces (or all of them): whole
            else:
                sub[b] = m

    def _merged(self, dst: Bitmap, dst_sub: dict, src: Bitmap, src_sub: dict) -> dict:
        """The sub-records of ``dst | src`` (``lock`` held, bits not yet
        merged): OR where both have one, whole where either side is."""
        if not src.any():
            return dst_sub
        if not dst.any():
            return src_sub
        out = {}
        for b, m in src_sub.items():
            if dst.test(b):
                d = dst_sub.get(b)
                if d is None:
                    continue            # whole in dst
                m |= d
                if not keeps_record(m, self.sub, self._len(b)):
                    continue            # whole
            out[b] = m
        for b, d in dst_sub.items():
            if b not in src_sub and not src.test(b):
                out[b] = d              # else merged above, or whole in src
        for b in list(out)[SUB_RECORDS_MAX:]:
            del out[b]                  # over the cap: whole (its bit is set)
        return out

    def oos_records(self) -> dict[int, int]:
        """oos's sub-records (block -> mask of dirty ``sub``-byte pieces; a
        set oos block without one is dirty whole), for the copy of the cut."""
        with self.lock:
            return dict(self.sub_oos)

    def _write_intent(self, bits: Bitmap) -> None:
        payload = bits.to_bytes()
        hdr = _HDR.pack(_INT_MAGIC, self.nregions, self.region, 0)
        fd = getattr(self, "_intent_fd", None)
        if fd is None:
            write_atomic(self.intent_path, hdr + payload)
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
                snap = self._snapshot()
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

    def clear_all(self) -> int:
        """Forget every map (the volume's file was replaced: its blocks are
        unknown to the pair and only a full copy joins it), durably: the map
        file empty, the intent map empty.  Returns the blocks forgotten."""
        with self.intent_lock:
            with self.lock:
                n = sum(bits.count() for bits in self.maps.values())
                for bits in self.maps.values():
                    bits.clear_all()
                self.sub_cr.clear()
                self.sub_oos.clear()
                self._changed = True
        self.checkpoint(final=True)
        return n

    def _snapshot(self) -> dict[str, Bitmap]:
        """A copy of every named map (caller holds ``lock``, or is alone)."""
        return {name: bits.copy() for name, bits in self.maps.items()}

    def _write_map(self, snap: dict[str, Bitmap]) -> None:
        payloads = {name: bits.to_bytes() for name, bits in snap.items()}
        table = b"".join(_ENTRY.pack(name.encode("ascii"), zlib.crc32(p))
                         for name, p in payloads.items())
        head = _HDR.pack(_MAP_MAGIC, self.nblocks, self.granularity, len(payloads))
        write_atomic(self.map_path, head + table + b"".join(payloads.values()),
                     failpoint="checkpoint:before-rename")

    def close(self) -> None:
        """Clean shutdown: call with no writes in flight."""
        self.checkpoint(final=True)
        os.close(self._intent_fd)
        self._intent_fd = None

    # ------------------------------------------------------------ cut / copy

    def cut(self) -> int:
        """Move cr into oos (gate closed, nothing in flight); return its count."""
        with self.lock:
            self.sub_oos = self._merged(self.oos, self.sub_oos, self.cr, self.sub_cr)
            self.sub_cr = {}
            self.oos.or_(self.cr)
            self.cr.clear_all()
            return self.oos.count()

    def uncut(self) -> None:
        """Put every unconfirmed oos bit back into cr (abort or failed copy)."""
        with self.lock:
            self.sub_cr = self._merged(self.cr, self.sub_cr, self.oos, self.sub_oos)
            self.sub_oos = {}
            self.cr.or_(self.oos)
            self.oos.clear_all()
            self._changed = True

    def confirm(self, start: int, count: int) -> None:
        """The target has blocks [start, start+count) of the cut."""
        with self.lock:
            self.oos.clear(start, count)
            sub = self.sub_oos
            if count <= len(sub):
                for b in range(start, start + count):
                    sub.pop(b, None)
            else:
                for b in [b for b in sub if start <= b < start + count]:
                    del sub[b]
            self._changed = True

    def clear(self) -> None:
        """Forget every change (the target is known to equal the volume)."""
        with self.lock:
            self.cr.clear_all()
            self.oos.clear_all()
            self.sub_cr, self.sub_oos = {}, {}
            self._changed = True

    def dirty(self) -> Bitmap:
        with self.lock:
            d = self.cr.copy()
            d.or_(self.oos)
            return d

    def counts(self) -> tuple[int, int]:
        with self.lock:
            return self.cr.count(), self.oos.count()


def _payload_len(nbits: int) -> int:
    return 8 * ((nbits + 63) // 64)


def _load(path: str) -> bytes | None:
    """A state file's bytes (None if absent); too short for a header is damage."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except FileNotFoundError:
        return None
    if len(data) < _HDR.size:
        raise ChangeMapError(f"{path}: truncated header")
    return data
