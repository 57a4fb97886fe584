"""A slave: the volumes of one nbdkit process and their control channel.

``Slave.handle(request) -> reply`` is the whole control surface; the socket
server below only frames lines.  ``lock`` serialises control operations (a
freeze, thaw, abort, lease expiry or copy end never interleave); the I/O path
never takes it.

The control server (``start``): nothing a peer does can starve it, and a
freeze belongs to the connection that asked for it.

- Peers: on a unix socket (file mode 0600) only the slave's own uid and root
  (SO_PEERCRED); on TCP only TLS peers with a client certificate the server
  context accepts, checked in the connection's own thread under a deadline.
- Bounds: at most ``max_connections`` connections (extras get one error line
  and are closed), each closed after ``idle_timeout`` s without a request; a
  listen backlog that takes a burst; an accept loop that survives EMFILE and
  any other error with one log line and a back-off.
- A cut is owned by the connection that froze it.  If that connection ends
  (EOF, error, idle timeout) while the cut is FROZEN, the cut is aborted at
  once.  A freeze whose connection has already hung up (a coordinator that
  sent FREEZE and ABORT and gave up while this process was stopped) is
  refused before any gate closes.  Once thawed, the cut (CUT, COPYING) no
  longer depends on the connection: the coordinator closes its establish
  connections after THAW and drives copy and abort over others
  (coordinator/group.py), and an unthawed gate is what holds host writes.
"""

from __future__ import annotations

import json
import logging
import os
import select
import socket
import ssl
import stat
import struct
import threading
import time

from wire import address as wire_address

from wire import protocol
from .files import write_atomic
from .copier import Copy, CopyError, PitSource, verify_target
from wire.protocol import CutMachine, Event, Kind, Phase, ProtocolError
from .volume import Volume

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 64
IDLE_TIMEOUT_S = 60.0
HANDSHAKE_TIMEOUT_S = 10.0
# A burst of 200 connects must not meet a full queue (EAGAIN); the kernel
# caps this at net.core.somaxconn.
BACKLOG = 512
ACCEPT_BACKOFF_S = (0.05, 1.0)      # first and longest wait after accept fails


class ControlServerError(Exception):
    """The control server cannot start; the message says what to do."""


