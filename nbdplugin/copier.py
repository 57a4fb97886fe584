"""Copy the PiT image of one volume to an NBD target with libnbd.

A ``Copy`` reads from a *source* through a small interface --
``blocks()``, ``read(buf, block)``, ``confirm(start, count)`` once the
target acknowledged, ``flushed(start, count)`` once a flush made them
durable, ``changed()`` (the blocks changed since the last completed copy,
for which the baseline's samples no longer speak), ``broken`` -- and never
reaches into a volume's PiT or change map itself.  The slave's source is
``PitSource``, the PiT image of a cut; a resync's union S | T arrives
through it too, since recovery marks the target's ``tgt`` into the
source's ``cr`` before the cut (DESIGN.md, "Failover, failback, resync").

An incremental copy goes only to the image that holds its baseline: every
completed copy records digests of sampled blocks of the target, and the next
incremental one reads them back before it sends anything (see ``_sample``).

Runs of blocks to send are merged up to ``MAX_RUN`` bytes and written over
``streams`` connections at once (where the target allows multi-conn; else
one), each a thread with its own libnbd handle and at most ``inflight /
streams`` requests in flight.  Runs come from one bitmap
and never overlap, so no two writes in flight touch the same bytes, whatever
the connection.  A block leaves the PiT's preservation when the target
acknowledges its write, and its change bit is cleared when a flush sent after
that completes (every ``FLUSH_EVERY`` bytes and at the end of each
connection; a flush covers its own connection's writes even on a target
without multi-conn).  If the target stops
answering for ``timeout`` seconds, or fails a request, the copy fails with a
one-line error and what was not confirmed stays marked: nothing is lost and
nothing confirmed is sent again by the next incremental copy.

The transfer itself runs in native/copy.c (``native.copyengine.Engine``)
wherever the source can be read from C (``PitSource.native``) and the
extension is built: the same runs, streams, flushes and events, without the
GIL; this thread applies its confirm/flushed events every ``DRAIN_EVERY``
seconds.  ``CGMIRROR_COPY_ENGINE=python|native`` picks one (tests, benches);
the Python streams below remain for other sources.

Rate limit (``rate``, bytes per second per copy, changeable while it runs
with ``set_rate``): a token bucket shared by the streams, the same in both
engines (native/copy.c says how); a stream waiting for tokens keeps
reaping what it has in flight.

Sub-blocks.  An incremental copy sends of a block that has a sub-record at
the cut (``ChangeMap.oos_records``: the block's changes since it was last
confirmed were all smaller than the block) only its dirty ``sub``-byte
pieces, read from the PiT like any block; a block without one goes whole.
Why that leaves the target's block equal to the PiT's: the target holds the
group the copy builds on (the baseline check above proves it, and the
resync's ``adopt`` vouches for it), a clean piece of a block was not written
since the block was last confirmed there (nor, for a block whose bits came
back from an aborted copy, by that copy: its pieces were dirty too), so the
target already holds it as the PiT does.  Hence baseline samples (whole-block
digests) still hold after a copy, and a full copy ignores sub-records (its
target holds no group of ours).  The PiT's preservation, a secondary's undo
store and ``tgt`` stay whole blocks.  What it gives up: a foreign write to
the target (outside any cgmirror copy) in a clean piece of a changed block
is no longer overwritten by chance, as one in an unchanged block never was;
after a restart (a crash mid-copy included) every changed block goes whole.
A block sent as pieces is a run of its own: one request per run of dirty
pieces (zero pieces as write-zeroes), the block confirmed once all of them
are acknowledged.  Only where the pieces save more bytes than their
requests cost (``changemap.sends_pieces``; the map drops records that could
never pass, ``keeps_record``): else the block goes whole, merged with its
neighbours.  ``total_bytes`` and ``done_bytes`` keep counting the bytes of
the blocks copied (progress of the cut); ``sent_total`` and ``sent_bytes``
count the bytes written to the target (data or write-zeroes), which is
what sub-blocks save.

Packed.  Where the target is a cgmirror secondary's replication export
(``.../repl-TOKEN/NAME``), the native engine writes to its packed twin
(``.../packed``, nbdplugin/secondary.py) instead: each request a batch of
records (whole runs and sub-block pieces alike) of up to ~1 MiB.  Scattered
pieces sent one request each were bound by requests, not bytes: the
secondary's per-request work (measured 76 us CPU a piece plain, 42 packed,
most of it the undo store's block copies), and over a link ``inflight``
pieces per round trip.  Any other target, an older secondary (its open
fails, the copy goes plain), the Python engine and ``CGMIRROR_PACKED=off``
write plainly.  ``progress()["packed"]`` says which.

Why several connections: one thread both reads the PiT and feeds the socket,
so while it reads, the target starves; measured on 1 GiB, 1 stream reached
0.6 of nbdcopy (which also copies with several connections and threads).
"""

from __future__ import annotations

import hashlib
import os
import random
import select
import threading
import time
import urllib.parse

import nbd

from native import copyengine
from .changemap import sends_pieces
from native.bitmap import Bitmap
from wire import tls

from wire import failpoints

