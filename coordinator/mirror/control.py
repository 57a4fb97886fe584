"""The running mirror's control socket (the server side).

The running mirror answers ``cgmirror mirror pause|resume|rate|status``,
``verify`` and ``events`` on a unix socket (0600, in the session's state
directory unless [mirror] control says otherwise) with the slaves' line
codec (wire.protocol's Framer, encode, parse) and its own small schema
(``MIRROR_OPS``).  Only our own user (or root) may connect.  A
``subscribe`` turns the connection into the event stream
(coordinator/mirror/events.py).  The client side is client.py.
"""

from __future__ import annotations

import os
import socket
import threading

from wire import address as wire_address, files, protocol, unixsock
from wire.protocol import Kind
from wire.slots import SlotTable

from ..errors import CgmirrorError, ExitCode, LocalError, describe
from . import events, verify
from .client import VERIFY_TIMEOUT_S

MIRROR_OPS = {"status": protocol.Obj({}, {}), "pause": protocol.Obj({}, {}),
              "resume": protocol.Obj({}, {}),
              "rate": protocol.Obj({"rate": protocol.Int(0, protocol.MAX_RATE)}, {}),
              # wait_s: how long to wait for a hardened group (verify.py)
              "verify": protocol.Obj({}, {"repair": protocol.Bool(),
                                          "wait_s": protocol.Int(1, 86400)}),
              # keeps the connection: events, one a line (coordinator/mirror/events.py)
              "subscribe": protocol.Obj({}, {}),
              # a role command says what it did: the failover event (events.py)
              "role": protocol.Obj({"action": protocol.Str(choices=events.ROLE_ACTIONS),
                                    "site": protocol.Str(choices=("a", "b")),
                                    "hardened": protocol.Int(0, protocol.MAX_N)}, {})}


def handle(mirror, line: bytes) -> dict:
    """One request line to one reply for ``mirror`` (a cycle.Mirror); never
    raises."""
    try:
        msg = protocol.parse(line)
        op = msg.pop("op", None)
        if op not in MIRROR_OPS:
            raise protocol.ProtocolError(f"unknown op {str(op)[:80]!r} (known:"
                                         f" {', '.join(MIRROR_OPS)})")
        MIRROR_OPS[op].check(msg, "")
        if op == "pause":
            mirror.pause()
            mirror.log("paused by the operator: no new group until resume")
        elif op == "resume":
            mirror.resume()
            mirror.log("resumed by the operator")
        elif op == "rate":
            mirror.set_rate(msg["rate"])
        elif op == "verify":
            wait = msg.get("wait_s") or verify.default_wait_s(mirror.settings,
                                                               mirror.session)
            return mirror.verifies.ask(msg.get("repair", False), wait, VERIFY_TIMEOUT_S)
        elif op == "role":
            events.emit_failover(mirror.events, **msg)
            mirror.log(f"{msg['action']}: site {msg['site']} at group {msg['hardened']}")
        return mirror.status()
    except protocol.ProtocolError as exc:
        return protocol.error(str(exc), exc.kind)
    except CgmirrorError as exc:
        # verify: no hardened group, or a node gone: the client exits UNREACHABLE
        return protocol.error(str(exc), Kind.UNREACHABLE
                              if exc.exit_code == ExitCode.UNREACHABLE else Kind.LOCAL)
    except Exception as exc:    # reported to the client; the mirror keeps running
        return protocol.error(f"mirror failed: {describe(exc)}", Kind.LOCAL)


# Connections at once; a full table evicts the one that can best spare it
# (wire.slots), so idle connections of our own uid never lock out a
# command, and the accept loop survives EMFILE with a back-off.
MAX_CONNECTIONS = 64
ACCEPT_BACKOFF_S = (0.05, 1.0)
BUSY_LINE = (f"too many control connections ({MAX_CONNECTIONS}): closed this idle one"
             f" for a newer one")


