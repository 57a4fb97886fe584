"""The control server of a slave, primary or secondary: it frames lines and
hands each request to a handler (``handler.handle(line, owner=conn) ->
reply``); when a connection ends it tells the handler
(``handler.connection_closed(conn, why)``), which is how a primary aborts a
cut whose coordinator went away.  ``OpHandler`` is the shared front of both
roles: decode, check the op is one of the role's, dispatch to ``op_NAME``.

Nothing a peer does can starve the server:

- Peers: on a unix socket (file mode 0600) only the slave's own uid and root
  (SO_PEERCRED); on TCP only TLS peers with a client certificate the server
  context accepts, checked in the connection's own thread under a deadline.
- Bounds: at most ``max_connections`` connections, each closed after
  ``idle_timeout`` s without a request, a TLS handshake not finished within
  ``handshake_timeout`` s; a listen backlog that takes a burst; an accept
  loop that survives EMFILE and any other error with one log line and a
  back-off.
- Nobody holds the slots: when they are full, a new connection takes the
  slot of the oldest unauthenticated or idle one (``wire.slots``: the
  coordinator, which asks at once and keeps asking, is the last to go), not
  the other way round.  Only when every connection is inside a request is
  the new one refused (one error line on a unix socket).
"""

from __future__ import annotations

import itertools
import logging
import os
import select
import socket
import ssl
import time
import threading

from wire import address as wire_address
from wire import unixsock
from wire.slots import SlotTable

from wire import protocol
from wire.protocol import Kind, ProtocolError

from .epoch import EpochFence

log = logging.getLogger(__name__)

MAX_CONNECTIONS = 64
IDLE_TIMEOUT_S = 60.0
# A TLS 1.3 handshake between our hosts is one round trip and two signature
# checks: milliseconds on loopback, well under a second across a WAN or on a
# loaded host.  2 s covers that with room and bounds how long a peer without
# a certificate keeps a thread (the slot it may lose sooner: see wire.slots).
HANDSHAKE_TIMEOUT_S = 2.0
# Lines about connections the server closed on its own (evicted, handshake
# deadline) come at most this often, with a count: a flood must not flood
# the log too.
QUIET_LOG_S = 10.0
# A burst of 200 connects must not meet a full queue (EAGAIN); the kernel
# caps this at net.core.somaxconn.
BACKLOG = 512
ACCEPT_BACKOFF_S = (0.05, 1.0)      # first and longest wait after accept fails


class ControlServerError(Exception):
    """The control server cannot start; the message says what to do."""


