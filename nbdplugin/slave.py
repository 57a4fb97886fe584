"""A primary slave: the volumes of one nbdkit process and their control ops
(the secondary role is secondary.py).

``Slave.handle(request) -> reply`` (server.OpHandler) is the whole control
surface; the socket server (server.py) only frames lines.  ``lock`` serialises
control operations; the I/O path never takes it.

The gates and the frozen phase of a cut are native (native/gate.py: ``core``):
FREEZE, THAW and ABORT reach it from this module's ops and also straight
from the coordinator through the gate socket that a C thread serves (beside
a unix control socket ``PATH.gate``; beside a TCP one a free port on the
same host, mutual TLS as on the control socket), so no Python thread has to
run for host writes to be held or released.  The core owns the lease and the
rules below for the frozen phase; once a cut is thawed it is this module's
(copy, abort, done) until ``core.end``.  This module catches up with the
core in ``_sync`` (PiTs, ``machine``): every op does it first, the first
writer that sees a new gate generation before it marks anything, and the
notify thread when the core froze or ended a cut on its own.

The control server (``start``, server.py) bounds and authenticates peers;
a freeze belongs to the connection that asked for it:

- A cut is owned by the connection that froze it.  If that connection ends
  (EOF, error, idle timeout) while the cut is FROZEN, the cut is aborted at
  once.  A freeze whose connection has already hung up (a coordinator that
  sent FREEZE and ABORT and gave up while this process was stopped) is
  refused before any gate closes.  Once thawed, the cut (CUT, COPYING) no
  longer depends on the connection: the coordinator closes its establish
  connections after THAW and drives copy and abort over others (its
  establish), and an unthawed gate is what holds host writes.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import ssl
import threading
from collections import deque

from wire import address as wire_address, lineage, protocol, tls
from wire.protocol import CutMachine, Event, Kind, Phase, ProtocolError

from .copier import SAMPLES, Copy, CopyError, PitSource, block_digest, verify_target
from wire.files import write_atomic
from native.gate import Core, GateRefused

from .server import (HANDSHAKE_TIMEOUT_S, IDLE_TIMEOUT_S, MAX_CONNECTIONS, Conn,
                     ControlServer, ControlServerError, OpHandler, listen_tcp,
                     listen_unix)
from .volume import Volume

log = logging.getLogger(__name__)


class Fence:
    """Host writes refused while up (``op_fence``).  Every host write of a
    primary runs between ``enter()`` and ``leave()`` (plugin.py);
    ``raise_`` returns only once the writes that got past the check have
    left.

    The write path takes no lock: it runs once per request, and a Condition
    taken twice per write was a measurable part of a 4 KiB write.  A write
    first registers itself (``_inside.append``) and only then reads ``up``;
    ``raise_`` first sets ``up`` and only then waits for ``_inside`` to
    empty.  Each of those steps is atomic (deque appends and pops are
    thread-safe; attribute reads and writes are single steps under the
    GIL), so of a write and a ``raise_`` either the registration comes
    first, and ``raise_`` waits for that write to leave, or ``up`` does, and
    the write sees it and is refused.  A leaving write takes the condition
    only while the fence is up, to wake ``raise_``; no wake-up is lost,
    because ``raise_`` sets ``up`` and checks ``_inside`` under the lock it
    waits with: a write that saw ``up`` clear had popped before that check.

    Rejected: a Condition around a counter (two lock round trips per write);
    reusing the volumes' gates (they hold writes, the fence refuses them, and
    the gate is one per volume while the fence is the slave's).
    """

    def __init__(self):
        self._cond = threading.Condition()
        self._inside: deque[None] = deque()
        self.up = False

    @property
    def inflight(self) -> int:
        """Host writes past the check and not yet left."""
        return len(self._inside)

    def enter(self) -> None:
        """Admit one host write, or raise OSError(EROFS) while the fence is up."""
        self._inside.append(None)
        if self.up:
            self.leave()
            raise OSError(errno.EROFS, "this primary is fenced for a switchover:"
                                       " host writes are refused")

    def leave(self) -> None:
        """The host write admitted by ``enter`` has finished."""
        self._inside.pop()
        if self.up:
            with self._cond:
                self._cond.notify_all()

    def raise_(self, timeout: float) -> None:
        with self._cond:
            self.up = True
            if not self._cond.wait_for(lambda: not self._inside, timeout):
                self.up = False
                raise ProtocolError(f"host writes in flight did not finish within"
                                    f" {timeout:g} s", Kind.TIMEOUT)

    def lower(self) -> None:
        with self._cond:
            self.up = False


def _clean_samples(vol: Volume) -> list[list]:
    """[[block, digest], ...]: up to SAMPLES blocks, one per stratum, that
    are not in the volume's ``cr | oos`` (read from the volume itself)."""
    dirty = vol.changes.dirty()
    g, nblocks = vol.granularity, vol.changes.nblocks
    strata = min(SAMPLES, nblocks)
    out = []
    for i in range(strata):
        lo, hi = i * nblocks // strata, (i + 1) * nblocks // strata
        b = dirty.next_clear(lo)
        if b is None or b >= hi:
            continue
        buf = bytearray(min(g, vol.size - b * g))
        vol.pread(buf, b * g)
        out.append([b, block_digest(buf)])
    return out


