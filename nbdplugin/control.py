"""Client side of the slave control channel (see protocol.py for the rules)."""

from __future__ import annotations

import json
import socket

from . import protocol


class ControlError(Exception):
    """The slave refused a request (``kind`` says why) or could not be reached."""

    def __init__(self, message: str, kind: str = "protocol"):
        super().__init__(message)
        self.kind = kind


class ControlClient:
    """One connection to a slave's control socket; requests answered in order."""

    def __init__(self, path: str, timeout: float = 30.0):
        self.path = path
        self.timeout = timeout
        self._sock: socket.socket | None = None
        self._rfile = None
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
                               "unreachable") from exc
        self._sock, self._rfile = s, s.makefile("rb")

    def call(self, op: str, **args) -> dict:
        """Send one request; return the reply, or raise ControlError."""
        return self.call_raw(protocol.encode({"op": op, **args}))

    def call_raw(self, line: bytes) -> dict:
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
            reply = self._rfile.readline(protocol.MAX_LINE + 1)
        except OSError as exc:
            self.close()
            raise ControlError(f"slave at {self.path} stopped answering: {exc}",
                               "unreachable") from exc
        if not reply:
            self.close()
            raise ControlError(f"slave at {self.path} closed the connection", "unreachable")
        try:
            msg = json.loads(reply)
            if not isinstance(msg, dict):
                raise ValueError("not an object")
        except ValueError as exc:
            self.close()
            raise ControlError(f"slave at {self.path} sent a malformed reply: {exc}",
                               "unreachable") from exc
        if not msg.get("ok"):
            raise ControlError(msg.get("error", "unknown error"), msg.get("kind", "protocol"))
        return msg

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
            self._rfile.close()
            self._sock.close()
            self._sock = self._rfile = None

    def __enter__(self) -> "ControlClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
