"""The client side of a running mirror's control socket: one request
(``call``), the event stream (``subscribe``), and where the socket is
(``control_path``).  ``cgmirror mirror pause|resume|rate|status``,
``events``, ``verify`` and the role commands use it; the server side is
coordinator/mirror/control.py.
"""

from __future__ import annotations

import json
import socket

from wire import protocol

from ..errors import MirrorError, MirrorNotRunning
from ..session import Session
from .verify import Unreachable

CONTROL_TIMEOUT_S = 5.0
VERIFY_TIMEOUT_S = 3600.0       # a verify waits for a hardened group, then reads it all


def control_path(session: Session) -> str:
    """The running mirror's control socket of ``session``; MirrorError (one
    line) if the session mirrors nothing."""
    if session.mirror is None:
        raise MirrorError(f"session {session.name} has no [mirror] and mirrors no"
                          f" volume")
    return session.mirror.control


def connect(path: str, timeout: float) -> socket.socket:
    """A connection to the running mirror's control socket ``path``; raise
    MirrorNotRunning (one line saying what to do) if none answers."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except OSError as exc:
        s.close()
        raise MirrorNotRunning(f"no mirror is running (nothing answers on {path}:"
                               f" {exc.strerror or exc}); start one with"
                               f" `cgmirror mirror run`") from exc
    return s


def call(path: str, op: str, timeout: float = CONTROL_TIMEOUT_S + 10, **args) -> dict:
    """One request to a running mirror; raise MirrorNotRunning if none answers."""
    s = connect(path, timeout)
    try:
        framer, lines = protocol.Framer(), []
        try:
            s.sendall(protocol.encode({"op": op, **args}))
            while not lines:
                data = s.recv(1 << 16)
                if not data:
                    raise MirrorNotRunning(f"the mirror on {path} closed the connection")
                lines = framer.feed(data)
            reply = protocol.parse(lines[0])
        except (OSError, protocol.ProtocolError) as exc:
            raise MirrorError(f"the mirror on {path} did not answer: {exc}") from exc
    finally:
        s.close()
    if not reply.get("ok"):
        if reply.get("kind") == protocol.Kind.UNREACHABLE:
            # what was asked needs a group the mirror cannot form (verify.py)
            raise Unreachable(str(reply.get("error")))
        raise MirrorError(f"the mirror refused {op}: {reply.get('error')}")
    return reply


def subscribe(path: str, timeout: float = 10.0):
    """Yield the events of the mirror on control socket ``path`` (dicts),
    forever; raise MirrorNotRunning if none answers."""
    s = connect(path, timeout)      # the timeout: for the connect and the first line only
    try:
        s.sendall(protocol.encode({"op": "subscribe"}))
        f = s.makefile("rb")
        first = f.readline()
        s.settimeout(None)          # events may be minutes apart
        try:
            head = json.loads(first)
        except ValueError:
            head = {}
        if not head.get("ok"):
            raise MirrorError(f"the mirror on {path} refused subscribe:"
                              f" {head.get('error', 'connection closed')}")
        for line in f:
            yield json.loads(line)
        raise MirrorNotRunning(f"the mirror on {path} went away")
    finally:
        s.close()


__all__ = ["CONTROL_TIMEOUT_S", "VERIFY_TIMEOUT_S", "call", "connect", "control_path",
           "subscribe"]
