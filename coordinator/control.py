"""Client side of the slave control channel (see protocol.py for the rules).

A slave's control address is ``unix:PATH`` (or a plain path) or
``tcp:HOST:PORT``.  TCP is always mutual TLS 1.3 (``wire.tls``): the client
presents the coordinator's certificate and checks the slave's against the
session CA and against HOST.  Plaintext TCP is refused here, before any byte
is sent, as the slave refuses it on its side.
"""

from __future__ import annotations

import functools
import select
import socket
import ssl

from wire import address as wire_address
from wire import protocol, tls
from wire.protocol import Kind


class ControlError(Exception):
    """The slave refused a request (``kind``, a ``protocol.Kind``, says why),
    could not be reached (UNREACHABLE), or answered out of schema (REPLY)."""

    def __init__(self, message: str, kind: Kind | str = Kind.PROTOCOL):
        super().__init__(message)
        self.kind = Kind(kind)


@functools.lru_cache(maxsize=16)
def client_context(host_dir: str) -> ssl.SSLContext:
    """The client context of certificate directory ``host_dir``, made once per
    process (loading and checking the files costs ~1 ms; a context may be
    shared by threads).  Raises ``tls.TLSConfigError`` (one line)."""
    return tls.HostFiles(host_dir).client_context()


def connect(address: str, timeout: float,
            ssl_context: ssl.SSLContext | None = None) -> socket.socket:
    """A connected, blocking socket to a slave's control ``address``.

    TCP needs ``ssl_context`` (a ``wire.tls`` client context); the TLS
    handshake is done here, so a peer that is not ours fails now.  Raises
    ControlError: UNREACHABLE if the slave cannot be reached or the handshake
    fails (the line says why, in ``tls.describe``'s words), PROTOCOL for an
    address that cannot be used.
    """
    try:
        addr = wire_address.parse(address)
    except wire_address.AddressError as exc:
        raise ControlError(f"control address {address}: {exc}", Kind.PROTOCOL) from None
    if not addr.is_tcp:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(timeout)
        try:
            s.connect(addr.path)
        except OSError as exc:
            s.close()
            raise ControlError(f"slave at {address} is unreachable:"
                               f" {exc.strerror or exc}", Kind.UNREACHABLE) from exc
        return s
    if ssl_context is None:
        raise ControlError(f"slave at {address}: TCP needs TLS: give the session a pki"
                           f" directory (plaintext TCP is refused)", Kind.PROTOCOL)
    try:
        s = socket.create_connection((addr.host, addr.port), timeout=timeout)
    except OSError as exc:
        raise ControlError(f"slave at {address} is unreachable: {exc.strerror or exc}",
                           Kind.UNREACHABLE) from exc
    # Without it a request/reply pays Nagle + delayed ACK: ~40 ms each.
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    try:
        # server_hostname: the server certificate must name the host dialled.
        return ssl_context.wrap_socket(s, server_hostname=addr.host)
    except (OSError, ssl.SSLError) as exc:
        s.close()
        raise ControlError(f"slave at {address} refused: {_why(exc, address)}",
                           Kind.UNREACHABLE) from exc


def _closed_by_peer(sock: socket.socket) -> bool:
    """True if the peer has closed ``sock`` (or sent what no request asked
    for): readable between requests.  Costs one poll, no wait."""
    readable, _, _ = select.select([sock], [], [], 0)
    return bool(readable)


def _why(exc: BaseException, address: str) -> str:
    """Why a TLS connection failed, for the person who reads it."""
    if isinstance(exc, ssl.SSLEOFError):
        # The server dropped the connection without an alert (often it sent
        # one, but our write raced it): it did not accept our certificate.
        return (f"peer {address}: closed the TLS connection: it refused our certificate"
                f" (not from its session's CA, or expired; its log says which)")
    return tls.describe(exc, address)


