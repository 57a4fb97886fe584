"""The freeze gates of a slave and the frozen phase of its cuts (native/gate.c).

This module is the only importer of the cffi extension ``native._gate``.
No cffi object leaves it; refusals raise ``GateRefused`` with the protocol
kind (a ``wire.protocol.Kind`` value) and one line.

``Gate``   one volume's gate.  ``enter()`` (the write path; without the GIL
           while it waits) returns the generation the core last gave it.
``Core``   a slave's cut state while frozen: ``freeze``/``thaw``/``abort``
           (from the Python control server) and the same three served by a C
           thread on a unix socket (``serve``) or over TCP with mutual TLS
           (``serve_tls``) with no Python involved;
           ``end`` hands a thawed cut back; ``state`` is how Python catches up.
"""

from __future__ import annotations

from dataclasses import dataclass

from native._gate import ffi, lib
from wire.protocol import MAX_N

__all__ = ["Core", "Gate", "GateRefused", "State", "PHASES", "ENDED"]

PHASES = {lib.CG_IDLE: "idle", lib.CG_FROZEN: "frozen", lib.CG_CUT: "cut"}
ENDED = {lib.CG_ENDED_NONE: None, lib.CG_ENDED_ABORTED: "aborted",
         lib.CG_ENDED_EXPIRED: "expired", lib.CG_ENDED_DONE: "done",
         lib.CG_ENDED_FAILED: "failed"}
_ENDED_CODE = {v: k for k, v in ENDED.items() if v}
MAX_VOLUMES = lib.CG_MAX_VOLUMES      # wire.protocol.MAX_SLAVE_VOLUMES, via native/_limits.h


class GateRefused(Exception):
    """The core refused a transition; ``kind`` is a protocol Kind value."""

    def __init__(self, kind: str, message: str):
        super().__init__(message)
        self.kind = kind


class Gate:
    """See native/gate.c.  Thread-safe."""

    __slots__ = ("_g", "enter", "leave")

    def __init__(self) -> None:
        g = lib.cg_gate_new()
        if g == ffi.NULL:
            raise MemoryError("cg_gate_new")
        self._g = ffi.gc(g, lib.cg_gate_unref)
        # Bound once: the write path calls these for every request.
        self.enter = lambda g=self._g, f=lib.cg_gate_enter, null=ffi.NULL: f(g, null)
        self.leave = lambda g=self._g, f=lib.cg_gate_leave: f(g)

    def enter_seq(self) -> int:
        """``enter()``, returning the request's place in the order of
        admission (0, 1, ...) instead of the generation."""
        seq = ffi.new("uint64_t *")
        lib.cg_gate_enter(self._g, seq)
        return seq[0]

    def close(self, timeout: float) -> bool:
        """Close; wait up to ``timeout`` s for requests inside to leave.
        False: they did not (the gate stays closed)."""
        return bool(lib.cg_gate_close(self._g, max(0.0, float(timeout))))

    def open(self) -> float:
        """Open; return how long the gate was closed, in seconds."""
        return lib.cg_gate_open(self._g)

    def _info(self) -> tuple[bool, int, int]:
        closed, inside, waiting = ffi.new("int *"), ffi.new("int64_t *"), ffi.new("int64_t *")
        lib.cg_gate_info(self._g, closed, inside, waiting)
        return bool(closed[0]), inside[0], waiting[0]

    closed = property(lambda self: self._info()[0])
    inside = property(lambda self: self._info()[1])
    waiting = property(lambda self: self._info()[2])


@dataclass(frozen=True)
class State:
    phase: str                  # "idle", "frozen", "cut" (thawed, Python's now)
    n: int
    ended: str | None
    volumes: list[str]
    full: list[str]
    gen: int
    lease_left_ms: float | None