MAX_RUN = 1 << 20
STREAMS = 4
# Bytes written on a connection between flushes that let change bits go.
FLUSH_EVERY = 64 << 20
# Baseline proof: blocks sampled per volume (one per stratum of the volume),
# tries per stratum to find a block that is not all zeros, and blocks taken
# from those the copy wrote.
SAMPLES = 32
SAMPLE_TRIES = 4
WRITTEN_SAMPLES = 8
# How often the native engine's events reach the source (seconds).
DRAIN_EVERY = 0.05
ENGINES = ("python", "native")


class IOBuffer:
    """A buffer for libnbd requests, with the ``nbd.Buffer`` of each length
    used made once and kept (see BufferPool for why)."""

    def __init__(self, size: int):
        self.data = bytearray(size)
        self._views: dict[int, "nbd.Buffer"] = {}

    def __len__(self) -> int:
        return len(self.data)

    def view(self, length: int) -> memoryview:
        return memoryview(self.data)[:length]

    def nbd(self, length: int) -> "nbd.Buffer":
        """The first ``length`` bytes as an nbd.Buffer sharing our memory."""
        b = self._views.get(length)
        if b is None:
            b = self._views[length] = nbd.Buffer.from_buffer(self.view(length))
        return b


class BufferPool:
    """Request buffers shared by every copy of the process, keyed by size.

    Why a pool: python3-libnbd 1.14 (Debian 12) keeps a reference to every
    buffer passed to ``aio_pwrite`` (or ``aio_pread``) even after the
    command retired.  A 1 MiB buffer allocated per copy was never freed (a
    long-running slave grew ~8 MiB per volume per copy), and even a fresh
    ``nbd.Buffer`` wrapper over a reused buffer leaks ~300 bytes a request.
    So both the memory and its wrappers (one per length, ``IOBuffer.nbd``)
    are made once and reused: the pool holds at most what the most copies
    in flight at once needed.
    """

    def __init__(self):
        self._lock = threading.Lock()
        self._free: dict[int, list[IOBuffer]] = {}

    def take(self, size: int, count: int) -> list[IOBuffer]:
        with self._lock:
            free = self._free.setdefault(size, [])
            got = [free.pop() for _ in range(min(count, len(free)))]
        return got + [IOBuffer(size) for _ in range(count - len(got))]

    def give(self, bufs) -> None:
        with self._lock:
            for buf in bufs:
                self._free.setdefault(len(buf), []).append(buf)


BUFFERS = BufferPool()


class PitSource:
    """What a copy of PiT n of ``volume`` reads, and whom it tells what landed.

    ``confirm``: the target acknowledged the blocks, so the PiT need not keep
    their pre-cut content; ``flushed``: a flush after that completed, so the
    blocks are durable there and their change bits may go.
    """

    def __init__(self, volume):
        self.name, self.size, self.granularity = volume.name, volume.size, volume.granularity
        self._pit, self._changes = volume.pit, volume.changes

    @property
    def broken(self) -> str | None:
        """Why the PiT cannot be completed (a failed preserve), or None."""
        return self._pit.broken

    def blocks(self):
        """The blocks still to send (a Bitmap of their own)."""
        return self._pit.remaining()

    def read(self, buf, block: int) -> None:
        self._pit.read(buf, block)

    def changed(self):
        """Blocks changed since the last completed copy (cr | oos)."""
        return self._changes.dirty()

    def confirm(self, start: int, count: int) -> None:
        self._pit.confirm(start, count)

    def flushed(self, start: int, count: int) -> None:
        self._changes.confirm(start, count)

    def partial(self) -> tuple[int, dict[int, int]]:
        """(sub-block size, {block: mask of dirty sub-blocks}) of the blocks
        of the cut that need not go whole; none for a full copy."""
        if self._pit.full:
            return self._changes.sub, {}
        return self._changes.sub, self._changes.oos_records()

    def native(self):
        """(live fd, Overlay) for the native engine, or None if unbuilt."""
        overlay = self._pit.store.native_index
        return None if overlay is None else (self._pit.volume.fd, overlay)


class CopyError(Exception):
    """A copy could not finish; ``fault`` says whose fault: "target" or "source"."""

    def __init__(self, message: str, fault: str = "target"):
        super().__init__(message)
        self.fault = fault


# The slave's certificate directory (plugin key tls=), presented to nbds://
# targets as the client certificate; None: the slave has none.
TLS_DIR: str | None = None


def connect(uri: str, name: str, timeout: float) -> "nbd.NBD":
    """Connect to ``uri``, giving up after ``timeout`` seconds (a server that
    accepts no more clients, like ``qemu-nbd`` without ``--shared``, or a
    dead link, would otherwise hang the copy).  An ``nbds://`` target gets
    mutual TLS with ``TLS_DIR``'s certificate (libnbd checks the target's
    certificate against the session CA and the URI's host)."""
    return connect_all(uri, [name], timeout)[0]