class ControlClient:
    """One connection to a slave's control socket; requests answered in order.

    Every reply is checked against the reply schema of its op
    (``protocol.decode_reply``), so a caller only ever sees well-typed,
    bounded values or a ``ControlError``.
    """

    def __init__(self, path: str, timeout: float = 30.0,
                 ssl_context: ssl.SSLContext | None = None):
        self.path = path            # the control address (unix path or tcp:HOST:PORT)
        self.timeout = timeout
        self.ssl_context = ssl_context
        self._sock: socket.socket | None = None
        self._framer = protocol.Framer()
        self._lines: list[bytes] = []
        self._used = False

    def connect(self) -> None:
        """Connect now (calls connect on first use otherwise)."""
        if self._sock is None:
            self._connect()

    def _connect(self) -> None:
        self._used = False
        s = connect(self.path, self.timeout, self.ssl_context)
        self._sock, self._framer, self._lines = s, protocol.Framer(), []

    def call(self, op: str, **args) -> dict:
        """Send one request; return the reply, or raise ControlError."""
        return self._call(protocol.encode({"op": op, **args}), op)

    def call_raw(self, line: bytes) -> dict:
        """Send one line as it is (tests of the slave's refusals); only the
        reply's envelope is checked, as the op may be anything."""
        return self._call(line, None)

    def _call(self, line: bytes, op: str | None) -> dict:
        if self._sock is not None and self._used and _closed_by_peer(self._sock):
            # A kept connection the slave closed (it restarted, or found us
            # idle).  On a unix socket our write would fail (EPIPE, below);
            # TCP accepts it and the loss shows only as EOF after the request
            # left, so look first: between requests nothing is due to arrive.
            self.close()
        if self._sock is None:
            self._connect()
        try:
            try:
                self._sock.sendall(line)
            except (BrokenPipeError, ConnectionResetError):
                if not self._used:
                    raise
                # A kept connection to a slave that has since restarted: the
                # new process never saw this request, so send it again once.
                self.close()
                self._connect()
                self._sock.sendall(line)
            self._used = True
            reply = self._readline()
        except ssl.SSLError as exc:
            # TLS 1.3: the server judges our certificate after our side of
            # the handshake is done, so its refusal arrives with the first read.
            self.close()
            raise ControlError(f"slave at {self.path} refused: {_why(exc, self.path)}",
                               Kind.UNREACHABLE) from exc
        except OSError as exc:
            self.close()
            raise ControlError(f"slave at {self.path} stopped answering: {exc}",
                               Kind.UNREACHABLE) from exc
        except protocol.ProtocolError as exc:      # a line over the size limit
            self.close()
            raise ControlError(f"slave at {self.path} sent a"
                               f" {protocol.bad_reply(op, exc)}", Kind.REPLY) from exc
        if reply is None:
            self.close()
            raise ControlError(f"slave at {self.path} closed the connection",
                               Kind.UNREACHABLE)
        try:
            return protocol.decode_reply(op, reply)
        except protocol.Refused as exc:
            raise ControlError(str(exc), exc.kind) from exc
        except protocol.ProtocolError as exc:
            # The slave's fault.  Lines still frame, but what follows cannot
            # be trusted either: start afresh on the next call.
            self.close()
            raise ControlError(f"slave at {self.path} sent a {exc}", exc.kind) from exc

    def _readline(self) -> bytes | None:
        """The next reply line, or None at end of stream."""
        while not self._lines:
            data = self._sock.recv(1 << 16)
            if not data:
                return None
            self._lines += self._framer.feed(data)
        return self._lines.pop(0)

    def dirty_runs(self, volume: str) -> list[tuple[int, int]]:
        """Every run (start block, blocks) of changed blocks, page by page."""
        runs, start = [], 0
        while start is not None:
            page = self.call("dirty", volume=volume, start=start)
            runs += [tuple(r) for r in page["runs"]]
            start = page["next"]
        return runs

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def __enter__(self) -> "ControlClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