class OpHandler:
    """The request front shared by both roles: ``ROLE`` names the role and
    ``protocol.ROLE_OPS[ROLE]`` the ops it serves (each an ``op_NAME``
    method); ``OWNED_OPS`` get the connection they came on as ``owner``.

    The node's own ops live here too (issue 18, nbdplugin/noderecord.py):
    the session check of every request, the leader epoch's (issue 19,
    nbdplugin/epoch.py: ``epochs``), ``record``, and the frame of
    ``role`` -- each role says in ``_leave_role`` what it must settle
    before it records the other role.  Once a role change is recorded the
    node only answers ``status`` until it exits: ``reply_sent`` (the
    server calls it after each batch of replies is written) calls
    ``on_restart`` (plugin.py: nbdkit's clean shutdown, then exit with
    ``protocol.RESTART_STATUS``)."""

    ROLE = "primary"
    OWNED_OPS: tuple[str, ...] = ()
    node = None                 # NodeRecord (plugin.py); None: a bare handler in tests
    epochs = None               # its EpochFence (attach); None: no epoch check
    restarting: str | None = None   # the role recorded, the process not yet gone
    write_lease = None          # its WriteLease (fence=lease, plugin.py): status says it
    on_restart = None           # called once, after the role op's reply is written
    _restart_started = False

    def handle(self, line: bytes | str, owner: "Conn | None" = None) -> dict:
        """Decode, validate and execute one request; always return a reply."""
        try:
            msg = protocol.decode(line)
            op = msg.pop("op")
            self._check_session(msg.pop(protocol.SESSION_KEY, None))
            if op not in protocol.ROLE_OPS[self.ROLE]:
                other = "secondary" if self.ROLE == "primary" else "primary"
                raise ProtocolError(f"op {op!r} is for a {other}; this slave is a"
                                    f" {self.ROLE}", Kind.ROLE)
            if self.restarting and op != "status":
                raise ProtocolError(f"this node is restarting as a {self.restarting} (role"
                                    f" change {self.node.role_seq}): ask it again once it"
                                    f" is back", Kind.BUSY)
            epoch = msg.pop(protocol.EPOCH_KEY, None)
            if op in self.OWNED_OPS:
                msg["owner"] = owner
            if self.epochs is None:
                return getattr(self, "op_" + op)(**msg)
            # A higher epoch is recorded before the op; a lower one refused
            # on an op that changes anything (nbdplugin/epoch.py).
            with self.epochs.admit(op, epoch):
                return getattr(self, "op_" + op)(**msg)
        except ProtocolError as exc:
            return protocol.error(str(exc), exc.kind)
        except Exception as exc:  # a local failure: report it, keep serving
            log.exception("control op failed")
            return protocol.error(f"slave failed: {exc}", Kind.LOCAL)

    def _check_session(self, session: str | None) -> None:
        """A request that names another session than this node's is refused
        before anything happens; one without a session (tools) is served."""
        mine = self.node.session if self.node is not None else None
        if session is None or mine is None or session == mine:
            return
        raise ProtocolError(f"{self.node.who()} belongs to session {mine}, not {session}:"
                            f" a node serves one session; give {session} nodes of its own",
                            Kind.SESSION)

    def connection_closed(self, conn: "Conn", why: str) -> None:
        """A control connection ended (``why``: one line); nothing by default."""

    # ------------------------------------------------------------ node ops

    def attach(self, node) -> None:
        """Serve as the node of ``node`` (nbdplugin/noderecord.py), before
        the control server starts."""
        self.node = node
        self.epochs = EpochFence(node)

    def node_status(self, volumes: dict, dirty) -> dict:
        """Add the node's fields to a status reply's ``volumes`` (``dirty``:
        name -> bool) and return the top-level ones."""
        if self.node is None:
            return {}
        for name, v in volumes.items():
            v.update(self.node.volume_fields(name, dirty(name)))
        top = self.node.status_fields()
        if self.restarting:
            top["restarting"] = self.restarting
        if self.write_lease is not None:
            top["write_lease"] = self.write_lease.status()
        return top

    def op_record(self, record: dict) -> dict:
        """Keep the coordinator's direction record if its seq is higher."""
        return protocol.ok(record=self.node.keep_record(record))

    def op_role(self, to: str) -> dict:
        """Become ``to``: settle this role (``_leave_role``, which refuses
        with a one-line error or returns the lineage event), record the
        new role and the lineage durably, answer; the process then exits
        with RESTART_STATUS (``reply_sent``) and is started again in the
        recorded role by its supervisor."""
        if to == self.ROLE:
            return protocol.ok(role=to, restarting=False, role_seq=self.node.role_seq)
        # The role's own lock too (both roles' ``lock``, an RLock): no cut,
        # copy, prepare or commit between the settling and the record.
        with self._role_lock, self.lock:
            if self.restarting:
                raise ProtocolError(f"this node is restarting as a {self.restarting}",
                                    Kind.BUSY)
            event, undo = self._leave_role(to)
            try:
                def change(d):
                    d["role"] = to
                    d["role_seq"] += 1
                    for name, v in d["volumes"].items():
                        v["lineage"] = event(name, v["lineage"])
                new = self.node.update(change, failpoint="node:role")
            except BaseException:
                undo()
                raise
            self.restarting = to
        log.info("%s: role %s recorded (role change %d, lineage event %d): restarting"
                 " with status %d", self.node.who(), to, new["role_seq"],
                 2 if to == "primary" else 3, protocol.RESTART_STATUS)
        return protocol.ok(role=to, restarting=True, role_seq=new["role_seq"])

    def _leave_role(self, to: str):
        """Settle this role before the role ``to`` is recorded; return
        ``(event, undo)``: ``event(name, lineage) -> lineage`` (wire/lineage.py)
        and ``undo()`` to take back the settling if the record fails."""
        raise NotImplementedError

    @property
    def _role_lock(self) -> threading.Lock:
        lock = self.__dict__.get("_role_lock_")
        if lock is None:
            lock = self.__dict__.setdefault("_role_lock_", threading.Lock())
        return lock

    def reply_sent(self) -> None:
        """The server wrote a batch of replies (or failed to: the peer is
        gone).  After a role change, start the exit exactly once."""
        if self.restarting and not self._restart_started:
            self._restart_started = True
            if self.on_restart is not None:
                self.on_restart()