class StateError(Exception):
    """The slave's own state file is damaged; the message says what to do."""


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
        self.cut_owner: _Conn | None = None     # the connection that froze the cut
        self._conns: set[_Conn] = set()
        self._conns_lock = threading.Lock()
        self._refused = 0                        # connections refused in this streak
        self._ssl: ssl.SSLContext | None = None
        self.max_connections = MAX_CONNECTIONS

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

    def handle(self, line: bytes | str, owner: "_Conn | None" = None) -> dict:
        """Decode, validate and execute one request; always return a reply.

        ``owner``: the connection the request came on; a freeze belongs to it.
        """
        try:
            msg = protocol.decode(line)
            op = msg.pop("op")
            if op == "freeze":      # the one op whose effect a connection owns
                msg["owner"] = owner
            return getattr(self, "op_" + op)(**msg)
        except ProtocolError as exc:
            return protocol.error(str(exc), exc.kind)
        except Exception as exc:  # a local failure: report it, keep serving
            log.exception("control op failed")
            return protocol.error(f"slave failed: {exc}", Kind.LOCAL)

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
                  full: list | None = None, owner: "_Conn | None" = None) -> dict:
        """Cut n.  ``full`` names the volumes whose PiT will be copied whole
        (the others: only their changes), so the right blocks are preserved.
        ``owner``: the connection that asks; the cut is aborted when it ends."""
        with self.lock:
            names = self._names(volumes)
            full = set(self._names(full) if full else ())
            if not full <= set(names):
                raise ProtocolError(f"'full' names {sorted(full - set(names))[0]!r},"
                                    f" which is not frozen", Kind.UNKNOWN)
            self.machine.check(Event.FREEZE, n)
            vols = [self.volumes[name] for name in names]
            if owner is not None and owner.gone():
                # A late freeze: its coordinator gave up (and maybe sent an
                # abort we would never read).  Never close a gate for it.
                log.warning("cut %d: refused a freeze whose connection is gone", n)
                raise ProtocolError(f"cannot freeze cut {n}: the connection that"
                                    f" asked for it is gone", Kind.GONE)
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
                            f" finish within {budget * 1000:.0f} ms", Kind.TIMEOUT)
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
            self.cut_owner = owner
            self.lease_deadline = t0 + lease_ms / 1000.0
            self._lease_wake.set()
            return protocol.ok(n=n, drain_ms=round(drain_ms, 3), blocks=blocks)

    def op_thaw(self, n: int) -> dict:
        with self.lock:
            self.machine.step(Event.THAW, n)
            held = max(self.volumes[v].gate.open() for v in self.cut_volumes)
            self.lease_deadline = None
            self.cut_owner = None
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
        self.cut_owner = None
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
                                    f" {self.machine.phase.value}", Kind.BUSY)
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

    def start(self, address: str, ssl_context: ssl.SSLContext | None = None, *,
              max_connections: int = MAX_CONNECTIONS, idle_timeout: float = IDLE_TIMEOUT_S,
              handshake_timeout: float = HANDSHAKE_TIMEOUT_S) -> None:
        """Start the control server, lease and checkpoint threads (after fork).

        ``address``: ``unix:PATH``, a plain path, or ``tcp:HOST:PORT`` (port 0:
        any free port; ``self.address`` then says which).  TCP needs
        ``ssl_context``, a server context that requires client certificates.
        Raises ``ControlServerError`` (one line) if the server cannot start.
        """
        try:
            addr = wire_address.parse(address, listen=True)
        except wire_address.AddressError as exc:
            raise ControlServerError(f"control={address}: {exc}") from None
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.handshake_timeout = handshake_timeout
        if addr.is_tcp:
            _check_tls(ssl_context, addr)
            srv = socket.create_server((addr.host, addr.port), backlog=BACKLOG,
                                       family=socket.AF_INET6 if ":" in addr.host
                                       else socket.AF_INET)
            self.address = str(wire_address.Address(
                "tcp", host=addr.host, port=srv.getsockname()[1]))
        else:
            _claim_unix_path(addr.path)
            srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            srv.bind(addr.path)
            # Whatever the umask: only the owner may connect.  (The instant
            # between bind and chmod is covered by the peer check in _admit.)
            os.chmod(addr.path, 0o600)
            srv.listen(BACKLOG)
            self.control_path = addr.path
            self.address = str(addr)
        self._ssl = ssl_context if addr.is_tcp else None
        self._server = srv
        for target, name in ((self._accept_loop, "control"),
                             (self._lease_loop, "lease"),
                             (self._checkpoint_loop, "checkpoint")):
            t = threading.Thread(target=target, name=name, daemon=True)
            t.start()

    def _accept_loop(self) -> None:
        """Accept until shutdown.  No error ends this loop: at the descriptor
        limit (EMFILE/ENFILE) or on anything else it logs one line per streak
        of failures and backs off, so the channel comes back by itself."""
        backoff = 0.0
        while not self._stop.is_set():
            try:
                sock, _ = self._server.accept()
            except OSError as exc:
                if self._stop.is_set():
                    return
                if not backoff:
                    log.error("control: accept failed (%s); retrying with back-off",
                              exc.strerror or exc)
                backoff = min(max(backoff * 2, ACCEPT_BACKOFF_S[0]), ACCEPT_BACKOFF_S[1])
                self._stop.wait(backoff)
                continue
            if backoff:
                log.info("control: accepting connections again")
                backoff = 0.0
            try:
                self._admit(sock)
            except Exception:   # never let one connection end the loop
                log.exception("control: could not start serving a connection")
                sock.close()

    def _admit(self, sock: socket.socket) -> None:
        """Check the peer and the connection bound, then serve in a thread."""
        if sock.family == socket.AF_UNIX and not _peer_allowed(sock):
            return
        if sock.family != socket.AF_UNIX:
            # One small reply per request: never let Nagle hold it back.
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        conn = _Conn(sock)
        with self._conns_lock:
            full = len(self._conns) >= self.max_connections
            if full:
                self._refused += 1
                if self._refused == 1:
                    log.warning("control: %d connections open, refusing more",
                                len(self._conns))
            else:
                self._conns.add(conn)
        if full:
            # Over TCP the refusal would need a TLS handshake (a thread, the
            # very thing the bound limits): those peers just see the close.
            if self._ssl is None:
                _refuse(sock, f"too many control connections ({self.max_connections}):"
                              f" close idle ones or retry later", Kind.BUSY)
            else:
                sock.close()
            return
        try:
            threading.Thread(target=self._serve, args=(conn,), name="control-conn",
                             daemon=True).start()
        except BaseException:
            with self._conns_lock:
                self._conns.discard(conn)
            raise

    def _serve(self, conn: "_Conn") -> None:
        why = "closed by the peer"
        try:
            if self._ssl is not None:
                # In this thread, with a deadline: a peer that never finishes
                # the handshake holds only its own thread.  A peer without a
                # certificate from our CA fails here, before any op is read.
                peer = conn.peer()      # before wrap_socket takes the socket over
                conn.sock.settimeout(self.handshake_timeout)
                try:
                    conn.sock = self._ssl.wrap_socket(conn.sock, server_side=True)
                except (OSError, ssl.SSLError) as exc:
                    log.warning("control: refused %s: TLS handshake failed: %s", peer, exc)
                    why = "TLS handshake failed"
                    return
            conn.sock.settimeout(self.idle_timeout)
            why = self._serve_lines(conn)
        finally:
            self._release(conn, why)

    def _serve_lines(self, conn: "_Conn") -> str:
        """Answer requests in order until the connection ends; return why it did."""
        framer = protocol.Framer()
        while True:
            try:
                data = conn.sock.recv(1 << 16)
            except TimeoutError:
                return f"idle for {self.idle_timeout:g} s"
            except OSError as exc:
                return f"read failed: {exc}"
            if not data:
                return "closed by the peer"
            try:
                replies = [self.handle(line, owner=conn) for line in framer.feed(data)]
                last = None
            except ProtocolError as exc:     # a line over the limit: out of step
                replies, last = [protocol.error(str(exc), exc.kind)], "message too long"
            for reply in replies:
                try:
                    conn.sock.sendall(protocol.encode(reply))
                except OSError as exc:
                    # The peer is gone: _release ends a cut it froze.
                    return f"reply failed: {exc}"
            if last:
                return last

    def _release(self, conn: "_Conn", why: str) -> None:
        """A connection ended: a cut it froze and did not thaw is aborted now
        (the lease is only the last line of defence), and it is closed."""
        with self.lock:
            m = self.machine
            if self.cut_owner is conn and m.phase is Phase.FROZEN:
                log.warning("cut %d: the connection that froze it ended (%s);"
                            " aborting the cut", m.n, why)
                m.step(Event.ABORT, m.n, ended="aborted")
                self._end_cut()
            if self.cut_owner is conn:
                self.cut_owner = None
        with self._conns_lock:
            self._conns.discard(conn)
            if self._refused and len(self._conns) < self.max_connections:
                log.info("control: accepting connections again (%d refused)",
                         self._refused)
                self._refused = 0
        conn.sock.close()

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
            # shutdown() wakes threads blocked in accept or read; each
            # connection's thread then releases and closes its own socket.
            with self._conns_lock:
                socks = [self._server] + [c.sock for c in self._conns]
            for sock in socks:
                try:
                    sock.shutdown(socket.SHUT_RDWR)
                except OSError:
                    pass
            self._server.close()
            if self._ssl is None:
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


