"""A slave: the volumes of one nbdkit process and their control channel.

``Slave.handle(request) -> reply`` is the whole control surface; the socket
server below only frames lines.  ``lock`` serialises control operations (a
freeze, thaw, abort, lease expiry or copy end never interleave); the I/O path
never takes it.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time

from . import protocol
from .changemap import fsync_dir
from .copier import Copy, CopyError, PitSource, verify_target
from .protocol import CutMachine, Event, Phase, ProtocolError
from .volume import Volume

log = logging.getLogger(__name__)


class Slave:
    def __init__(self, volumes: dict[str, Volume], statedir: str,
                 checkpoint_interval: float = 2.0):
        self.volumes = volumes
        self.statedir = statedir
        self.checkpoint_interval = checkpoint_interval
        self._meta = self._load_meta()
        self.machine = CutMachine(n=self._meta.get("last_n", 0))
        self.lock = threading.RLock()
        self.cut_volumes: list[str] = []
        self.lease_deadline: float | None = None
        self.copies: dict[str, Copy] = {}
        self.last_copy: dict | None = None
        self._stop = threading.Event()
        self._lease_wake = threading.Event()
        self._server: socket.socket | None = None

    # ------------------------------------------------------------ persistence

    def _meta_path(self) -> str:
        return os.path.join(self.statedir, "slave.json")

    def _load_meta(self) -> dict:
        try:
            with open(self._meta_path()) as f:
                return json.load(f)
        except FileNotFoundError:
            return {}

    def _save_meta(self, sync: bool = True, **updates) -> None:
        """Persist the slave's small state (last cut number, synced targets);
        the in-memory copy changes only once the file is in place."""
        meta = {**self._meta, **updates}
        tmp = self._meta_path() + ".tmp"
        # 0600 whatever the umask: it says which target holds this volume.
        with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600),
                       "w") as f:
            json.dump(meta, f)
            f.flush()
            if sync:
                os.fsync(f.fileno())
        os.rename(tmp, self._meta_path())
        if sync:
            # Which target is a baseline must survive a power cut as surely
            # as the change bits it speaks for.
            fsync_dir(self.statedir)
        self._meta = meta

    def baseline(self, name: str) -> dict | None:
        """What the last completed copy of this volume recorded of its target:
        ``{"uri", "size", "granularity", "samples": [[block, digest], ...]}``
        (see ``Copy._sample``), or None."""
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

    def handle(self, line: bytes | str) -> dict:
        """Decode, validate and execute one request; always return a reply."""
        try:
            msg = protocol.decode(line)
            op = msg.pop("op")
            return getattr(self, "op_" + op)(**msg)
        except ProtocolError as exc:
            return protocol.error(str(exc), exc.kind)
        except Exception as exc:  # a local failure: report it, keep serving
            log.exception("control op failed")
            return protocol.error(f"slave failed: {exc}", "local")

    def _names(self, volumes: list[str] | None) -> list[str]:
        if volumes is None:
            return list(self.volumes)
        unknown = [v for v in volumes if v not in self.volumes]
        if unknown:
            raise ProtocolError(f"unknown volume {unknown[0]!r} (this slave has:"
                                f" {', '.join(self.volumes)})", "unknown")
        if len(set(volumes)) != len(volumes) or not volumes:
            raise ProtocolError("'volumes' must name each volume once", "protocol")
        return volumes

    def op_status(self) -> dict:
        with self.lock:
            m = self.machine
            left = None
            if m.phase is Phase.FROZEN and self.lease_deadline:
                left = max(0.0, round((self.lease_deadline - time.monotonic()) * 1000, 1))
            vols = {}
            for name, v in self.volumes.items():
                s = v.status()
                c = self.copies.get(name)
                s["copy"] = c.progress() if c else None
                s["synced_target"] = self.synced_target(name)
                s["lease_ms_left"] = left if name in self.cut_volumes else None
                vols[name] = s
            return protocol.ok(pid=os.getpid(), phase=m.phase.value, n=m.n,
                               ended=m.ended, volumes=vols, last_copy=self.last_copy)

    def op_freeze(self, n: int, lease_ms: int, volumes: list | None = None,
                  full: list | None = None) -> dict:
        """Cut n.  ``full`` names the volumes whose PiT will be copied whole
        (the others: only their changes), so the right blocks are preserved."""
        with self.lock:
            names = self._names(volumes)
            full = set(self._names(full) if full else ())
            if not full <= set(names):
                raise ProtocolError(f"'full' names {sorted(full - set(names))[0]!r},"
                                    f" which is not frozen", "unknown")
            self.machine.check(Event.FREEZE, n)
            vols = [self.volumes[name] for name in names]
            t0 = time.monotonic()
            budget = min(lease_ms / 1000.0, 30.0)
            try:
                # Close every gate first, then wait: the waits overlap.
                for vol in vols:
                    vol.gate.close(0)
                for vol in vols:
                    left = budget - (time.monotonic() - t0)
                    if not vol.gate.close(max(0.0, left)):
                        raise ProtocolError(
                            f"cannot freeze cut {n}: writes to {vol.name} did not"
                            f" finish within {budget * 1000:.0f} ms", "timeout")
                drain_ms = (time.monotonic() - t0) * 1000
                blocks = {vol.name: vol.start_pit(n, vol.name in full) for vol in vols}
            except BaseException:
                for vol in vols:
                    if vol.pit is not None:
                        vol.end_pit()
                    vol.gate.open()
                raise
            self.machine.step(Event.FREEZE, n)
            self.cut_volumes = names
            self.lease_deadline = t0 + lease_ms / 1000.0
            self._lease_wake.set()
            return protocol.ok(n=n, drain_ms=round(drain_ms, 3), blocks=blocks)

    def op_thaw(self, n: int) -> dict:
        with self.lock:
            self.machine.step(Event.THAW, n)
            held = max(self.volumes[v].gate.open() for v in self.cut_volumes)
            self.lease_deadline = None
            self._remember(n)
            return protocol.ok(n=n, held_ms=round(held * 1000, 3))

    def _remember(self, n: int) -> None:
        """Persist the cut number once the gates are open again: file work
        during a freeze would delay the whole group's thaw.  Without fsync: a
        crash may forget it, and then the coordinator's history (which never
        reuses a number) still holds it."""
        if self._meta.get("last_n", 0) < n:
            self._save_meta(sync=False, last_n=n)

    def op_abort(self, n: int) -> dict:
        with self.lock:
            phase = self.machine.phase
            if phase is Phase.COPYING:
                for c in self.copies.values():
                    c.cancelled.set()
                # The copy threads end the cut; wait for them outside our lock.
            else:
                self.machine.step(Event.ABORT, n, ended="aborted")
                self._end_cut()
                return protocol.ok(n=n)
        self._join_copies()
        with self.lock:
            if self.machine.phase is Phase.COPYING and self.machine.n == n:
                self._finish_copy()
            return protocol.ok(n=n)

    def _end_cut(self) -> None:
        for name in self.cut_volumes:
            vol = self.volumes[name]
            vol.end_pit()
            vol.gate.open()
        self.lease_deadline = None
        self._remember(self.machine.n)

    def expire_lease(self) -> None:
        """Called by the lease thread: thaw by ourselves, the cut is aborted."""
        with self.lock:
            m = self.machine
            if (m.phase is Phase.FROZEN and self.lease_deadline
                    and time.monotonic() >= self.lease_deadline):
                log.warning("cut %d: lease expired without thaw or abort; thawing", m.n)
                m.step(Event.EXPIRE, m.n, ended="expired")
                self._end_cut()

    def op_copy(self, n: int, targets: dict, mode: str = "auto", inflight: int = 8,
                timeout_ms: int = 30000) -> dict:
        with self.lock:
            names = self._names(list(targets))
            missing = [v for v in self.cut_volumes if v not in targets]
            extra = [v for v in names if v not in self.cut_volumes]
            if extra:
                raise ProtocolError(f"volume {extra[0]!r} is not in cut {n}", "unknown")
            if missing:
                raise ProtocolError(f"cut {n} needs a target for {missing[0]!r}", "protocol")
            self.machine.check(Event.COPY, n)
            plans = {}
            for name in names:
                vol, uri = self.volumes[name], targets[name]
                pit = vol.pit
                if pit.broken:
                    raise ProtocolError(f"cut {n} cannot be copied: {pit.broken};"
                                        f" abort it and cut again", "broken")
                cut_as = "full" if pit.full else "incremental"
                if mode not in ("auto", cut_as):
                    raise ProtocolError(
                        f"cut {n} of {name} was taken for a {cut_as} copy, not {mode}:"
                        f" name the volume in freeze's 'full' for a full copy", "mode")
                if not pit.full and self.synced_target(name) != uri:
                    raise ProtocolError(
                        f"{name} has no completed copy on {uri}: run a full copy first",
                        "baseline")
                plans[name] = (uri, not pit.full)
            for name, (_, incremental) in plans.items():
                if not incremental and self.synced_target(name) is not None:
                    # Bits cleared by this copy were changes relative to the
                    # old target too: it is no longer a baseline.  (Done before
                    # any state changes: if it fails, nothing happened.)
                    self._set_baseline(name, None)
            self.machine.step(Event.COPY, n)
            # An incremental copy first checks that the target still holds
            # the baseline (and refuses, naming --full, if not).
            self.copies = {name: Copy(PitSource(self.volumes[name]), uri, inflight=inflight,
                                      timeout=timeout_ms / 1000,
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

    def op_verify(self, targets: dict, timeout_ms: int = 30000) -> dict:
        """Before a cut for incremental copies: does each target still hold
        the baseline of its volume (see copier.check_baseline)?  Replies
        ``failed``: {volume: one line naming --full}.  A volume whose last
        completed copy is not on that target has nothing to verify (it will
        be copied whole).  The reads run outside the lock: a slow target
        delays only this reply."""
        if not all(isinstance(u, str) for u in targets.values()):
            raise ProtocolError("'targets' must map volume names to NBD URIs")
        if not 1 <= timeout_ms <= 600_000:
            raise ProtocolError("'timeout_ms' must be between 1 and 600000")
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
        self._end_cut()
        self.last_copy = {"n": n, "ok": ok,
                          "volumes": {k: c.progress() for k, c in self.copies.items()}}
        self.machine.step(Event.COPY_DONE if ok else Event.COPY_FAILED, n,
                          ended="done" if ok else "failed")

    def op_clear(self, volumes: list | None = None) -> dict:
        with self.lock:
            names = self._names(volumes)
            if self.machine.phase is not Phase.IDLE:
                raise ProtocolError(f"cannot clear while cut {self.machine.n} is"
                                    f" {self.machine.phase.value}", "busy")
            for name in names:
                self.volumes[name].changes.clear()
            return protocol.ok(volumes=names)

    def op_dirty(self, volume: str, start: int = 0, max_runs: int = 20_000) -> dict:
        """One page of the runs of changed blocks, from block ``start``;
        ``next`` is where the next page starts (None after the last)."""
        name = self._names([volume])[0]
        vol = self.volumes[name]
        bm = vol.changes.dirty()
        if start > bm.nbits:
            raise ProtocolError(f"'start' {start} is past the {bm.nbits} blocks of {name}")
        runs, nxt = bm.runs(start, max_runs=max_runs)
        return protocol.ok(volume=name, granularity=vol.granularity, blocks=bm.nbits,
                           runs=[list(r) for r in runs],
                           next=nxt if nxt < bm.nbits else None)

    def op_checkpoint(self) -> dict:
        return protocol.ok(written=[n for n, v in self.volumes.items()
                                    if v.changes.checkpoint()])

    # ------------------------------------------------------------ threads

    def start(self, control_path: str) -> None:
        """Start the control server, lease and checkpoint threads (after fork)."""
        try:
            os.unlink(control_path)
        except FileNotFoundError:
            pass
        srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        srv.bind(control_path)
        os.chmod(control_path, 0o600)
        srv.listen(16)
        self._server = srv
        self.control_path = control_path
        for target, name in ((self._accept_loop, "control"),
                             (self._lease_loop, "lease"),
                             (self._checkpoint_loop, "checkpoint")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            try:
                conn, _ = self._server.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), name="control-conn",
                             daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        with conn, conn.makefile("rb") as rf:
            while True:
                line = rf.readline(protocol.MAX_LINE + 1)
                if not line:
                    return
                if not line.endswith(b"\n") and len(line) > protocol.MAX_LINE:
                    conn.sendall(protocol.encode(protocol.error(
                        f"message longer than {protocol.MAX_LINE} bytes")))
                    return
                if not line.strip():
                    continue
                try:
                    conn.sendall(protocol.encode(self.handle(line)))
                except OSError:
                    return

    def _lease_loop(self) -> None:
        while not self._stop.is_set():
            deadline = self.lease_deadline
            wait = 1.0 if deadline is None else max(0.0, deadline - time.monotonic())
            self._lease_wake.wait(wait)
            self._lease_wake.clear()
            if self.lease_deadline is not None and time.monotonic() >= self.lease_deadline:
                self.expire_lease()

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
        self._lease_wake.set()
        if self._server is not None:
            self._server.close()
            try:
                os.unlink(self.control_path)
            except FileNotFoundError:
                pass
        with self.lock:
            for c in self.copies.values():
                c.cancelled.set()
        for c in list(self.copies.values()):
            if c.thread is not None:
                c.thread.join(timeout=30)
        for vol in self.volumes.values():
            vol.gate.open()
            vol.close()