class ControlServer:
    """Serves ``handler`` on one address; ``start`` binds and starts the
    accept thread, ``close`` stops it and wakes every connection's thread."""

    def __init__(self, handler, *, max_connections: int = MAX_CONNECTIONS,
                 idle_timeout: float = IDLE_TIMEOUT_S,
                 handshake_timeout: float = HANDSHAKE_TIMEOUT_S):
        self.handler = handler
        self.max_connections = max_connections
        self.idle_timeout = idle_timeout
        self.handshake_timeout = handshake_timeout
        self.address: str | None = None
        self.control_path: str | None = None
        self._stop = threading.Event()
        self._server: socket.socket | None = None
        self._conns: set[Conn] = set()          # every connection with a thread
        self._slots: SlotTable = SlotTable(max_connections)   # those that count
        self._conns_lock = threading.Lock()
        self._refused = 0                        # connections refused in this streak
        self._ssl: ssl.SSLContext | None = None
        self._evictions = _Tally("control: closed %d idle or unauthenticated"
                                 " connection(s) to admit new ones (%d slots full)")
        self._left = _Tally("control: %d connection(s) ended before a TLS handshake")
        self._stalls = _Tally("control: closed %d connection(s) that did not finish"
                              " a TLS handshake within %g s")

    @property
    def connections(self) -> int:
        """Connections open now; one leaves this count only after the handler
        heard that it ended (``connection_closed``)."""
        with self._conns_lock:
            return len(self._conns)

    def start(self, address: str, ssl_context: ssl.SSLContext | None = None) -> None:
        """Bind ``address`` (``unix:PATH``, a plain path, or ``tcp:HOST:PORT``;
        port 0: any free port, ``self.address`` then says which) and start
        accepting.  TCP needs ``ssl_context``, a server context that requires
        client certificates.  Raises ``ControlServerError`` (one line) if the
        server cannot start.
        """
        try:
            addr = wire_address.parse(address, listen=True)
        except wire_address.AddressError as exc:
            raise ControlServerError(f"control={address}: {exc}") from None
        if addr.is_tcp:
            _check_tls(ssl_context, addr)
            srv, self.address = listen_tcp(addr.host, addr.port)
        else:
            srv = listen_unix(addr.path)
            self.control_path = addr.path
            self.address = str(addr)
        self._ssl = ssl_context if addr.is_tcp else None
        self._server = srv
        threading.Thread(target=self._accept_loop, name="control", daemon=True).start()

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
        conn = Conn(sock)
        with self._conns_lock:
            admitted, victim = self._slots.admit(conn, authenticated=self._ssl is None)
            full = not admitted
            if full:
                self._refused += 1
                if self._refused == 1:
                    log.warning("control: all %d connections are inside a request,"
                                " refusing more", len(self._slots))
            else:
                self._conns.add(conn)
                if victim is not None:
                    # Under the lock: the victim's thread cannot close its
                    # socket (it leaves _conns first) nor start a request.
                    self._evict(victim)
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

    def _evict(self, conn: "Conn") -> None:
        """Close ``conn`` (not inside a request) to give its slot to a new
        one; its own thread then ends and releases it.  Lock held."""
        conn.evicted = True
        if self._ssl is None:
            _send_now(conn.sock, f"too many control connections ({self.max_connections}):"
                                 f" closed this idle one for a newer one", Kind.BUSY)
        try:
            # The plain socket's shutdown, also under TLS: it wakes the
            # thread's read or handshake and leaves the TLS object to it.
            socket.socket.shutdown(conn.sock, socket.SHUT_RDWR)
        except OSError:
            pass        # mid-wrap (no descriptor yet): the thread sees .evicted
        self._evictions.add(len(self._slots))

    def _serve(self, conn: "Conn") -> None:
        why = "closed by the peer"
        try:
            if self._ssl is not None:
                why = self._handshake(conn)
                if why:
                    return
            with self._conns_lock:
                self._slots.authenticated(conn)
            conn.sock.settimeout(self.idle_timeout)
            why = self._serve_lines(conn)
        finally:
            if conn.evicted:
                why = "closed to admit a newer connection"
            self._release(conn, why)

    def _handshake(self, conn: "Conn") -> str | None:
        """The TLS handshake, in this thread, with a deadline: a peer that
        never finishes it holds only its own thread, and loses even that to
        a new connection when the slots are full.  A peer without a
        certificate from our CA fails here, before any op is read.  Returns
        why the connection ends, or None to serve it."""
        peer = conn.peer()      # before wrap_socket takes the socket over
        deadline = time.monotonic() + self.handshake_timeout
        try:
            # Its first bytes move it behind the peers that say nothing.
            if not _readable(conn.sock, self.handshake_timeout):
                raise TimeoutError
            if conn.evicted:
                return "evicted"
            if conn.sock.recv(1, socket.MSG_PEEK) == b"":
                # Gone without a word of TLS: a scan, or a holder of slots
                # letting go.  Nothing was refused.
                self._left.add()
                return "closed before a TLS handshake"
            with self._conns_lock:
                self._slots.heard(conn)
            conn.sock.settimeout(max(deadline - time.monotonic(), 0.001))
            conn.sock = self._ssl.wrap_socket(conn.sock, server_side=True,
                                              do_handshake_on_connect=False)
            if conn.evicted:
                return "evicted"
            conn.sock.do_handshake()
        except TimeoutError:
            # No certificate was even offered: a port scan, a stuck client,
            # or someone holding connections open.  Not a TLS failure.
            self._stalls.add(self.handshake_timeout)
            return f"no TLS handshake within {self.handshake_timeout:g} s"
        except (OSError, ssl.SSLError) as exc:
            if conn.evicted:
                return "evicted"
            log.warning("control: refused %s: TLS handshake failed: %s", peer, exc)
            return "TLS handshake failed"
        return None

    def _serve_lines(self, conn: "Conn") -> str:
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
            with self._conns_lock:
                if conn.evicted:
                    return "evicted"
                self._slots.busy(conn)      # not evicted while inside a request
            try:
                why = self._answer(conn, framer, data)
            finally:
                with self._conns_lock:
                    self._slots.done(conn)
            if why:
                return why

    def _answer(self, conn: "Conn", framer: protocol.Framer, data: bytes) -> str | None:
        """Answer the lines ``data`` completes; why the connection ends, or None."""
        try:
            replies = [self.handler.handle(line, owner=conn) for line in framer.feed(data)]
            last = None
        except ProtocolError as exc:     # a line over the limit: out of step
            replies, last = [protocol.error(str(exc), exc.kind)], "message too long"
        try:
            for reply in replies:
                try:
                    conn.sock.sendall(protocol.encode(reply))
                except OSError as exc:
                    # The peer is gone: _release ends a cut it froze.
                    return f"reply failed: {exc}"
            return last
        finally:
            # A role change is recorded: the node restarts now that its
            # reply is written (or could not be: it restarts all the same).
            hook = getattr(self.handler, "reply_sent", None)
            if hook is not None:
                hook()


    def _release(self, conn: "Conn", why: str) -> None:
        """A connection ended: tell the handler first (a primary aborts a cut
        the connection froze and did not thaw), then forget and close it."""
        try:
            self.handler.connection_closed(conn, why)
        finally:
            with self._conns_lock:
                self._conns.discard(conn)
                self._slots.release(conn)
                if self._refused and len(self._slots) < self.max_connections:
                    log.info("control: accepting connections again (%d refused)",
                             self._refused)
                    self._refused = 0
            conn.sock.close()

    def close(self) -> None:
        """Stop accepting; wake threads blocked in accept or read (each
        connection's thread then releases and closes its own socket)."""
        self._stop.set()
        if self._server is None:
            return
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