class ControlServer:
    """Accepts connections on a unix socket; one thread per connection."""

    def __init__(self, path: str, mirror):
        self.path, self.mirror = path, mirror
        self.sock: socket.socket | None = None
        self._stop = threading.Event()
        self._lock = threading.Lock()
        self._slots: SlotTable = SlotTable(MAX_CONNECTIONS)
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        # We hold the session lock, so a socket here is a dead mirror's --
        # unless another session names the same path: never replace a live one.
        try:
            unixsock.claim(self.path, "mirror control socket")
        except unixsock.SocketInUse as exc:
            raise LocalError(str(exc)) from None
        except OSError as exc:
            raise LocalError(f"cannot remove {self.path}: {exc.strerror or exc}") from exc
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # 0600 from the start: umask applies at bind (chmod after would leave
        # a window); we are still single-threaded here.
        old = os.umask(0o177)
        try:
            files.make_dirs(os.path.dirname(self.path))
            s.bind(self.path)
        except OSError as exc:
            s.close()
            raise LocalError(f"cannot listen on {self.path}: {exc.strerror or exc}") \
                from exc
        finally:
            os.umask(old)
        s.listen(16)
        self.sock = s
        t = threading.Thread(target=self._accept, name="mirror-control", daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        backoff = 0.0
        while not self._stop.is_set():
            try:
                conn, _ = self.sock.accept()
            except OSError as exc:
                if self._stop.is_set():
                    return                  # closed
                if not backoff:
                    self.mirror.log(f"control: accept failed ({exc.strerror or exc});"
                                    f" retrying with back-off")
                backoff = min(max(backoff * 2, ACCEPT_BACKOFF_S[0]), ACCEPT_BACKOFF_S[1])
                self._stop.wait(backoff)
                continue
            backoff = 0.0
            # Only our own user (or root) may pause the mirror.
            if wire_address.peer_credentials(conn)[1] not in (0, os.getuid()):
                conn.close()
                continue
            with self._lock:
                admitted, victim = self._slots.admit(conn, authenticated=True)
            if victim is not None:
                _evict(victim)
            if not admitted:                # every slot inside a request
                _evict(conn)
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True,
                             name="mirror-control-conn").start()

    def _serve(self, conn: socket.socket) -> None:
        framer = protocol.Framer()
        conn.settimeout(60)
        with conn:
            try:
                while True:
                    data = conn.recv(1 << 16)
                    if not data:
                        return
                    for line in framer.feed(data):
                        if _is_subscribe(line):
                            conn.settimeout(None)
                            self._call(conn, lambda: None)      # it is used
                            self.mirror.events.stream(conn, lambda: self.sock is None)
                            return
                        reply = self._call(conn, lambda: handle(self.mirror, line))
                        conn.sendall(protocol.encode(reply))
            except (OSError, protocol.ProtocolError):
                return
            finally:
                with self._lock:
                    self._slots.release(conn)

    def _call(self, conn: socket.socket, fn):
        """``fn()`` with ``conn`` marked inside a request (never evicted)."""
        with self._lock:
            self._slots.busy(conn)
        try:
            return fn()
        finally:
            with self._lock:
                self._slots.done(conn)

    def close(self) -> None:
        self._stop.set()
        if self.sock:
            self.sock.close()
            self.sock = None
            try:
                os.unlink(self.path)
            except OSError:
                pass


def _evict(conn: socket.socket) -> None:
    """Tell a connection it lost its slot and end it (its thread, if any,
    then sees EOF and ends)."""
    try:
        conn.sendall(protocol.encode(protocol.error(BUSY_LINE, Kind.BUSY)))
    except OSError:
        pass
    try:
        conn.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


def _is_subscribe(line: bytes) -> bool:
    """A ``subscribe`` request: the connection becomes an event stream."""
    try:
        return protocol.parse(line) == {"op": "subscribe"}
    except protocol.ProtocolError:
        return False


__all__ = ["ControlServer", "MIRROR_OPS", "handle"]