class Core:
    """The frozen phase of a slave's cuts over ``gates`` (one per name in
    ``names``, in order).  ``last_n``: the last cut number used; ``notify_fd``:
    the write end of a non-blocking pipe that gets a byte at a freeze and
    when a cut ends while frozen (abort, lease, its connection)."""

    def __init__(self, names: list[str], gates: list[Gate], last_n: int,
                 notify_fd: int = -1) -> None:
        if not 0 < len(names) <= MAX_VOLUMES or len(gates) != len(names):
            raise ValueError(f"a core serves 1 to {MAX_VOLUMES} volumes, one gate each")
        self.names = list(names)
        self._index = {name: i for i, name in enumerate(names)}
        self._bitmaps: list = []        # keeps registered bitmaps alive
        arr = ffi.new("cg_gate *[]", [g._g for g in gates])
        c = lib.cg_core_new(arr, len(gates), "\n".join(names).encode(), last_n, notify_fd)
        if c == ffi.NULL:
            raise RuntimeError("cg_core_new failed (volume names too long?)")
        self._c = ffi.gc(c, lib.cg_core_free)

    def bitmaps(self, name: str, cr, oos) -> None:
        """Let the freeze count a volume's cut (``cr | oos``) in C."""
        self._bitmaps.append((cr, oos))
        lib.cg_core_bitmaps(self._c, self._index[name], ffi.cast("uint64_t *", cr.address),
                            ffi.cast("uint64_t *", oos.address), cr.nwords)

    def _mask(self, names) -> int:
        mask = 0
        for name in names:
            mask |= 1 << self._index[name]
        return mask

    def _names(self, mask: int) -> list[str]:
        return [n for i, n in enumerate(self.names) if mask >> i & 1]

    @staticmethod
    def _refused(r) -> GateRefused:
        return GateRefused(ffi.string(r.kind).decode(), ffi.string(r.msg).decode())

    def freeze(self, n: int, lease_ms: int, volumes: list[str], full: list[str],
               owner: int = 0) -> tuple[float, dict[str, int]]:
        """Close the volumes' gates, wait for writes inside, take cut n:
        (drain_ms, blocks per volume).  Waits without the GIL."""
        r = ffi.new("struct cg_result *")
        if lib.cg_freeze(self._c, n, lease_ms, self._mask(volumes), self._mask(full),
                         owner, r) < 0:
            raise self._refused(r)
        return r.drain_ms, {v: r.blocks[self._index[v]] for v in volumes}

    def thaw(self, n: int) -> float:
        """FROZEN n -> CUT n, gates open (held writes go in arrival order): held_ms."""
        r = ffi.new("struct cg_result *")
        if lib.cg_thaw(self._c, n, r) < 0:
            raise self._refused(r)
        return r.held_ms

    def abort(self, n: int) -> None:
        """FROZEN n -> IDLE (aborted), gates open."""
        r = ffi.new("struct cg_result *")
        if lib.cg_abort(self._c, n, r) < 0:
            raise self._refused(r)

    def end(self, n: int, ended: str) -> bool:
        """A thawed cut n ended in Python (``ended``: done, failed, aborted)."""
        return lib.cg_end(self._c, n, _ENDED_CODE[ended]) == 0

    def owner_gone(self, owner: int) -> None:
        """The connection ``owner`` ended: a cut it froze is aborted."""
        lib.cg_owner_gone(self._c, owner)

    def state(self) -> State:
        s = ffi.new("struct cg_state *")
        lib.cg_state(self._c, s)
        return State(phase=PHASES[s.phase], n=s.n, ended=ENDED.get(s.ended),
                     volumes=self._names(s.volumes), full=self._names(s.full), gen=s.gen,
                     lease_left_ms=s.lease_left_ms if s.phase == lib.CG_FROZEN else None)

    def serve_tls(self, listen_fd: int, ca: str, cert: str, key: str) -> None:
        """Serve freeze/thaw/abort on ``listen_fd`` (a listening TCP socket
        the caller keeps open), mutual TLS 1.3 from these files as in
        wire/tls.py; ``OSError`` (one line) if they do not load."""
        err = ffi.new("char[]", 256)
        if lib.cg_serve_tls(self._c, listen_fd, ca.encode(), cert.encode(), key.encode(),
                            err, 256) < 0:
            raise OSError(ffi.string(err).decode(errors="replace"))

    def identity(self, session: str, who: str) -> None:
        """The node's session ("": none) and its name in refusals; before
        ``start``.  The gate socket then refuses another session's requests."""
        if lib.cg_core_identity(self._c, session.encode(), who.encode()) < 0:
            raise ValueError(f"session {session!r} or {who!r} is too long for the gate")

    def set_epoch(self, epoch: int) -> None:
        """The leader epoch the node has recorded (it only grows; 0: none):
        the gate socket refuses a freeze carrying another, kind "fenced".
        Call it after node.json holds it (nbdplugin/epoch.py)."""
        if not 0 <= epoch <= MAX_N:
            raise ValueError(f"epoch {epoch} is out of range 0..{MAX_N}")
        lib.cg_core_set_epoch(self._c, epoch)

    def start(self) -> None:
        """Start the C thread (lease timer, gate socket); after any fork."""
        if lib.cg_core_start(self._c) < 0:
            raise OSError("cannot start the gate thread")

    def serve(self, listen_fd: int, uid: int) -> None:
        """Serve freeze/thaw/abort on ``listen_fd`` (a listening unix
        socket the caller keeps open) from the C thread; peers: root, uid."""
        lib.cg_serve(self._c, listen_fd, uid)

    def close(self) -> None:
        """Stop the C thread and open every gate; later freezes are refused
        (idempotent; the memory goes with this object)."""
        lib.cg_core_stop(self._c)
