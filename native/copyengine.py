"""The native copy engine (native/copy.c) and the saved-block overlay it reads.

This module is the only importer of the cffi extension ``native._copy``
(built by ``python -m native.build``, linked with libnbd).  Arguments are
checked here before any C runs; no cffi object leaves this module.

``Overlay``  block -> offset of its saved copy in a BlockStore's file,
             readable from C without Python (see copy.c for the ordering).
``Engine``   one copy of the set bits of a Bitmap from a volume's fd (plus
             an Overlay) to libnbd handles opened in Python; ``run()``
             blocks without the GIL, ``take_events()``/``done_bytes()``/
             ``cancel()`` are for another thread while it runs.

``AVAILABLE`` is False when the extension was not built (then ``Overlay``
and ``Engine`` raise ``RuntimeError``); callers fall back to Python.
"""

from __future__ import annotations

import ctypes
import operator
import sysconfig

from native.bitmap import Bitmap

try:
    from native._copy import ffi, lib
except ImportError:  # pragma: no cover - `make ext` builds it
    ffi = lib = None

__all__ = ["AVAILABLE", "CONFIRM", "FLUSHED", "Engine", "EngineError", "Overlay"]

AVAILABLE = lib is not None
CONFIRM, FLUSHED = 1, 2
_FAULTS = {1: "target", 2: "source"}
_EVENTS_PER_TAKE = 4096

def _python_api():
    """libpython's symbols: global in a python binary, but inside nbdkit
    libpython is loaded by the (RTLD_LOCAL) python plugin, so open it by
    name there (dlopen of a loaded library just returns it)."""
    try:
        ctypes.pythonapi.PyCapsule_GetPointer
        return ctypes.pythonapi
    except AttributeError:
        return ctypes.PyDLL(sysconfig.get_config_var("INSTSONAME"))


_capsule_pointer = _python_api().PyCapsule_GetPointer
_capsule_pointer.restype = ctypes.c_void_p
_capsule_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]


def _need():
    if not AVAILABLE:
        raise RuntimeError("native._copy is not built: run `make ext`")


def _uint(value, name: str) -> int:
    i = operator.index(value)
    if i < 0:
        raise ValueError(f"{name} must be >= 0, got {i}")
    return i


class EngineError(Exception):
    """The engine failed; the message says what, ``fault`` whose fault it
    was ("target" or "source").  Target messages are the tail after the
    target's name (e.g. " did not answer for 30 s")."""

    def __init__(self, message: str, fault: str):
        super().__init__(message)
        self.fault = fault


class Overlay:
    """Saved blocks of a volume of ``nblocks`` blocks, for C readers.

    One writer at a time (the BlockStore's lock); readers in C need no lock.
    """

    def __init__(self, nblocks: int):
        _need()
        nblocks = _uint(nblocks, "nblocks")
        p = lib.cg_overlay_new(nblocks)
        if p == ffi.NULL:
            raise MemoryError("cannot allocate the block overlay")
        self._p = ffi.gc(p, lib.cg_overlay_free)
        self.nblocks = nblocks

    def set_fd(self, fd: int) -> None:
        """Publish the store's file (a dup is kept; call once)."""
        r = lib.cg_overlay_set_fd(self._p, _uint(fd, "fd"))
        if r < 0:
            raise OSError(-r, "overlay: cannot take the store's fd")

    def set(self, block: int, offset: int) -> None:
        """Record that ``block`` is saved at ``offset`` of the store."""
        block, offset = _uint(block, "block"), _uint(offset, "offset")
        if block >= self.nblocks:
            raise ValueError(f"block {block} out of range (nblocks {self.nblocks})")
        r = lib.cg_overlay_set(self._p, block, offset)
        if r < 0:
            raise OSError(-r, f"overlay: cannot record block {block}")

    def get(self, block: int) -> int | None:
        """The offset of ``block``'s saved copy, or None."""
        off = lib.cg_overlay_get(self._p, _uint(block, "block"))
        return None if off < 0 else off

    def close(self) -> None:
        """The store has ended: engines reading it fail from now on."""
        lib.cg_overlay_close(self._p)

    def nbytes(self) -> int:
        """Memory held by the overlay, in bytes."""
        return lib.cg_overlay_bytes(self._p)


def _handle_pointer(h) -> int:
    """The ``struct nbd_handle *`` inside a python3-libnbd ``nbd.NBD``.

    python3-libnbd has no public accessor: its handle keeps the capsule in
    ``_o`` (nbd.py, every method passes it on), the one private name of
    another package this project reads."""
    p = _capsule_pointer(h._o, b"nbd_handle")
    if not p:
        raise ValueError("not an open libnbd handle")
    return p


