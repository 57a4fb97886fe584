"""A dependent-write workload across volumes and slaves, and its checker.

What the workload is
--------------------
``W`` writer threads write 4 KiB *records* to ``V`` volumes (typically
2 slaves x 2 volumes, ordered so that neighbours live on different slaves).
Writer ``w``'s records form a chain ``(w, 0), (w, 1), ...``; record ``(w, i)``

- is issued only after ``(w, i-1)`` was acknowledged (``pwrite`` returned), and
  lands on volume ``(i + w) mod V`` -- never the volume of ``(w, i-1)``, and,
  with the slave-interleaved volume order, on another slave;
- also depends on the newest acknowledged record of one other writer
  (``(w + 1 + i) mod W``), read after that writer's ``pwrite`` returned;
- goes to slot ``(i // V) mod S`` of writer ``w`` on its volume, so each slot is
  rewritten every ``V * S`` records: blocks that the cut holds are overwritten
  while they are copied, which is what exercises PiT preservation.

Slot ``s`` of writer ``w`` sits at ``s * stride + w * 4096``: the writers share
each granule-sized block, so a write by one writer to a block another
writer's record in the cut lives in must preserve it too.

A record carries a header (magic, run id, writer, volume, slot, seq, its
dependencies) and a BLAKE2b digest of the whole 4 KiB, so a torn, misplaced or
foreign record is recognised as such.

What the checker proves
-----------------------
In any dependent-write-consistent image (DESIGN.md, "Why the cut is
consistent") the records of writer ``w`` that the image holds are a prefix
``0..c_w`` of its chain, and every dependency of a held record is held.  The
checker takes ``c_w`` = the highest seq of writer ``w`` found anywhere, and
then requires, for every slot, exactly the record that the prefix ``0..c_w``
leaves there (the newest ``i <= c_w`` mapped to that slot, or an empty slot);
an older record there means a record the head depends on is missing or was
reverted.  It then requires every dependency ``(w', j)`` of every held record
to satisfy ``j <= c_w'``.  Together: the held set is closed under the
dependency relation, at the version each slot must show.  The first
violation is reported in one line naming volume, offset, and both records.

The records overwritten inside the prefix cannot be seen (nor can they be in
any real image); that is the only thing the checker does not cover.

Used by tests/test_consistency.py, tests/test_targets.py and bench/.  The
target servers they copy to come from harness/peers.py.
"""

from __future__ import annotations

import hashlib
import mmap
import os
import stat
import struct
import threading
import time
from dataclasses import dataclass, field

RECORD = 4096
MAGIC = b"CGMWREC1"
DIGEST = 16
MAX_DEPS = 4
# magic, run, writer, volume, slot, ndeps, seq
_HEAD = struct.Struct("<8sQIIIIq")
_DEP = struct.Struct("<Iq")          # writer, seq
_BODY_AT = _HEAD.size + MAX_DEPS * _DEP.size


class ConsistencyError(AssertionError):
    """An image set is not dependent-write consistent (message: first violation)."""


# ------------------------------------------------------------------ layout