def connect_all(uri: str, names, timeout: float) -> list:
    """``connect`` for one handle per name, their handshakes at once: a
    handshake is several round trips, which over a 20 ms link one handle
    after the other made ~80 ms a connection, every group."""
    handles = []
    try:
        try:
            for name in names:
                h = nbd.NBD()
                h.set_handle_name(name)
                handles.append(h)
                if uri.startswith("nbds"):
                    if TLS_DIR is None:
                        raise CopyError(f"target {uri} needs TLS but the slave has no"
                                        f" certificate: start it with tls=DIR", "source")
                    try:
                        tls.libnbd_setup(h, TLS_DIR)
                    except tls.TLSConfigError as exc:
                        raise CopyError(f"target {uri}: {exc}", "source") from exc
                h.aio_connect_uri(uri)
            _handshakes(handles, uri, time.monotonic() + timeout, timeout)
            if not all(h.aio_is_ready() for h in handles):
                raise CopyError(f"cannot reach target {uri}: connection failed")
        except nbd.Error as exc:
            raise CopyError(f"cannot reach target {uri}: {exc.string}") from exc
    except BaseException:
        for h in handles:
            disconnect(h, 0)
        raise
    return handles


def _handshakes(handles, uri: str, deadline: float, timeout: float) -> None:
    """Drive every handle's connection until none is still connecting,
    waiting on all their sockets at once."""
    while pending := [h for h in handles if h.aio_is_connecting()]:
        left = deadline - time.monotonic()
        if left <= 0:
            raise CopyError(f"cannot reach target {uri}: no answer within"
                            f" {timeout:.0f} s")
        poller, by_fd = select.poll(), {}
        for h in pending:
            d, ev = h.aio_get_direction(), 0
            if d & nbd.AIO_DIRECTION_READ:
                ev |= select.POLLIN
            if d & nbd.AIO_DIRECTION_WRITE:
                ev |= select.POLLOUT
            fd = h.aio_get_fd()
            by_fd[fd] = h
            poller.register(fd, ev)
        for fd, ev in poller.poll(max(1, min(100, int(left * 1000)))):
            h = by_fd[fd]
            if ev & (select.POLLIN | select.POLLHUP | select.POLLERR):
                h.aio_notify_read()
            elif ev & select.POLLOUT:
                h.aio_notify_write()


# How long a copy's connection may take to close after a disconnect request.
DISCONNECT_GRACE = 1.0


def disconnect(h, grace: float = DISCONNECT_GRACE) -> None:
    """Say goodbye to the target, waiting at most ``grace`` seconds, then
    leave the handle to be closed (when it is dropped).  Not
    ``h.shutdown()``: libnbd's shutdown polls without a limit until the
    server closes the connection, so a target behind a silent link (a cut
    between sites drops packets: no RST, no reply) or a stopped target kept
    a failed copy -- and the cut -- in phase copying for ever, whatever the
    copy timeout.  A disconnect has no value for us beyond politeness
    (libnbd: no advantage over closing abruptly).  Never raises."""
    try:
        if h.aio_is_closed() or h.aio_is_dead():
            return
        if h.aio_is_ready() or h.aio_is_processing():
            h.aio_disconnect(0)
        deadline = time.monotonic() + grace
        while not (h.aio_is_closed() or h.aio_is_dead()):
            left = deadline - time.monotonic()
            if left <= 0:
                return
            h.poll(max(1, min(100, int(left * 1000))))
    except nbd.Error:
        pass


# ------------------------------------------------------------------ baseline
#
# Why samples: a third-party target (qemu-nbd, nbd-server, nbdkit file) keeps
# no identity we could ask for, and an incremental copy to an image that does
# not hold the last copy leaves a wrong image reported done.  So every
# completed copy records the target's size and digests of blocks: one per
# stratum of the volume at a random place (a fresh choice each time, so no
# fixed set of blocks is ever safe to change), preferring blocks that are not
# all zeros (a blank or freshly formatted image then cannot match), plus some
# of the blocks this copy wrote.  Before an incremental copy (and before the
# coordinator freezes for one: the ``verify`` op) the same blocks are read
# back and compared.
#
# What it cannot see: foreign writes to blocks that were not sampled (e.g. a
# guest that mounted the target and changed a few files), and an image
# swapped for a byte-identical copy (which is harmless).  Reading the whole
# target would cost as much as a full copy; the samples catch the mistakes
# that happen -- a wrong URI, a replaced, recreated or reformatted image --
# at the cost of well under 10 MiB read per copy.


class BlockReader:
    """Reads one block of a volume's extent on a target at a time, each
    within ``timeout`` (a silent target must not hang a copy), into one
    pooled buffer (see BufferPool)."""

    def __init__(self, h, uri: str, source, timeout: float):
        self.h, self.uri, self.timeout = h, uri, timeout
        self.size, self.g = source.size, source.granularity

    def read(self, block: int) -> bytes:
        buf = BUFFERS.take(self.g, 1)[0]
        length = min(self.g, self.size - block * self.g)
        cookie = self.h.aio_pread(buf.nbd(length), block * self.g)
        deadline = time.monotonic() + self.timeout
        # Back to the pool only once the read retired: libnbd may still
        # write into the buffer of a read in flight.
        while not self.h.aio_command_completed(cookie):
            if time.monotonic() > deadline:
                raise CopyError(f"target {self.uri} did not answer for"
                                f" {self.timeout:.0f} s")
            self.h.poll(100)
        data = bytes(buf.view(length))
        BUFFERS.give([buf])
        return data

    def read_many(self, blocks) -> list[bytes]:
        """``read`` of each of ``blocks``, all in flight at once: one round
        trip for the lot, not one each (a baseline check and a sample read
        ~40 blocks, which over a 20 ms link took 0.8 s a group one by one)."""
        blocks = list(blocks)
        bufs = BUFFERS.take(self.g, len(blocks))
        lengths = [min(self.g, self.size - b * self.g) for b in blocks]
        cookies, retired = [], False
        try:
            for b, buf, length in zip(blocks, bufs, lengths):
                cookies.append(self.h.aio_pread(buf.nbd(length), b * self.g))
            deadline = time.monotonic() + self.timeout
            for cookie in cookies:
                while not self.h.aio_command_completed(cookie):
                    if time.monotonic() > deadline:
                        raise CopyError(f"target {self.uri} did not answer for"
                                        f" {self.timeout:.0f} s")
                    self.h.poll(100)
            retired = True
            return [bytes(buf.view(n)) for buf, n in zip(bufs, lengths)]
        finally:
            # Reads still in flight (an error above) may still write into
            # their buffers: those stay with libnbd.
            if retired or not cookies:
                BUFFERS.give(bufs)