class Conn:
    """One accepted control connection (``sock`` becomes the TLS socket on TCP)."""

    _tokens = itertools.count(1)

    def __init__(self, sock: socket.socket):
        self.sock = sock
        self.evicted = False        # closed by the server to admit a newer one
        # Names the connection to the native gate core (native/gate.py) as
        # the owner of a freeze; never reused.
        self.token = next(Conn._tokens)

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
    pid, uid, _ = wire_address.peer_credentials(sock)
    if uid in (os.getuid(), 0):
        return True
    log.warning("control: refused a connection from uid %d (pid %d): only the"
                " slave's own uid (%d) and root may connect", uid, pid, os.getuid())
    _refuse(sock, f"uid {uid} may not use this slave's control socket", Kind.DENIED)
    return False


def _refuse(sock: socket.socket, message: str, kind: Kind) -> None:
    """Send one error line without waiting for the peer, and close."""
    _send_now(sock, message, kind)
    sock.close()


def _readable(sock: socket.socket, timeout: float) -> bool:
    """True once ``sock`` has bytes (or an end) to read, False after ``timeout`` s."""
    p = select.poll()
    p.register(sock.fileno(), select.POLLIN)
    return bool(p.poll(int(timeout * 1000) + 1))


def _send_now(sock: socket.socket, message: str, kind: Kind) -> None:
    """One error line if the socket takes it at once (never blocks)."""
    try:
        sock.send(protocol.encode(protocol.error(message, kind)), socket.MSG_DONTWAIT)
    except OSError:
        pass


