"""Client side of the slave control channel (see protocol.py for the rules)."""

from __future__ import annotations

import socket

from wire import protocol
from wire.protocol import Kind


class ControlError(Exception):
    """The slave refused a request (``kind``, a ``protocol.Kind``, says why),
    could not be reached (UNREACHABLE), or answered out of schema (REPLY)."""

    def __init__(self, message: str, kind: Kind | str = Kind.PROTOCOL):
        super().__init__(message)
        self.kind = Kind(kind)


class ControlClient:
    """One connection to a slave's control socket; requests answered in order.

    Every reply is checked against the reply schema of its op
    (``protocol.decode_reply``), so a caller only ever sees well-typed,
    bounded values or a ``ControlError``.
    """

    def __init__(self, path: str, timeout: float = 30.0):
        self.path = path
        self.timeout = timeout
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
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(self.timeout)
        try:
            s.connect(self.path)
        except OSError as exc:
            s.close()
            raise ControlError(f"slave at {self.path} is unreachable: {exc.strerror or exc}",
                               Kind.UNREACHABLE) from exc
        self._sock, self._framer, self._lines = s, protocol.Framer(), []

    def call(self, op: str, **args) -> dict:
        """Send one request; return the reply, or raise ControlError."""
        return self._call(protocol.encode({"op": op, **args}), op)

    def call_raw(self, line: bytes) -> dict:
        """Send one line as it is (tests of the slave's refusals); only the
        reply's envelope is checked, as the op may be anything."""
        return self._call(line, None)

    def _call(self, line: bytes, op: str | None) -> dict:
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