# A cgmirror secondary's packed twin of a replication export (see
# nbdplugin/secondary.py): the export name plus this.
PACKED_SUFFIX = "/packed"


def packed_uri(uri: str) -> str | None:
    """The URI of the packed twin of ``uri`` if it names a cgmirror
    replication export (``.../repl-TOKEN/NAME``), else None."""
    base, q, query = uri.partition("?")
    segments = urllib.parse.urlsplit(base).path.split("/")
    if len(segments) < 3 or not segments[-2].startswith("repl-"):
        return None
    return base + PACKED_SUFFIX + q + query


def sub_extents(mask: int, sub: int, length: int) -> list[tuple[int, int]]:
    """(offset, length) of each run of set bits of ``mask`` (bit i: bytes
    [i*sub, (i+1)*sub)) inside a block of ``length`` bytes."""
    out, i = [], 0
    while mask:
        if not mask & 1:
            z = (mask & -mask).bit_length() - 1
            mask, i = mask >> z, i + z
            continue
        n = (~mask & (mask + 1)).bit_length() - 1      # trailing ones
        if i * sub < length:
            out.append((i * sub, min(n * sub, length - i * sub)))
        mask, i = mask >> n, i + n
    return out


def split_runs(runs, partial: dict[int, int]):
    """(start, nblocks, mask): ``runs`` (ascending (start, nblocks)) with
    every block of ``partial`` taken out as a run of its own with its mask
    (mask None: whole blocks)."""
    keys = sorted(partial)
    i = 0
    for start, n in runs:
        end = start + n
        while start < end:
            while i < len(keys) and keys[i] < start:
                i += 1
            if i == len(keys) or keys[i] >= end:
                yield start, end - start, None
                break
            k = keys[i]
            if k > start:
                yield start, k - start, None
            yield k, 1, partial[k]
            start = k + 1


RATE_BURST_S = 0.1     # the bucket holds at most this much time's worth of bytes


class Pacer:
    """The token bucket of a rate-limited copy (the Python engine's twin of
    ``pace`` in native/copy.c): a write may go while the bucket is not in
    debt, and takes its length.  Thread-safe; rate 0 is no limit."""

    def __init__(self, rate: int = 0, clock=time.monotonic):
        self.rate = rate
        self.clock = clock
        self.tokens = 0.0
        self.refilled = clock()
        self._lock = threading.Lock()

    def delay(self, nbytes: int) -> float:
        """0 if ``nbytes`` may go now (they are taken), else seconds to wait
        before asking again."""
        with self._lock:
            now, rate = self.clock(), self.rate
            if rate <= 0:
                return 0.0
            self.tokens = min(rate * RATE_BURST_S,
                              self.tokens + (now - self.refilled) * rate)
            self.refilled = now
            # Less than a byte of debt is none: float rounding must not make
            # a caller wait 1e-17 s forever.
            if self.tokens > -1.0:
                self.tokens -= nbytes
                return 0.0
            return -self.tokens / rate


def block_digest(data) -> str:
    return hashlib.sha256(data).hexdigest()[:32]