class Engine:
    """Copy the set bits of ``blocks`` (blocks of ``granularity`` bytes of a
    volume of ``size`` bytes at ``fd``, with ``overlay`` laid over them) to
    the libnbd ``handles`` (one stream each, ``inflight`` requests each).

    ``partial``: {block: mask} of blocks of ``blocks`` of which only the
    dirty ``sub``-byte pieces are written (bit i: bytes [i*sub, (i+1)*sub)
    of the block; see "Sub-blocks" in copy.c).  ``packed``: the handles are
    connected to a cgmirror secondary's packed export, and every request is
    a batch of records ("Packed" in copy.c).

    The handles stay the caller's: keep them open while the engine runs,
    shut them down before ``close()``.
    """

    def __init__(self, handles, fd: int, overlay: Overlay | None, granularity: int,
                 size: int, blocks: Bitmap, max_run: int, flush_every: int,
                 inflight: int, timeout: float, partial: dict[int, int] | None = None,
                 sub: int | None = None, packed: bool = False):
        _need()
        if not handles:
            raise ValueError("at least one handle is needed")
        if not isinstance(blocks, Bitmap):
            raise TypeError("blocks must be a Bitmap")
        granularity, size = _uint(granularity, "granularity"), _uint(size, "size")
        if granularity == 0 or -(-size // granularity) != blocks.nbits:
            raise ValueError(f"{blocks.nbits} blocks do not cover {size} bytes"
                             f" at granularity {granularity}")
        for value, name in ((max_run, "max_run"), (inflight, "inflight")):
            if _uint(value, name) < 1:
                raise ValueError(f"{name} must be >= 1")
        if not timeout > 0:
            raise ValueError(f"timeout must be > 0, got {timeout}")
        sub = granularity if sub is None else _uint(sub, "sub")
        if sub == 0 or sub & (sub - 1) or granularity % sub:
            raise ValueError(f"sub must be a power of two dividing {granularity}, got {sub}")
        spb = granularity // sub
        wpb = (spb + 63) // 64
        keys = sorted(partial or {})
        masks = []
        for b in keys:
            m = _uint(partial[b], "mask")
            if not 0 < m < 1 << spb or not blocks.test(_uint(b, "block")):
                raise ValueError(f"record of block {b}: mask {m:#x} is not {spb} bits"
                                 f" of a block being copied")
            masks += [(m >> (64 * i)) & (2**64 - 1) for i in range(wpb)]
        self._pblocks = ffi.new("uint64_t[]", keys or [0])
        self._pmasks = ffi.new("uint64_t[]", masks or [0])
        # Kept referenced for the engine's life: C reads them.
        self._handles = list(handles)
        self._hp = ffi.new("void *[]", [ffi.cast("void *", _handle_pointer(h))
                                        for h in self._handles])
        self._blocks = blocks
        self._words = ffi.from_buffer("uint64_t[]", blocks.buffer())
        self._overlay = overlay
        p = lib.cg_copy_new(self._hp, len(self._handles), inflight, _uint(fd, "fd"),
                            overlay._p if overlay is not None else ffi.NULL,
                            granularity, size, self._words, blocks.nbits,
                            max_run, _uint(flush_every, "flush_every"),
                            max(1, int(timeout * 1000)), self._pblocks, self._pmasks,
                            len(keys), sub, 1 if packed else 0)
        if p == ffi.NULL:
            raise MemoryError("cannot allocate the copy engine's buffers")
        self._p = p
        self._events = ffi.new("uint64_t[]", 3 * _EVENTS_PER_TAKE)

    def run(self) -> None:
        """Copy; blocks without the GIL.  Raise EngineError on failure."""
        if lib.cg_copy_run(self._p) < 0:
            buf = ffi.new("char[]", 512)
            n = lib.cg_copy_error(self._p, buf, 512)
            raise EngineError(ffi.string(buf, n).decode(errors="replace"),
                              _FAULTS.get(lib.cg_copy_fault(self._p), "source"))

    def cancel(self) -> None:
        lib.cg_copy_cancel(self._p)

    def set_rate(self, bytes_per_s: int) -> None:
        """Limit the copy to ``bytes_per_s`` over all streams (0: no limit),
        at once, also while ``run`` blocks in another thread."""
        rate = _uint(bytes_per_s, "rate")
        if self._p is not None:         # closed: the copy is over anyway
            lib.cg_copy_set_rate(self._p, rate)

    def done_bytes(self) -> int:
        """Bytes of the blocks copied so far (acknowledged by the target)."""
        return lib.cg_copy_done_bytes(self._p)

    def sent_bytes(self) -> int:
        """Bytes written to the target so far (acknowledged): less than
        ``done_bytes`` where only a block's dirty pieces went."""
        return lib.cg_copy_sent_bytes(self._p)

    def take_events(self) -> list[tuple[int, int, int]]:
        """(CONFIRM | FLUSHED, start block, count) in the order they happened."""
        out = []
        while True:
            n = lib.cg_copy_take_events(self._p, self._events, _EVENTS_PER_TAKE)
            ev = self._events
            out += [(ev[3 * i], ev[3 * i + 1], ev[3 * i + 2]) for i in range(n)]
            if n < _EVENTS_PER_TAKE:
                return out

    def close(self) -> None:
        """Free the engine (after the handles were shut down).  Idempotent."""
        if self._p is not None:
            lib.cg_copy_free(self._p)
            self._p = None
            # A finished Copy may be kept (last_copy): let the handles go.
            self._handles = self._hp = self._words = self._blocks = self._overlay = None
            self._pblocks = self._pmasks = None