class _Conn:
    """One accepted control connection (``sock`` becomes the TLS socket on TCP)."""

    def __init__(self, sock: socket.socket):
        self.sock = sock

    def gone(self) -> bool:
        """True once the peer has hung up or the connection failed; never blocks.
        Data the peer sent before hanging up may still be unread."""
        p = select.poll()
        p.register(self.sock.fileno(), select.POLLRDHUP)
        return any(ev & (select.POLLRDHUP | select.POLLHUP | select.POLLERR | select.POLLNVAL)
                   for _, ev in p.poll(0))

    def peer(self) -> str:
        try:
            host, port = self.sock.getpeername()[:2]
            return f"{host}:{port}"
        except (OSError, ValueError):
            return "a peer"


def _peer_allowed(sock: socket.socket) -> bool:
    """On a unix socket only our own uid and root may talk to the slave.  The
    file mode is not enough: it is set only after bind, and an operator may
    loosen it."""
    pid, uid, _ = struct.unpack("3i", sock.getsockopt(
        socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))
    if uid in (os.getuid(), 0):
        return True
    log.warning("control: refused a connection from uid %d (pid %d): only the"
                " slave's own uid (%d) and root may connect", uid, pid, os.getuid())
    _refuse(sock, f"uid {uid} may not use this slave's control socket", Kind.DENIED)
    return False


def _refuse(sock: socket.socket, message: str, kind: Kind) -> None:
    """Send one error line without waiting for the peer, and close."""
    try:
        sock.setblocking(False)
        sock.send(protocol.encode(protocol.error(message, kind)))
    except OSError:
        pass
    sock.close()


def _check_tls(ctx: ssl.SSLContext | None, addr) -> None:
    """TCP carries the control channel only as TLS 1.3 with client certificates."""
    if not isinstance(ctx, ssl.SSLContext):
        raise ControlServerError(f"control={addr}: the control channel over TCP needs"
                                 f" mutual TLS (plaintext TCP is refused): use a unix:PATH")
    if ctx.verify_mode is not ssl.CERT_REQUIRED or \
            ctx.minimum_version < ssl.TLSVersion.TLSv1_3:
        raise ControlServerError(f"control={addr}: the TLS context must require TLS 1.3"
                                 f" and client certificates")


def _claim_unix_path(path: str) -> None:
    """Make ``path`` free for our socket, removing only a stale socket.

    A socket that still answers belongs to a live slave: taking it over would
    send the coordinator's copies to the wrong process.
    """
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise ControlServerError(f"control socket {path} exists and is not a socket:"
                                 f" remove it or choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    probe.settimeout(5)
    try:
        probe.connect(path)
    except ConnectionRefusedError:
        os.unlink(path)         # nobody listens: a crashed slave's leftover
        return
    except OSError as exc:
        raise ControlServerError(f"control socket {path} cannot be probed"
                                 f" ({exc.strerror or exc}): choose another path") from None
    else:
        pid = struct.unpack("3i", probe.getsockopt(
            socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[0]
        who = f"pid {pid}" if pid > 0 else "pid unknown"
        raise ControlServerError(f"control socket {path} is served by another process"
                                 f" ({who}): stop it or choose another path")
    finally:
        probe.close()