class StateError(Exception):
    """The slave's own state file is damaged; the message says what to do."""


class Slave(OpHandler):
    """The primary role: volumes with change maps, cuts and copies."""

    ROLE = "primary"
    OWNED_OPS = ("freeze",)

    def __init__(self, volumes: dict[str, Volume], statedir: str,
                 checkpoint_interval: float = 2.0):
        self.volumes = volumes
        self.statedir = statedir
        self.checkpoint_interval = checkpoint_interval
        self._meta = self._load_meta()
        self.machine = CutMachine(n=self._meta.get("last_n", 0))
        self.lock = threading.RLock()
        self.cut_volumes: list[str] = []
        self.copies: dict[str, Copy] = {}
        self.last_copy: dict | None = None
        self._stop = threading.Event()
        self.server: ControlServer | None = None
        self.fence = Fence()
        # The core writes a byte here at a freeze and when a cut ends while
        # frozen (the notify thread).
        self._notify_r, self._notify_w = os.pipe2(os.O_CLOEXEC)
        os.set_blocking(self._notify_w, False)
        self.core = Core(list(volumes), [v.gate for v in volumes.values()],
                         self.machine.n, self._notify_w)
        self._sync_lock = threading.Lock()      # the catch-up (_sync); after self.lock
        self._gen = 0                           # the core generation caught up with
        for name, vol in volumes.items():
            self.core.bitmaps(name, vol.changes.cr, vol.changes.oos)
            vol.catch_up = self._catch_up
        self.gate_socket = None
        self.gate_path: str | None = None
        self._notifier: threading.Thread | None = None
        self._full_copies: set[str] = set()

    def attach(self, node) -> None:
        """Serve as the node of ``node`` (a NodeRecord): the gate socket
        checks its session too, and a volume whose file was replaced
        behind the stopped node has no baseline on any target, whatever
        its samples would say.  Before ``start``."""
        super().attach(node)
        self.core.identity(node.session or "", node.who()[:150])
        # The gate socket's freeze compares the leader epoch with the one
        # recorded: the recorded one now, each new one once it is durable.
        self.core.set_epoch(node.epoch)
        self.epochs.on_raise = self.core.set_epoch
        for name in self.volumes:
            if node.replaced(name) and self.baseline(name) is not None:
                self._set_baseline(name, None)

    # ------------------------------------------------------------ persistence

    def _meta_path(self) -> str:
        return os.path.join(self.statedir, "slave.json")

    def _load_meta(self) -> dict:
        """The small state, checked: a damaged file stops the slave in one line
        rather than feeding a cut number no coordinator can use."""
        path = self._meta_path()
        try:
            with open(path, "rb") as f:
                meta = json.loads(f.read())
        except FileNotFoundError:
            return {}
        except ValueError as exc:
            raise StateError(f"{path} is not valid JSON ({exc}): the file is damaged;"
                             f" move it aside (the next copy of each volume is then full)")
        last_n = meta.get("last_n", 0) if isinstance(meta, dict) else None
        if isinstance(last_n, bool) or not isinstance(last_n, int) \
                or not 0 <= last_n <= protocol.MAX_N:
            raise StateError(f"{path}: last_n {last_n!r} is not a cut number: the file is"
                             f" damaged; move it aside (the next copy of each volume is"
                             f" then full)")
        return meta

    def _save_meta(self, sync: bool = True, **updates) -> None:
        """Persist the slave's small state (last cut number, synced targets);
        the in-memory copy changes only once the file is in place."""
        meta = {**self._meta, **updates}
        # With sync, which target is a baseline survives a power cut as
        # surely as the change bits it speaks for.
        write_atomic(self._meta_path(), json.dumps(meta).encode(), sync=sync)
        self._meta = meta

    def baseline(self, name: str) -> dict | None:
        """What the last completed copy of this volume recorded of its target:
        ``{"uri", "size", "granularity", "samples": [[block, digest], ...]}``
        (see ``copier.sample``), or None."""
        entry = self._meta.get("synced", {}).get(name)
        # An entry of an older version (a bare URI) carries no proof: the
        # next copy is a full one.
        return entry if isinstance(entry, dict) else None

    def synced_target(self, name: str) -> str | None:
        """The target that holds this volume as of its last completed copy."""
        base = self.baseline(name)
        return base["uri"] if base else None

    def _set_baseline(self, name: str, baseline: dict | None) -> None:
        synced = dict(self._meta.get("synced", {}))
        synced[name] = baseline
        self._save_meta(synced=synced)

    # ------------------------------------------------------------ control ops

    def _names(self, volumes: list[str] | None) -> list[str]:
        if volumes is None:
            return list(self.volumes)
        unknown = [v for v in volumes if v not in self.volumes]
        if unknown:
            raise ProtocolError(f"unknown volume {unknown[0]!r} (this slave has:"
                                f" {', '.join(self.volumes)})", Kind.UNKNOWN)
        if len(set(volumes)) != len(volumes) or not volumes:
            raise ProtocolError("'volumes' must name each volume once", Kind.PROTOCOL)
        return volumes

    def op_status(self) -> dict:
        with self.lock:
            st = self._sync()
            m = self.machine
            left = None
            if st.lease_left_ms is not None and st.n == m.n:
                left = round(st.lease_left_ms, 1)
            vols = {}
            for name, v in self.volumes.items():
                s = v.status()
                c = self.copies.get(name)
                s["copy"] = c.progress() if c else None
                s["synced_target"] = self.synced_target(name)
                s["lease_ms_left"] = left if name in self.cut_volumes else None
                vols[name] = s
            extra = {"gate": self.gate_path} if self.gate_path else {}
            extra.update(self.node_status(vols, lambda n: vols[n]["dirty_blocks"] > 0))
            return protocol.ok(pid=os.getpid(), role=self.ROLE, phase=m.phase.value, n=m.n,
                               ended=m.ended, volumes=vols, last_copy=self.last_copy,
                               **extra)

    def op_freeze(self, n: int, lease_ms: int, volumes: list | None = None,
                  full: list | None = None, owner: "Conn | None" = None) -> dict:
        """Cut n.  ``full`` names the volumes whose PiT will be copied whole
        (the others: only their changes), so the right blocks are preserved.
        ``owner``: the connection that asks; the cut is aborted when it ends."""
        with self.lock:
            self._sync()
            names = self._names(volumes)
            full = set(self._names(full) if full else ())
            if not full <= set(names):
                raise ProtocolError(f"'full' names {sorted(full - set(names))[0]!r},"
                                    f" which is not frozen", Kind.UNKNOWN)
            self.machine.check(Event.FREEZE, n)
            if owner is not None and owner.gone():
                # A late freeze: its coordinator gave up (and maybe sent an
                # abort we would never read).  Never close a gate for it.
                log.warning("cut %d: refused a freeze whose connection is gone", n)
                raise ProtocolError(f"cannot freeze cut {n}: the connection that"
                                    f" asked for it is gone", Kind.GONE)
            # No file work before the reply: the notify thread (woken at
            # the freeze) persists the cut number while the writers are held.
            drain_ms, blocks = self._core(self.core.freeze, n, lease_ms, names, sorted(full),
                                          owner.token if owner is not None else 0,
                                          persist=False)
            return protocol.ok(n=n, drain_ms=round(drain_ms, 3), blocks=blocks)

    def op_thaw(self, n: int) -> dict:
        with self.lock:
            self._sync()
            self.machine.check(Event.THAW, n)
            held_ms = self._core(self.core.thaw, n)
            return protocol.ok(n=n, held_ms=round(held_ms, 3))

    def _core(self, call, *args, persist: bool = True):
        """A core transition, then catch up; a refusal becomes the protocol's."""
        try:
            return call(*args)
        except GateRefused as exc:
            raise ProtocolError(str(exc), exc.kind) from None
        finally:
            self._sync(persist)

    def _remember(self, n: int) -> None:
        """Persist the last cut number.  Without fsync: a crash may forget
        it, and then the coordinator's history (which never reuses a number)
        still holds it."""
        if self._meta.get("last_n", 0) < n:
            self._save_meta(sync=False, last_n=n)

    def op_abort(self, n: int) -> dict:
        with self.lock:
            self._sync()
            phase = self.machine.phase
            if phase is Phase.COPYING:
                for c in self.copies.values():
                    c.cancelled.set()
                # The copy threads end the cut; wait for them outside our lock.
            elif phase is Phase.FROZEN:
                self.machine.check(Event.ABORT, n)
                self._core(self.core.abort, n)
                return protocol.ok(n=n)
            else:
                self.machine.check(Event.ABORT, n)
                self._end_thawed(Event.ABORT, "aborted")
                return protocol.ok(n=n)
        self._join_copies()
        with self.lock:
            if self.machine.phase is Phase.COPYING and self.machine.n == n:
                self._finish_copy()
            return protocol.ok(n=n)

    def _end_thawed(self, event: Event, ended: str) -> None:
        """End the thawed cut (CUT or COPYING) here and hand it back to the
        core; unconfirmed blocks go back into cr (lock held)."""
        with self._sync_lock:
            n = self.machine.n
            for name in self.cut_volumes:
                self.volumes[name].end_pit()
            self.machine.step(event, n, ended=ended)
            self.cut_volumes = []
            if not self.core.end(n, ended):     # a thawed cut is the core's "cut"
                log.error("cut %d: the gate core was not in it when it ended", n)
        self._sync()

    def _catch_up(self) -> None:
        """A writer saw a gate generation it has not caught up with."""
        self._sync(persist=False)

    def _sync(self, persist: bool = True):
        """Bring ``machine`` and the PiTs up to the core's state; return it.

        A cut the core ended while frozen (abort, lease, its connection) has
        its PiTs dropped (their blocks back into cr); a cut the core took is
        taken here (``start_pit``: cr -> oos, preservation on) before any
        write of the new generation marks or writes, since every such writer
        comes through here first.  ``persist``: also persist the cut number
        (file work: never on the write path, nor before a freeze's reply)."""
        with self._sync_lock:
            st = self.core.state()
            if st.gen != self._gen:
                self._catch_up_with(st)
        if persist:
            self._remember(self.machine.n)
        return st

    def _catch_up_with(self, st) -> None:
        """_sync's work on a core state not seen yet (``_sync_lock`` held)."""
        m = self.machine
        if m.phase is not Phase.IDLE and (st.phase == "idle" or st.n != m.n):
            for name in self.cut_volumes:
                self.volumes[name].end_pit()
            m.phase, m.ended = Phase.IDLE, st.ended if st.n == m.n else "aborted"
            self.cut_volumes = []
        if st.phase != "idle" and m.phase is Phase.IDLE:
            for name in st.volumes:
                self.volumes[name].start_pit(st.n, name in st.full)
            self.cut_volumes = st.volumes
            m.phase, m.n, m.ended = Phase(st.phase), st.n, None
        elif st.phase == "cut" and m.phase is Phase.FROZEN:
            m.phase = Phase.CUT
        elif st.phase == "idle" and st.n > m.n:
            m.n, m.ended = st.n, st.ended       # taken and ended unseen
        self._gen = st.gen
        for vol in self.volumes.values():
            vol.gen = st.gen

    def op_copy(self, n: int, targets: dict, mode: str = "auto", inflight: int = 8,
                timeout_ms: int = 30000, rate: int = 0) -> dict:
        with self.lock:
            self._sync()
            names = self._names(list(targets))
            missing = [v for v in self.cut_volumes if v not in targets]
            extra = [v for v in names if v not in self.cut_volumes]
            if extra:
                raise ProtocolError(f"volume {extra[0]!r} is not in cut {n}", Kind.UNKNOWN)
            if missing:
                raise ProtocolError(f"cut {n} needs a target for {missing[0]!r}", Kind.PROTOCOL)
            self.machine.check(Event.COPY, n)
            plans = {}
            for name in names:
                vol, uri = self.volumes[name], targets[name]
                pit = vol.pit
                if pit.broken:
                    raise ProtocolError(f"cut {n} cannot be copied: {pit.broken};"
                                        f" abort it and cut again", Kind.BROKEN)
                cut_as = "full" if pit.full else "incremental"
                if mode not in ("auto", cut_as):
                    raise ProtocolError(
                        f"cut {n} of {name} was taken for a {cut_as} copy, not {mode}:"
                        f" name the volume in freeze's 'full' for a full copy", Kind.MODE)
                if not pit.full and self.synced_target(name) != uri:
                    raise ProtocolError(
                        f"{name} has no completed copy on {uri}: run a full copy first",
                        Kind.BASELINE)
                plans[name] = (uri, not pit.full)
            for name, (_, incremental) in plans.items():
                if not incremental and self.synced_target(name) is not None:
                    # Bits cleared by this copy were changes relative to the
                    # old target too: it is no longer a baseline.  (Done before
                    # any state changes: if it fails, nothing happened.)
                    self._set_baseline(name, None)
            for name, (_, incremental) in plans.items():
                if incremental:
                    self._drop_samples(name, self.volumes[name].pit.remaining())
            if self.node is not None:
                # Durable before the drain writes: from here on the peer may
                # hold blocks of cut n it never hardens (wire/lineage.py, "cut").
                if any(self.node.lineage(v)["cut"] < n for v in plans):
                    self.node.set_lineages(lambda _, lin: {**lin, "cut": max(lin["cut"], n)},
                                           volumes=plans)
            self._full_copies = {v for v, (_, incremental) in plans.items() if not incremental}
            self.machine.step(Event.COPY, n)
            # An incremental copy first checks that the target still holds
            # the baseline (and refuses, naming --full, if not).
            self.copies = {name: Copy(PitSource(self.volumes[name]), uri, inflight=inflight,
                                      timeout=timeout_ms / 1000, rate=rate,
                                      baseline=self.baseline(name) if incremental else None)
                           for name, (uri, incremental) in plans.items()}
            for name, c in self.copies.items():
                t = threading.Thread(target=self._run_copy, args=(c,),
                                     name=f"copy-{name}", daemon=True)
                c.thread = t
                t.start()
            return protocol.ok(n=n, modes={k: "incremental" if p[1] else "full"
                                           for k, p in plans.items()},
                               bytes={k: c.total_bytes for k, c in self.copies.items()})

    def _drop_samples(self, name: str, sending) -> None:
        """The blocks a copy is about to send change on the target from its
        first write on: their samples stop speaking for it, durably before
        anything is sent -- a slave killed mid-copy may come back with those
        blocks clean (confirmed, flushed and checkpointed) but no new samples."""
        base = self.baseline(name)
        kept = [[b, d] for b, d in base["samples"] if not sending.test(b)]
        if len(kept) != len(base["samples"]):
            self._set_baseline(name, {**base, "samples": kept})

    def op_rate(self, rate: int) -> dict:
        """Limit each running copy to ``rate`` bytes per second from now on
        (0: no limit); the next copy takes its own from its ``copy`` op."""
        with self.lock:
            copies = dict(self.copies or {})
        for c in copies.values():
            c.set_rate(rate)
        return protocol.ok(copies=sorted(copies))

    def op_checksums(self, volume: str, start: int, count: int,
                     block: int | None = None) -> dict:
        """Digests of blocks [start, start+count) as the volume holds them
        now (online verify, coordinator/mirror/verify.py), read here so that only
        digests cross the link.  A block that is changed since the last group
        (in cr or oos before or after its read: the host write path marks
        before it writes) gets null: its content is not a group's.  Host
        writes go on meanwhile; nothing is held."""
        name = self._names([volume])[0]
        vol = self.volumes[name]
        g = vol.granularity
        if block not in (None, g):
            raise ProtocolError(f"{name} has granularity {g}, not {block}", Kind.PROTOCOL)
        if start + count > vol.changes.nblocks:
            raise ProtocolError(f"blocks [{start}, +{count}) beyond the"
                                f" {vol.changes.nblocks} of {name}", Kind.PROTOCOL)
        before = vol.changes.dirty()
        buf = bytearray(g)
        data = []
        for b in range(start, start + count):
            length = min(g, vol.size - b * g)
            view = memoryview(buf)[:length]
            vol.pread(view, b * g)
            data.append(block_digest(view))
        after = vol.changes.dirty()
        digests = [None if before.test(b) or after.test(b) else d
                   for b, d in zip(range(start, start + count), data)]
        return protocol.ok(volume=name, start=start, block=g, digests=digests)

    def op_verify(self, targets: dict, timeout_ms: int = 30000) -> dict:
        """Before a cut for incremental copies: does each target still hold
        the baseline of its volume (see copier.check_baseline)?  Replies
        ``failed``: {volume: one line naming --full}.  A volume whose last
        completed copy is not on that target has nothing to verify (it will
        be copied whole).  The reads run outside the lock: a slow target
        delays only this reply."""
        with self.lock:
            todo = [(name, targets[name], self.baseline(name))
                    for name in self._names(list(targets))]
        failed = {}
        for name, uri, base in todo:
            if base is not None and base["uri"] == uri:
                try:
                    verify_target(uri, base, self.volumes[name], timeout_ms / 1000)
                except CopyError as exc:
                    failed[name] = str(exc)
        return protocol.ok(failed=failed)

    def _run_copy(self, copy: Copy) -> None:
        copy.run()
        with self.lock:
            if all(c.finished for c in self.copies.values()) and \
                    self.machine.phase is Phase.COPYING:
                self._finish_copy()

    def _join_copies(self) -> None:
        for c in list(self.copies.values()):
            c.thread.join()

    def _finish_copy(self) -> None:
        """Every copy thread has ended: record, end the cut (lock held)."""
        n = self.machine.n
        ok = all(c.state == "done" for c in self.copies.values())
        for name, c in self.copies.items():
            # Done: fresh samples; failed: what still speaks for the target
            # (see Copy.baseline).
            if c.baseline != self.baseline(name):
                self._set_baseline(name, c.baseline)
        self.last_copy = {"n": n, "ok": ok,
                          "volumes": {k: c.progress() for k, c in self.copies.items()}}
        joined = [k for k, c in self.copies.items()
                  if c.state == "done" and k in self._full_copies
                  and self.node is not None and self.node.replaced(k)]
        if joined:
            # A replaced file copied whole: the pair holds one image again.
            self.node.update(lambda d: [d["volumes"][k].update(replaced=None)
                                        for k in joined])
        self._end_thawed(Event.COPY_DONE if ok else Event.COPY_FAILED,
                         "done" if ok else "failed")

    def op_clear(self, volumes: list | None = None) -> dict:
        with self.lock:
            self._sync()
            names = self._names(volumes)
            if self.machine.phase is not Phase.IDLE:
                raise ProtocolError(f"cannot clear while cut {self.machine.n} is"
                                    f" {self.machine.phase.value}", Kind.BUSY)
            for name in names:
                self.volumes[name].changes.clear()
            return protocol.ok(volumes=names)

    def op_dirty(self, volume: str, start: int = 0, max_runs: int = 20_000) -> dict:
        """One page of the runs of changed blocks, from block ``start``."""
        name = self._names([volume])[0]
        vol = self.volumes[name]
        return protocol.runs_page(name, vol.granularity, vol.changes.dirty(), start,
                                  max_runs)

    def op_mark(self, volume: str, runs: list) -> dict:
        """Set blocks in ``cr``, durable on return: the blocks a secondary
        rolled back (it had confirmed them, so their change bits are gone)
        are sent again with the next group.  Allowed in any phase, a cut
        included: ``cr`` is the *next* group, which a cut never touches
        (it moved the old ``cr`` into ``oos`` when it froze).  The marking
        goes through the change map's write path, so the write-intent map
        makes it crash-safe before the reply."""
        name = self._names([volume])[0]
        vol = self.volumes[name]
        g = vol.granularity
        protocol.check_runs(runs, vol.changes.nblocks, name)
        with self.lock:
            self._sync()        # a cut taken on the gate socket takes its cr first
        for start, count in runs:
            vol.changes.mark(start * g, min(count * g, vol.size - start * g))
        return protocol.ok(volume=name, blocks=sum(c for _, c in runs))

    def op_checkpoint(self) -> dict:
        return protocol.ok(written=[n for n, v in self.volumes.items()
                                    if v.changes.checkpoint()])

    # ------------------------------------------------------------ role switch
    # (coordinator/roles/failover.py drives these; the module doc there says why)

    def op_fence(self, on: bool, timeout_ms: int = 30000) -> dict:
        """``on``: refuse every new host write (EROFS) and wait for those in
        flight, so that a cut taken after the reply holds every write the
        host ever had acknowledged (a switchover's last group).  ``off``
        takes writes again.  Not kept across a restart: a fenced primary is
        about to restart as a secondary, whose host export is read-only."""
        if on:
            self.fence.raise_(timeout_ms / 1000)
        else:
            self.fence.lower()
        return protocol.ok(fenced=on)

    def op_adopt(self, volume: str, target: str, forget: bool = False) -> dict:
        """Record ``target`` as holding the baseline of ``volume`` without a
        copy: the caller (a resync) vouches that the target and this volume
        held the same hardened group and that every block written since on
        either side is now in this volume's ``cr | oos`` (its own writes,
        and the target's ``tgt`` marked here).  The samples are this
        volume's own clean blocks, which the target must hold too: the
        ``verify`` before the next incremental copy reads them back there,
        so a wrong target is still caught.  ``forget``: drop any baseline
        instead, so that the next copy is a full one (``resync --full``)."""
        with self.lock:
            self._sync()
            name = self._names([volume])[0]
            if self.machine.phase is not Phase.IDLE:
                raise ProtocolError(f"cannot adopt a baseline while cut {self.machine.n}"
                                    f" is {self.machine.phase.value}", Kind.BUSY)
            if forget:
                self._set_baseline(name, None)
                return protocol.ok(volume=name, samples=0)
            vol = self.volumes[name]
            samples = _clean_samples(vol)
            self._set_baseline(name, {"uri": target, "size": vol.size,
                                      "granularity": vol.granularity, "samples": samples})
            return protocol.ok(volume=name, samples=len(samples))

    def _leave_role(self, to: str):
        """Before ``role secondary``: no cut may be in progress (kind busy);
        host writes are fenced from here to the exit (a write after the
        record would be a write the lineage does not know of); the maps
        are checkpointed, and each volume's own writes (any cr|oos bit)
        are what demotion records (lineage event 3)."""
        with self.lock:
            self._sync()
            m = self.machine
            if m.phase is not Phase.IDLE:
                raise ProtocolError(f"cannot become a {to} while cut {m.n} is"
                                    f" {m.phase.value}: abort it, or wait for its copy",
                                    Kind.BUSY)
            was_up = self.fence.up
            self.fence.raise_(30.0)
            try:
                for vol in self.volumes.values():
                    vol.changes.checkpoint()
                dirty = {name: vol.changes.dirty().any()
                         for name, vol in self.volumes.items()}
            except BaseException:
                if not was_up:
                    self.fence.lower()
                raise

        def undo():
            if not was_up:
                self.fence.lower()
        return (lambda name, lin: lineage.demote(lin, dirty[name])), undo

    # ------------------------------------------------------------ threads

    def start(self, address: str, ssl_context: ssl.SSLContext | None = None, *,
              tls_files: tls.HostFiles | None = None,
              max_connections: int = MAX_CONNECTIONS, idle_timeout: float = IDLE_TIMEOUT_S,
              handshake_timeout: float = HANDSHAKE_TIMEOUT_S) -> None:
        """Start the control server (see ``ControlServer.start``), the gate
        socket (a unix control socket: ``PATH.gate`` beside it; TCP, given
        ``tls_files``, the certificate files of ``ssl_context``: a free port
        on the same host, with mutual TLS), and the notify and checkpoint
        threads (after fork).  Raises ``ControlServerError`` (one line) if a
        server cannot start."""
        self.server = ControlServer(self, max_connections=max_connections,
                                    idle_timeout=idle_timeout,
                                    handshake_timeout=handshake_timeout)
        self.server.start(address, ssl_context)
        self.core.start()
        try:
            path = (self.server.control_path or "") + ".gate"
            if self.server.control_path and len(path.encode()) > wire_address.MAX_UNIX_PATH:
                # The coordinator then freezes over the control socket.
                log.warning("no gate socket: %s is longer than %d bytes (shorten the"
                            " control path for GIL-free freezes)", path,
                            wire_address.MAX_UNIX_PATH)
            elif self.server.control_path:
                self.gate_path = path
                self.gate_socket = listen_unix(self.gate_path)
                self.core.serve(self.gate_socket.fileno(), os.getuid())
            elif tls_files is not None:
                host = wire_address.parse(self.server.address).host
                self.gate_socket, self.gate_path = listen_tcp(host, 0)
                self.core.serve_tls(self.gate_socket.fileno(), tls_files.ca,
                                    tls_files.server_cert, tls_files.server_key)
        except (ControlServerError, OSError) as exc:
            self.server.close()
            raise ControlServerError(f"gate socket {self.gate_path or ''}: {exc}") from None
        self._notifier = threading.Thread(target=self._notify_loop, name="notify",
                                          daemon=True)
        self._notifier.start()
        threading.Thread(target=self._checkpoint_loop, name="checkpoint", daemon=True).start()

    # The server's view, for callers and tests that knew it as the slave's.
    address = property(lambda self: self.server.address)
    control_path = property(lambda self: self.server.control_path)

    def connection_closed(self, conn: Conn, why: str) -> None:
        """A connection ended: a cut it froze and did not thaw is aborted now
        (the lease is only the last line of defence); the core logs it."""
        self.core.owner_gone(conn.token)
        with self.lock:
            self._sync()

    def _notify_loop(self) -> None:
        """Catch up when the core froze (take the cut while the writers are
        held, so the first one after the thaw finds it taken) or ended a cut
        while frozen (abort, lease, its connection: drop its PiTs, persist
        the cut number)."""
        while True:
            try:
                os.read(self._notify_r, 512)
            except OSError:
                return
            if self._stop.is_set():
                return
            with self.lock:
                self._sync()

    def _checkpoint_loop(self) -> None:
        while not self._stop.wait(self.checkpoint_interval):
            for vol in self.volumes.values():
                try:
                    vol.changes.checkpoint()
                except OSError:
                    log.exception("checkpoint of %s failed; will retry", vol.name)

    def shutdown(self) -> None:
        """Clean stop: end any cut (changes go back to cr), checkpoint, close."""
        self._stop.set()
        os.write(self._notify_w, b"\0")        # wake the notify thread to stop
        if self.server is not None:
            self.server.close()
        with self.lock:
            for c in self.copies.values():
                c.cancelled.set()
        for c in list(self.copies.values()):
            if c.thread is not None:
                c.thread.join(timeout=30)
        self.core.close()                       # the gate socket's thread; gates open
        if self._notifier is not None:
            self._notifier.join(timeout=30)
        os.close(self._notify_r)                # the core no longer writes here
        os.close(self._notify_w)
        if self.gate_socket is not None:
            self.gate_socket.close()
            if self.server.control_path:
                try:
                    os.unlink(self.gate_path)
                except FileNotFoundError:
                    pass
        for vol in self.volumes.values():
            vol.close()