@dataclass(frozen=True)
class Layout:
    """Where every record goes.

    ``names``: one label per volume, in workload order (e.g. "s1/a", "s2/a",
    "s1/b", "s2/b": neighbours on different slaves).  ``size``: bytes per
    volume.  ``slots``: slots per writer per volume.
    """

    names: tuple[str, ...]
    size: int
    writers: int = 4
    slots: int = 64
    granularity: int = 64 * 1024

    def __post_init__(self):
        if len(self.names) < 2:
            raise ValueError("the workload needs at least 2 volumes")
        if self.writers < 1 or self.slots < 1:
            raise ValueError("writers and slots must be positive")
        if self.stride < self.writers * RECORD:
            raise ValueError(f"{self.slots} slots of {self.writers} writers do not fit"
                             f" in {self.size} bytes")

    @property
    def volumes(self) -> int:
        return len(self.names)

    @property
    def stride(self) -> int:
        # Slots start on granule boundaries, so every slot is its own block.
        return (self.size // self.slots) // self.granularity * self.granularity \
            or self.size // self.slots // RECORD * RECORD

    @property
    def period(self) -> int:
        """Records of one writer between two writes of the same slot."""
        return self.volumes * self.slots

    def place(self, w: int, i: int) -> tuple[int, int]:
        """(volume index, slot) of record (w, i)."""
        return (i + w) % self.volumes, (i // self.volumes) % self.slots

    def offset(self, w: int, slot: int) -> int:
        return slot * self.stride + w * RECORD

    def slots_of(self, w: int):
        """Every (volume index, slot) writer ``w`` ever writes."""
        for v in range(self.volumes):
            for s in range(self.slots):
                yield v, s

    def expected(self, w: int, head: int) -> dict[tuple[int, int], int]:
        """{(volume, slot): seq} that the prefix 0..head of writer w leaves;
        slots missing from the dict must be empty."""
        out = {}
        for i in range(max(0, head - self.period + 1), head + 1):
            out[self.place(w, i)] = i
        return out


def two_by_two(size: int = 16 << 20, writers: int = 4, slots: int = 64,
               granularity: int = 64 * 1024) -> Layout:
    """The standard layout: slaves s1, s2 with volumes a, b each."""
    return Layout(("s1/a", "s2/a", "s1/b", "s2/b"), size, writers, slots, granularity)


# ------------------------------------------------------------------ records

@dataclass(frozen=True)
class Record:
    run: int
    writer: int
    volume: int
    slot: int
    seq: int
    deps: tuple[tuple[int, int], ...]


def encode(rec: Record) -> bytes:
    if len(rec.deps) > MAX_DEPS:
        raise ValueError(f"at most {MAX_DEPS} dependencies")
    head = _HEAD.pack(MAGIC, rec.run, rec.writer, rec.volume, rec.slot,
                      len(rec.deps), rec.seq)
    deps = b"".join(_DEP.pack(w, j) for w, j in rec.deps)
    deps += bytes(MAX_DEPS * _DEP.size - len(deps))
    fill = hashlib.blake2b(head + deps, digest_size=64).digest()
    body_len = RECORD - _BODY_AT - DIGEST
    body = (fill * (body_len // 64 + 1))[:body_len]
    data = head + deps + body
    return data + hashlib.blake2b(data, digest_size=DIGEST).digest()


def decode(data: bytes) -> Record | None | str:
    """A Record; None for an empty (all-zero) slot; a string saying what is
    wrong with anything else."""
    if len(data) != RECORD:
        return f"short slot ({len(data)} bytes)"
    if data[:8] != MAGIC:
        if not any(data):
            return None
        return "not a record (no magic, not zero)"
    body, digest = data[:-DIGEST], data[-DIGEST:]
    if hashlib.blake2b(body, digest_size=DIGEST).digest() != digest:
        return "record with a bad digest (torn or damaged)"
    _, run, w, v, slot, ndeps, seq = _HEAD.unpack_from(data)
    if ndeps > MAX_DEPS:
        return "record with too many dependencies"
    deps = tuple(_DEP.unpack_from(data, _HEAD.size + k * _DEP.size) for k in range(ndeps))
    return Record(run, w, v, slot, seq, deps)


def describe(rec: Record | None) -> str:
    return "empty" if rec is None else f"record ({rec.writer},{rec.seq})"


# ------------------------------------------------------------------ checker

@dataclass
class Report:
    """What the checker found.  ``heads[w]`` = c_w (-1: writer absent)."""

    layout: Layout
    run: int | None
    heads: list[int]
    records: int
    violations: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.violations

    def summary(self) -> str:
        state = "consistent" if self.ok else f"INCONSISTENT ({len(self.violations)} violations)"
        return (f"{state}: {self.records} records, heads {self.heads}"
                + ("" if self.ok else f"; first: {self.violations[0]}"))

    def raise_if_bad(self) -> "Report":
        if not self.ok:
            raise ConsistencyError(self.summary())
        return self


def check(readers, layout: Layout, run: int | None = None) -> Report:
    """Check an image set: ``readers[v](offset, length) -> bytes`` for each
    volume in layout order.  ``run``: the run id to expect (None: whatever the
    image holds, but only one)."""
    if len(readers) != layout.volumes:
        raise ValueError(f"{len(readers)} images for {layout.volumes} volumes")
    found: dict[tuple[int, int, int], Record | None] = {}   # (w, v, slot)
    bad: list[str] = []
    runs: set[int] = set()
    for w in range(layout.writers):
        for v, s in layout.slots_of(w):
            off = layout.offset(w, s)
            got = decode(readers[v](off, RECORD))
            where = f"{layout.names[v]} offset {off} (writer {w} slot {s})"
            if isinstance(got, str):
                bad.append(f"{where}: {got}")
                got = None
            elif got is not None:
                if (got.writer, got.volume, got.slot) != (w, v, s):
                    bad.append(f"{where}: holds record ({got.writer},{got.seq}) that"
                               f" belongs at volume {got.volume} slot {got.slot}")
                    got = None
                else:
                    runs.add(got.run)
            found[(w, v, s)] = got
    if run is None and runs:
        run = max(runs)
        if len(runs) > 1:
            bad.append(f"records of several runs: {sorted(runs)}")
    elif runs - {run}:
        bad.append(f"records of a foreign run: {sorted(runs - {run})} (expected {run})")
    heads = [-1] * layout.writers
    nrec = 0
    for (w, _, _), rec in found.items():
        if rec is not None and rec.run == run:
            nrec += 1
            heads[w] = max(heads[w], rec.seq)
    # 1. Each writer shows exactly what the prefix 0..head leaves in each slot.
    for w in range(layout.writers):
        want = layout.expected(w, heads[w])
        for v, s in layout.slots_of(w):
            rec = found[(w, v, s)]
            have = rec.seq if rec is not None and rec.run == run else None
            exp = want.get((v, s))
            if have != exp:
                off = layout.offset(w, s)
                what = (f"record ({w},{exp}) is missing" if exp is not None
                        else "slot should be empty")
                bad.append(f"{layout.names[v]} offset {off}: {what} but the slot holds"
                           f" {describe(rec) if have is not None else 'empty'}"
                           f" while record ({w},{heads[w]}) is present")
    # 2. Every dependency of a held record is held.
    for (w, v, _), rec in found.items():
        if rec is None or rec.run != run:
            continue
        for dw, dj in rec.deps:
            if dw >= layout.writers or dj > heads[dw]:
                bad.append(f"record ({w},{rec.seq}) on {layout.names[v]} depends on"
                           f" ({dw},{dj}), but writer {dw}'s newest record in the image"
                           f" is ({dw},{heads[dw]})")
    return Report(layout, run, heads, nrec, bad)


# ------------------------------------------------------------------ I/O ends

# The certificate directory an ``nbds://`` Device presents (wire.tls
# layout); set by a driver whose volumes are served over TCP with TLS.
TLS_DIR: str | None = None


def timed(fn, name: str) -> tuple[threading.Thread, dict]:
    """Start ``fn`` in a thread named ``name``; the dict gets ``s``, the
    seconds it took, ``end``, the monotonic time it ended, and ``exc`` if it
    raised (a fault test's establish or held write: the caller joins with a
    bound and checks both)."""
    out: dict = {}

    def run():
        t0 = time.monotonic()
        try:
            fn()
        except Exception as exc:
            out["exc"] = exc
        out["end"] = time.monotonic()
        out["s"] = out["end"] - t0

    t = threading.Thread(target=run, name=name)
    t.start()
    return t, out


def _is_uri(target: str) -> bool:
    return target.startswith(("nbd:", "nbd+", "nbds:", "nbds+"))


class Device:
    """One volume as the workload or checker sees it: an NBD URI (libnbd) or a
    path (a file, or a block device opened O_DIRECT so that a returned write
    is one the device acknowledged)."""

    def __init__(self, target: str, name: str = "workload"):
        self.target = target
        if _is_uri(target):
            import nbd
            self.h = nbd.NBD()
            self.h.set_handle_name(name)
            if target.startswith("nbds") and TLS_DIR is not None:
                from wire import tls
                tls.libnbd_setup(self.h, TLS_DIR)
            self.h.connect_uri(target)
            self.fd = None
            self.size = self.h.get_size()
        else:
            self.h = None
            flags = os.O_RDWR
            self.direct = stat.S_ISBLK(os.stat(target).st_mode)
            if self.direct:
                flags |= os.O_DIRECT
            self.fd = os.open(target, flags)
            self.size = os.lseek(self.fd, 0, os.SEEK_END)
            self._buf = mmap.mmap(-1, RECORD)   # page-aligned for O_DIRECT

    def pwrite(self, data: bytes, offset: int) -> None:
        if self.h is not None:
            self.h.pwrite(data, offset)
        else:
            self._buf[:] = data
            if os.pwrite(self.fd, self._buf, offset) != len(data):
                raise OSError(f"short write to {self.target} at {offset}")

    def pread(self, offset: int, length: int) -> bytes:
        if self.h is not None:
            return self.h.pread(length, offset)
        if not self.direct:
            return os.pread(self.fd, length, offset)
        buf = mmap.mmap(-1, -(-length // 4096) * 4096)   # aligned for O_DIRECT
        try:
            n = os.preadv(self.fd, [buf], offset)
            return bytes(buf[:min(n, length)])
        finally:
            buf.close()

    def close(self) -> None:
        if self.h is not None:
            try:
                self.h.shutdown()
            except Exception:
                pass    # the server may be gone: closing is all we want
            self.h = None
        elif self.fd is not None:
            os.close(self.fd)
            self.fd = None


def check_targets(targets: list[str], layout: Layout, run: int | None = None) -> Report:
    """Check an image set given as paths or NBD URIs, in layout order."""
    devs = [Device(t, f"checker-{i}") for i, t in enumerate(targets)]
    try:
        return check([d.pread for d in devs], layout, run)
    finally:
        for d in devs:
            d.close()


# ------------------------------------------------------------------ workload

class Workload:
    """The writer threads.  ``start()``, let it run, ``stop()``.

    ``targets``: one URI or path per volume, in layout order.  ``heads``: where
    each writer's chain resumes (default: from nothing; use
    ``Workload.resume`` to continue a run from what the volumes hold).

    A writer whose write fails (a slave killed) records the error in
    ``errors`` and stops; the others go on until they too depend on a dead
    volume.  ``acked[w]`` is writer w's newest acknowledged seq;
    ``latencies[w]`` its writes as (start, seconds), monotonic clock.
    """

    def __init__(self, targets: list[str], layout: Layout, run: int | None = None,
                 heads: list[int] | None = None, max_records: int | None = None,
                 pace: float = 0.0):
        if len(targets) != layout.volumes:
            raise ValueError(f"{len(targets)} targets for {layout.volumes} volumes")
        self.targets = list(targets)
        self.layout = layout
        self.run = run if run is not None else int.from_bytes(os.urandom(8), "little")
        self.acked = list(heads) if heads is not None else [-1] * layout.writers
        self.start_heads = list(self.acked)
        self.max_records = max_records
        self.pace = pace
        self.errors: list[tuple[int, BaseException]] = []
        self.latencies: list[list[float]] = [[] for _ in range(layout.writers)]
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._ready = threading.Barrier(layout.writers + 1)

    @classmethod
    def resume(cls, targets: list[str], layout: Layout, **kw) -> "Workload":
        """Continue the run the volumes hold (they must be consistent)."""
        rep = check_targets(targets, layout).raise_if_bad()
        return cls(targets, layout, run=rep.run, heads=rep.heads, **kw)

    @property
    def written(self) -> int:
        return sum(a - s for a, s in zip(self.acked, self.start_heads))

    def start(self) -> "Workload":
        for w in range(self.layout.writers):
            t = threading.Thread(target=self._writer, args=(w,), name=f"writer-{w}",
                                 daemon=True)
            t.start()
            self._threads.append(t)
        try:
            self._ready.wait(30)
        except threading.BrokenBarrierError:
            self.stop()
            raise RuntimeError(f"workload writers did not connect: {self.errors}") from None
        return self

    def _writer(self, w: int) -> None:
        lay = self.layout
        devs: list[Device] = []
        try:
            try:
                devs = [Device(t, f"writer-{w}-{v}") for v, t in enumerate(self.targets)]
            except BaseException as exc:
                self.errors.append((w, exc))
                self._ready.abort()
                return
            try:
                self._ready.wait(30)
            except threading.BrokenBarrierError:
                return
            i = self.acked[w] + 1
            lat = self.latencies[w]
            while not self._stop.is_set():
                if self.max_records is not None and i - self.start_heads[w] > self.max_records:
                    return
                deps = []
                if i > 0:
                    deps.append((w, i - 1))
                if lay.writers > 1:
                    other = (w + 1 + i) % lay.writers
                    if other == w:
                        other = (other + 1) % lay.writers
                    j = self.acked[other]      # acknowledged before we issue
                    if j >= 0:
                        deps.append((other, j))
                v, s = lay.place(w, i)
                data = encode(Record(self.run, w, v, s, i, tuple(deps)))
                t0 = time.monotonic()
                try:
                    devs[v].pwrite(data, lay.offset(w, s))
                except BaseException as exc:
                    self.errors.append((w, exc))
                    return
                lat.append((t0, time.monotonic() - t0))
                self.acked[w] = i
                i += 1
                if self.pace:
                    time.sleep(self.pace)
        finally:
            for d in devs:
                d.close()

    def join(self, timeout: float | None = None) -> "Workload":
        """Wait until every writer has ended (``max_records`` written)."""
        for t in self._threads:
            t.join(timeout)
        return self

    def stop(self, timeout: float = 30.0) -> "Workload":
        self._stop.set()
        for t in self._threads:
            t.join(timeout)
            if t.is_alive():
                raise RuntimeError(f"{t.name} did not stop within {timeout} s")
        return self

    def __enter__(self) -> "Workload":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.stop()


def simulate(layout: Layout, steps: list[int], run: int = 1) -> list[bytearray]:
    """Images the workload would leave if writer ``steps[k]`` wrote its next
    record at step k, each write acknowledged before the next (no slave
    involved).  For unit tests of the checker."""
    images = [bytearray(layout.size) for _ in range(layout.volumes)]
    acked = [-1] * layout.writers
    for w in steps:
        i = acked[w] + 1
        deps = [(w, i - 1)] if i > 0 else []
        if layout.writers > 1:
            other = (w + 1 + i) % layout.writers
            if other == w:
                other = (other + 1) % layout.writers
            if acked[other] >= 0:
                deps.append((other, acked[other]))
        v, s = layout.place(w, i)
        off = layout.offset(w, s)
        images[v][off:off + RECORD] = encode(Record(run, w, v, s, i, tuple(deps)))
        acked[w] = i
    return images


def readers_of(images: list[bytes]):
    return [lambda off, n, img=img: bytes(img[off:off + n]) for img in images]