class _Tally:
    """A count of like events, logged on the first and then at most every
    ``QUIET_LOG_S`` seconds (``fmt`` takes the count and ``add``'s args)."""

    def __init__(self, fmt: str):
        self.fmt = fmt
        self.count = 0
        self.logged_at: float | None = None
        self._lock = threading.Lock()

    def add(self, *args) -> None:
        with self._lock:
            self.count += 1
            now = time.monotonic()
            if self.logged_at is not None and now - self.logged_at < QUIET_LOG_S:
                return
            count, self.count, self.logged_at = self.count, 0, now
        log.warning(self.fmt, count, *args)


def _check_tls(ctx: ssl.SSLContext | None, addr) -> None:
    """TCP carries the control channel only as TLS 1.3 with client certificates."""
    if not isinstance(ctx, ssl.SSLContext):
        raise ControlServerError(f"control={addr}: the control channel over TCP needs"
                                 f" mutual TLS (plaintext TCP is refused): use a unix:PATH")
    if ctx.verify_mode is not ssl.CERT_REQUIRED or \
            ctx.minimum_version < ssl.TLSVersion.TLSv1_3:
        raise ControlServerError(f"control={addr}: the TLS context must require TLS 1.3"
                                 f" and client certificates")


def listen_tcp(host: str, port: int) -> tuple[socket.socket, str]:
    """A listening TCP socket on ``host`` (port 0: any free port) and its
    address, ``tcp:HOST:PORT`` with the port it got."""
    srv = socket.create_server((host, port), backlog=BACKLOG,
                               family=socket.AF_INET6 if ":" in host else socket.AF_INET)
    return srv, str(wire_address.Address("tcp", host=host, port=srv.getsockname()[1]))


def listen_unix(path: str) -> socket.socket:
    """A listening unix socket at ``path`` (mode 0600) after
    ``_claim_unix_path``; raises ``ControlServerError``."""
    _claim_unix_path(path)
    srv = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    srv.bind(path)
    # Whatever the umask: only the owner may connect.  (The instant between
    # bind and chmod is covered by the peer check of each accepted socket.)
    os.chmod(path, 0o600)
    srv.listen(BACKLOG)
    return srv


def _claim_unix_path(path: str) -> None:
    """Make ``path`` free for our socket, removing only a stale socket.

    A socket that still answers belongs to a live slave: taking it over would
    send the coordinator's copies to the wrong process.
    """
    try:
        unixsock.claim(path, "control socket")
    except unixsock.SocketInUse as exc:
        raise ControlServerError(str(exc)) from None