def sample(reader: BlockReader, written: Bitmap) -> list[list]:
    """[[block, digest], ...] of SAMPLES-odd blocks of the target."""
    nblocks = -(-reader.size // reader.g)
    rng = random.SystemRandom()
    strata = min(SAMPLES, nblocks)
    # Rounds of reads, each round's in flight at once (a round trip per
    # round, not per block): a stratum whose block was all zeros tries
    # another in the next round, SAMPLE_TRIES rounds at most; the blocks
    # the copy wrote go with the first.
    picked: dict[int, tuple[int, str]] = {}      # stratum -> (block, digest)
    want = list(range(strata))
    runs = list(written.iter_runs())
    extra = [start + rng.randrange(length)
             for start, length in rng.sample(runs, min(WRITTEN_SAMPLES, len(runs)))]
    for round_ in range(SAMPLE_TRIES):
        picks = [(i, rng.randrange(i * nblocks // strata, (i + 1) * nblocks // strata))
                 for i in want]
        more = extra if round_ == 0 else []
        datas = reader.read_many([b for _, b in picks] + more)
        want = []
        for (i, block), data in zip(picks, datas):
            # A zero block if the stratum gave nothing else: still proof
            # against a target written where the source is empty.
            picked[i] = (block, block_digest(data))
            if data.count(0) == len(data):
                want.append(i)
        if round_ == 0:
            extra_digests = [(b, block_digest(d)) for b, d in zip(extra, datas[len(picks):])]
        if not want:
            break
    samples = dict(picked.values())
    for block, digest in extra_digests:
        samples.setdefault(block, digest)
    return [[b, d] for b, d in sorted(samples.items())]


def check_baseline(h, uri: str, size: int, base: dict, source, timeout: float,
                   changed) -> None:
    """Raise CopyError (one line naming --full) unless the target behind
    ``h`` (``size`` bytes) still holds what ``base`` recorded of it.

    A sample speaks only for a block that has not changed since it was taken:
    a block marked in ``changed`` (the volume's cr | oos) may hold anything
    at the target, since a copy interrupted by a crash may have sent it (its
    bit came back at recovery, and it will be sent again)."""
    fix = ("restart `cgmirror mirror run` (its start copies the pair whole)"
           if "/repl-" in uri else "run `cgmirror copy --full`")
    if size != base["size"]:
        raise CopyError(f"target {uri} no longer holds the baseline of"
                        f" {source.name} (size {size}, was {base['size']}): {fix}")
    if base["granularity"] != source.granularity:
        raise CopyError(f"the baseline of {source.name} on {uri} was recorded at"
                        f" granularity {base['granularity']}, the volume now has"
                        f" {source.granularity}: {fix}")
    reader = BlockReader(h, uri, source, timeout)
    check = [(block, digest) for block, digest in base["samples"]
             if not changed.test(block)]
    for (block, digest), data in zip(check, reader.read_many(b for b, _ in check)):
        if block_digest(data) != digest:
            raise CopyError(f"target {uri} no longer holds the baseline of"
                            f" {source.name} (block {block} differs): {fix}")


def verify_target(uri: str, base: dict, source, timeout: float) -> None:
    """``check_baseline`` over a connection of its own (before a cut)."""
    h = connect(uri, f"cgmirror-verify-{source.name}", timeout)
    try:
        try:
            check_baseline(h, uri, h.get_size(), base, source, timeout,
                           source.changes.dirty())
        except nbd.Error as exc:
            raise CopyError(f"target {uri}: {exc.string}") from exc
    finally:
        disconnect(h)


class Copy:
    """One copy of ``source`` to one target; progress readable any time.

    ``baseline``: for an incremental copy, what the last completed copy
    recorded of the target (see ``_sample``), without samples of the blocks
    this copy sends (the slave drops those durably first: they change on
    the target from the first write on); checked before anything is sent.
    Afterwards it holds what may be claimed of the target now: fresh samples
    after a completed copy, else what it was given.
    """

    def __init__(self, source, uri: str, inflight: int = 8,
                 timeout: float = 30.0, streams: int = STREAMS,
                 baseline: dict | None = None, rate: int = 0):
        self.source = source
        self.pacer = Pacer(rate)
        self.uri = uri
        self.baseline = baseline
        self.blocks: Bitmap = source.blocks()
        self.timeout = timeout
        self.inflight = inflight
        self.streams = max(1, min(streams, inflight))
        g = source.granularity
        # Sub-records of blocks this copy sends (see "Sub-blocks" above).
        partial = getattr(source, "partial", None)
        self.sub, records = partial() if partial is not None else (g, {})
        self.partial = {b: m for b, m in records.items() if self.blocks.test(b)
                        and sends_pieces(m, self.sub, min(g, source.size - b * g))}
        self.total_bytes = sum(min(length * g, source.size - start * g)
                               for start, length in self.blocks.iter_runs())
        self.sent_total = self.total_bytes
        for b, m in self.partial.items():
            blen = min(g, source.size - b * g)
            self.sent_total -= blen - sum(n for _, n in sub_extents(m, self.sub, blen))
        self.done_bytes = 0
        self.sent_bytes = 0
        self.state = "running"
        self.error: str | None = None
        self.fault: str | None = None
        self.started = time.monotonic()
        self.finished: float | None = None
        self.cancelled = threading.Event()
        self.thread: threading.Thread | None = None
        self._lock = threading.Lock()     # guards the byte counts and the run iterator
        self._runs = None
        self._failed: list[CopyError] = []
        self._engine: copyengine.Engine | None = None
        self.packed = False     # sent as batches to the target's packed export

    def set_rate(self, rate: int) -> None:
        """Bytes per second from now on (0: no limit), in either engine."""
        with self._lock:
            self.pacer.rate = rate
            if self._engine is not None:
                self._engine.set_rate(rate)

    def progress(self) -> dict:
        end = self.finished or time.monotonic()
        return {"target": self.uri, "state": self.state, "error": self.error,
                "fault": self.fault,
                "total_bytes": self.total_bytes, "done_bytes": self.done_bytes,
                "sent_total": self.sent_total, "sent_bytes": self.sent_bytes,
                "packed": self.packed,
                "seconds": round(end - self.started, 3)}

    def run(self) -> None:
        try:
            try:
                self._run()
            except nbd.Error as exc:   # the target's handle, outside a stream
                raise CopyError(f"target {self.uri}: {exc.string}") from exc
            self.state = "done"
        except CopyError as exc:
            self.state, self.error, self.fault = "failed", str(exc), exc.fault
        except Exception as exc:  # a bug or a local I/O error: report, don't hide
            self.state, self.error = "failed", f"source {self.source.name}: {exc}"
            self.fault = "source"
        finally:
            self.finished = time.monotonic()

    def _run(self) -> None:
        vol = self.source
        handles = [connect(self.uri, f"cgmirror-copy-{vol.name}", self.timeout)]
        try:
            h = handles[0]
            size = h.get_size()
            if size < vol.size:
                raise CopyError(f"target {self.uri} is too small for {vol.name}:"
                                f" {size} bytes, needs {vol.size}")
            if h.is_read_only():
                raise CopyError(f"target {self.uri} is read-only")
            if self.baseline is not None:
                self._check_baseline(h, size)
            native = self._native_reader()
            packed = self._connect_packed() if native is not None else None
            if packed:
                handles += packed
                self.packed = True
                self._run_native(packed, max(1, self.inflight // len(packed)), *native,
                                 packed=True)
                self.baseline = self._sample(h, size)
                return
            # More connections only where the server says they share one
            # view of the export (multi-conn); many servers serve one client.
            if h.can_multi_conn() and self.streams > 1:
                handles += connect_all(self.uri, [f"cgmirror-copy-{vol.name}-{i}"
                                                  for i in range(1, self.streams)],
                                       self.timeout)
            per_stream = max(1, self.inflight // len(handles))
            if native is not None:
                self._run_native(handles, per_stream, *native)
                self.baseline = self._sample(h, size)
                return
            self._runs = split_runs(
                self.blocks.iter_runs(max_run=max(1, MAX_RUN // vol.granularity)),
                self.partial)
            threads = [threading.Thread(target=self._stream_guarded, args=(hh, per_stream),
                                        name=f"copy-{vol.name}-{i}", daemon=True)
                       for i, hh in enumerate(handles[1:], 1)]
            for t in threads:
                t.start()
            self._stream_guarded(h, per_stream)
            for t in threads:
                t.join()
            if self._failed:
                raise self._failed[0]
            # Every stream has flushed: what h reads now is what the target holds.
            self.baseline = self._sample(h, size)
        finally:
            for hh in handles:
                disconnect(hh)   # bounded: the copy's outcome is already decided
            with self._lock:                # set_rate may be calling it
                if self._engine is not None:
                    self._engine.close()   # only now: libnbd may read its buffers

    def _sample(self, h, size: int) -> dict:
        """The baseline record of the target as it is now (see ``sample``)."""
        src = self.source
        return {"uri": self.uri, "size": size, "granularity": src.granularity,
                "samples": sample(BlockReader(h, self.uri, src, self.timeout),
                                  self.blocks)}

    def _check_baseline(self, h, size: int) -> None:
        """Refuse unless the target still holds what the last copy recorded."""
        check_baseline(h, self.uri, size, self.baseline, self.source, self.timeout,
                       self.source.changed())

    def _connect_packed(self) -> list | None:
        """Connections to the target's packed export (a cgmirror secondary's
        replication export has one: nbdplugin/secondary.py), one per
        stream; None where the target has none (a third-party server, an
        older secondary), which the copy then writes plainly; also with
        ``CGMIRROR_PACKED=off`` (benches, tests)."""
        uri = packed_uri(self.uri)
        if uri is None or os.environ.get("CGMIRROR_PACKED") == "off":
            return None
        name = f"cgmirror-copy-{self.source.name}-packed"
        try:
            return connect_all(uri, [name] + [f"{name}-{i}" for i in range(1, self.streams)],
                               self.timeout)
        except CopyError:
            return None

    def _native_reader(self):
        """(fd, Overlay) if this copy runs in the native engine, else None."""
        choice = os.environ.get("CGMIRROR_COPY_ENGINE") or (
            "native" if copyengine.AVAILABLE else "python")
        if choice not in ENGINES:
            raise CopyError(f"CGMIRROR_COPY_ENGINE must be one of {', '.join(ENGINES)},"
                            f" not {choice!r}", "source")
        if choice == "python":
            return None
        if not copyengine.AVAILABLE:
            raise CopyError("the native copy engine is not built: run `make ext`",
                            "source")
        native = getattr(self.source, "native", None)
        return native() if native is not None else None

    def _run_native(self, handles, per_stream: int, fd: int, overlay,
                    packed: bool = False) -> None:
        """The copy of ``_stream`` over ``handles``, run by the native engine
        in a thread of its own without the GIL, while this one applies its
        events (confirm, then flushed after a flush), publishes progress,
        and passes on a cancel or a broken PiT."""
        src = self.source
        g = src.granularity
        engine = copyengine.Engine(
            handles, fd, overlay, g, src.size, self.blocks,
            max_run=max(1, MAX_RUN // g), flush_every=FLUSH_EVERY,
            inflight=per_stream, timeout=self.timeout,
            partial=self.partial, sub=self.sub, packed=packed)
        with self._lock:
            self._engine = engine
            engine.set_rate(self.pacer.rate)
        failed: list[copyengine.EngineError] = []

        def work():
            try:
                engine.run()
            except copyengine.EngineError as exc:
                failed.append(exc)

        t = threading.Thread(target=work, name=f"copy-{src.name}-native", daemon=True)
        halfway = self.total_bytes // 2
        t.start()
        try:
            while t.is_alive():
                t.join(DRAIN_EVERY)
                self._apply(engine.take_events())
                with self._lock:
                    self.done_bytes, self.sent_bytes = engine.done_bytes(), engine.sent_bytes()
                if self.done_bytes and self.done_bytes >= halfway:
                    failpoints.hit("copy:mid")
                if self.cancelled.is_set() or src.broken:
                    engine.cancel()
            self._apply(engine.take_events())   # those of the last moments
            with self._lock:
                self.done_bytes, self.sent_bytes = engine.done_bytes(), engine.sent_bytes()
        finally:
            if t.is_alive():    # this thread failed: stop the engine first
                engine.cancel()
                t.join()
        if failed:
            exc = failed[0]
            if exc.fault == "target":
                raise CopyError(f"target {self.uri}{exc}") from exc
            raise CopyError(f"source {src.name}: {exc}", "source") from exc
        self._check_not_stopped()

    def _apply(self, events) -> None:
        src = self.source
        for kind, start, count in events:
            if kind == copyengine.CONFIRM:
                src.confirm(start, count)
            else:
                src.flushed(start, count)

    def _next_run(self):
        with self._lock:
            if self._failed or self.cancelled.is_set():
                return None
            return next(self._runs, None)

    def _stream_guarded(self, h, inflight: int) -> None:
        try:
            try:
                self._stream(h, inflight)
            except nbd.Error as exc:
                # Only the target's handle raises nbd.Error: translated here,
                # once, whichever call met it (a poll on a closed connection,
                # a capability query after the server died...).
                raise CopyError(f"target {self.uri}: {exc.string}") from exc
        except CopyError as exc:
            with self._lock:
                self._failed.append(exc)
        except Exception as exc:
            with self._lock:
                self._failed.append(CopyError(f"source {self.source.name}: {exc}",
                                              "source"))

    def _stream(self, h, inflight: int) -> None:
        """Send runs over one connection, ``inflight`` requests at most, until
        none are left (``_Stream`` holds the connection's requests in flight).

        A write the target acknowledged ends the block's preservation (the
        PiT content is there), but its change bit is cleared only once a
        flush that followed the write has completed: a target that crashes
        and loses acknowledged writes gets them again with the next copy.
        A block sent as sub-block pieces counts as acknowledged once every
        piece is.
        """
        stream = _Stream(self, h, inflight)
        try:
            while (run := self._next_run()) is not None:
                stream.send_run(*run)
                stream.reap(wait=False)
                if stream.acked_bytes >= FLUSH_EVERY:
                    stream.flush()
            stream.finish()
        except BaseException:
            stream.retire_quietly()
            raise
        finally:
            stream.release()
        self._check_not_stopped()

    def landed(self, length: int, sent: int) -> int:
        """Count a run the target acknowledged (``length`` bytes of blocks,
        ``sent`` bytes written); the bytes of blocks done so far."""
        with self._lock:
            self.done_bytes += length
            self.sent_bytes += sent
            return self.done_bytes

    def _check_not_stopped(self) -> None:
        """Raise the copy's error if it was cancelled or its PiT broke."""
        if self.cancelled.is_set():
            raise CopyError("copy cancelled", "source")
        if self.source.broken:
            raise CopyError(self.source.broken, "source")


class _Stream:
    """One connection of a copy in the Python engine: its requests in flight
    and what they mean once retired, the blocks acknowledged but not yet
    covered by a flush, and its run buffers.

    ``writes``: cookie -> (run, buffer, is one of our run buffers); a run is
    [start, nblocks, bytes of the blocks, requests not yet acknowledged,
    bytes sent], shared by the pieces of a block sent as sub-blocks.
    ``flushes``: cookie -> the (start, nblocks) it makes durable.
    """

    def __init__(self, copy: Copy, h, inflight: int):
        self.copy, self.h, self.inflight = copy, h, inflight
        self.src = copy.source
        self.g = self.src.granularity
        self.can_zero, self.can_flush = h.can_zero(), h.can_flush()
        self.free = BUFFERS.take(MAX_RUN, inflight)
        self.writes: dict[int, tuple[list, IOBuffer, bool]] = {}
        self.flushes: dict[int, list[tuple[int, int]]] = {}
        self.acked: list[tuple[int, int]] = []     # written, not yet covered by a flush
        self.acked_bytes = 0
        self.halfway = copy.total_bytes // 2
        self.last_progress = time.monotonic()

    # ---------------------------------------------------------- sending

    def send_run(self, start: int, nblocks: int, mask: int | None) -> None:
        """Read a run from the PiT and send it: whole blocks as one request
        (a zero run as write-zeroes), a block with ``mask`` as its pieces."""
        src, g, copy = self.src, self.g, self.copy
        if src.broken:
            raise CopyError(src.broken, "source")
        while not self.free:
            self.reap(wait=True)
        length = min(nblocks * g, src.size - start * g)
        parts = None if mask is None else sub_extents(mask, copy.sub, length)
        sent = length if parts is None else sum(n for _, n in parts)
        self.pace(sent)
        buf = self.free.pop()
        try:
            src.read(buf.view(length), start)
            if parts is None:
                self.send(buf.nbd(length), start * g, [start, nblocks, length, 1, length],
                          buf, True)
        except BaseException:
            self.free.append(buf)
            raise
        if parts is not None:
            self.send_pieces(start, length, sent, parts, buf)

    def send_pieces(self, start: int, length: int, sent: int, parts, buf: IOBuffer) -> None:
        """Send the ``parts`` (offset, length) of block ``start``, read into
        ``buf`` (given back here), as a run of their own."""
        # Each piece goes from a pooled buffer of its own size (python3-libnbd
        # keeps every buffer it was given: a slice of ours would be a new one
        # per request).
        rest = []
        for off, n in parts:
            pb = BUFFERS.take(n, 1)[0]
            pb.data[:] = buf.view(off + n)[off:]
            rest.append((off, pb))
        self.free.append(buf)
        sub_run = [start, 1, length, len(rest), sent]
        try:
            while rest:
                while len(self.writes) >= self.inflight:
                    self.reap(wait=True)
                off, pb = rest[0]
                self.send(pb.nbd(len(pb)), start * self.g + off, sub_run, pb, False)
                rest.pop(0)
        except BaseException:
            BUFFERS.give(pb for _, pb in rest)
            raise

    def send(self, data: "nbd.Buffer", offset: int, run: list, buf: IOBuffer,
             run_buffer: bool) -> None:
        """One request in flight for ``run``, from ``buf``."""
        if self.can_zero and data.is_zero():
            # A zero run costs the link nothing and the target may punch a
            # hole for it.
            cookie = self.h.aio_zero(len(data), offset)
        else:
            cookie = self.h.aio_pwrite(data, offset)
        self.writes[cookie] = (run, buf, run_buffer)

    def pace(self, nbytes: int) -> None:
        """Wait until the copy's rate limit lets ``nbytes`` go, retiring what
        is in flight meanwhile."""
        copy = self.copy
        while (wait := copy.pacer.delay(nbytes)) > 0:
            if copy.cancelled.is_set():
                raise CopyError("copy cancelled", "source")
            if self.writes or self.flushes:
                self.h.poll(max(1, int(min(wait, 0.025) * 1000)))
                self.reap(wait=False)
            else:
                copy.cancelled.wait(min(wait, 0.025))

    def flush(self) -> None:
        """A flush for the blocks acknowledged since the last one."""
        if self.acked:
            self.flushes[self.h.aio_flush()] = self.acked[:]
            self.acked.clear()
            self.acked_bytes = 0

    # ---------------------------------------------------------- retiring

    def reap(self, wait: bool) -> None:
        """Retire the requests that completed (first waiting up to a second
        for one, if ``wait``); a target silent for the copy's timeout fails it."""
        h, copy = self.h, self.copy
        if wait:
            if h.poll(1000) == 0 and time.monotonic() - self.last_progress > copy.timeout:
                raise CopyError(f"target {copy.uri} did not answer for"
                                f" {copy.timeout:.0f} s")
        while (self.writes or self.flushes) and (cookie := h.aio_peek_command_completed()) > 0:
            self.last_progress = time.monotonic()
            if cookie in self.flushes:
                self._flush_retired(cookie)
            else:
                self._write_retired(cookie)

    def _flush_retired(self, cookie: int) -> None:
        ranges = self.flushes.pop(cookie)
        try:
            self.h.aio_command_completed(cookie)
        except nbd.Error as exc:
            raise CopyError(f"target {self.copy.uri} failed to flush:"
                            f" {exc.string}") from exc
        for start, nblocks in ranges:
            self.src.flushed(start, nblocks)

    def _write_retired(self, cookie: int) -> None:
        run, buf, run_buffer = self.writes.pop(cookie)
        if run_buffer:
            self.free.append(buf)
        else:
            BUFFERS.give([buf])
        try:
            self.h.aio_command_completed(cookie)
        except nbd.Error as exc:
            raise CopyError(f"target {self.copy.uri} failed a write at"
                            f" {run[0] * self.g}: {exc.string}") from exc
        run[3] -= 1
        if not run[3]:              # else: pieces of the block still in flight
            self._acknowledged(run)

    def _acknowledged(self, run: list) -> None:
        """Every request of ``run`` is acknowledged: its blocks leave the
        PiT's preservation, and wait for a flush to clear their bits."""
        copy, src = self.copy, self.src
        start, nblocks, length, _, sent = run
        src.confirm(start, nblocks)
        if self.can_flush:
            self.acked.append((start, nblocks))
            self.acked_bytes += sent
        else:
            src.flushed(start, nblocks)   # nothing better to wait for
        if copy.landed(length, sent) >= self.halfway:
            failpoints.hit("copy:mid")

    # ---------------------------------------------------------- ending

    def finish(self) -> None:
        """All runs sent: wait for the writes, then flush (unless the copy
        stopped) and wait for the flushes."""
        while self.writes:
            self.reap(wait=True)
        if self.can_flush and not (self.copy.cancelled.is_set() or self.src.broken):
            self.flush()
        while self.flushes:
            self.reap(wait=True)

    def retire_quietly(self) -> None:
        """On an error: retire what is still in flight, if the connection
        still answers, so that what the target made durable is not sent
        again.  A failure here (the usual one: the target is gone) must not
        replace the error that got us here."""
        try:
            while self.writes or self.flushes:
                self.reap(wait=True)
        except (CopyError, nbd.Error):
            pass

    def release(self) -> None:
        """Give the free run buffers back to the pool.  Buffers of writes
        never retired stay with libnbd (it may still send from them until
        the handle is closed)."""
        BUFFERS.give(self.free)
