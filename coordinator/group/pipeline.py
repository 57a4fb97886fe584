"""The establish's wire client: one connection per slave, used pipelined
from a single thread (requests go out without waiting, replies are read
with select as they arrive)."""

from __future__ import annotations

import os
import selectors
import ssl
import time
from contextlib import contextmanager
from typing import Callable, Iterator

from wire import protocol

from ..control import ControlError, connect
from ..errors import SlaveUnreachable
from ..link import SlaveLink, translate
from .fanout import NOT_IN_CUT


class Wire:
    """One connection to a slave for an establish, used pipelined from a
    single thread: requests go out without waiting, replies are read as they
    arrive (a slave answers one connection's requests in order).  Framing
    and reply checks are ``protocol``'s, as for ``ControlClient``: each
    reply is checked against the schema of the op it answers, and one that
    does not match becomes a refusal of kind REPLY (the wire stays usable,
    so the abort that follows still goes out behind the freeze).

    Rejected: a thread per slave (the first version).  Its wake-ups -- go,
    each reply, the decision, each thaw -- sat between the first gate
    closing and the last opening, and it needed a condition variable and
    two events to keep each abort behind its freeze.  Measured on two cores
    (4 slaves): gates held p50 1.6 -> 1.4 ms with no load, no change under
    write load, where the slaves' own scheduling dominates.
    """

    def __init__(self, link: SlaveLink):
        self.link, self.name = link, link.name
        self.replies: list[dict] = []
        self.answered: list[float] = []     # monotonic time of each reply
        self.dead: str | None = None        # why the connection is gone
        self._sent: list[str] = []          # the op of each request, in order
        self._framer = protocol.Framer()
        # Every request names the session and the leader epoch (link.envelope).
        self._session = link.envelope()
        self.sock = None
        # The slave's gate socket where it has one (a C thread answers there,
        # whatever its Python threads are doing), else its control socket.
        self.address = link.gate or link.control
        try:
            # Connected (and over TCP, TLS handshake done) before the freeze.
            self.sock = connect(self.address, link.timeout, link.ssl_context)
            if isinstance(self.sock, ssl.SSLSocket):
                self._settle()
            self.sock.setblocking(False)
        except ControlError as exc:
            self.dead = str(exc)

    def _settle(self) -> None:
        """One status round trip on a fresh TLS connection, before the clock.

        TLS 1.3: our side of the handshake ends before the slave has checked
        our certificate and sent its session tickets, so without this the
        slave finishes the handshake after FREEZE was sent, inside the
        coordination time.  Measured with bench_freeze --sites (2 slaves,
        writes running): coordination p50 13.5 ms without, 2.4 ms with; gates
        held p50 12.4 -> 1.8 ms.
        """
        line = protocol.encode({"op": "status", **self._session})
        try:
            self.sock.sendall(line)
            lines: list[bytes] = []
            while not lines:
                data = self.sock.recv(1 << 16)
                if not data:
                    raise ControlError(f"slave at {self.address} closed the"
                                       f" connection")
                lines = self._framer.feed(data)
        except OSError as exc:
            raise ControlError(f"slave at {self.address} refused or stopped"
                               f" answering: {exc}") from exc

    def send(self, op: str, args: dict) -> None:
        if self.dead:
            return
        try:
            # A few hundred bytes: they fit the socket buffer at once.
            self.sock.sendall(protocol.encode({"op": op, **args, **self._session}))
            self._sent.append(op)
        except OSError as exc:
            self.dead = f"slave at {self.address} stopped answering: {exc}"

    def pump(self) -> None:
        """Read what has arrived; called when the socket is readable."""
        try:
            data = self.sock.recv(1 << 16)
            # TLS: a record read may leave decrypted bytes the selector cannot see.
            while isinstance(self.sock, ssl.SSLSocket) and data and self.sock.pending():
                data += self.sock.recv(self.sock.pending())
        except (BlockingIOError, ssl.SSLWantReadError):
            return
        except OSError as exc:
            self.dead = f"slave at {self.address} stopped answering: {exc}"
            return
        if not data:
            self.dead = f"slave at {self.address} closed the connection"
            return
        try:
            lines = self._framer.feed(data)
        except protocol.ProtocolError as exc:       # out of step: give up on it
            op = self._sent[len(self.replies)] if len(self.replies) < len(self._sent) \
                else None
            self.dead = f"slave at {self.address} sent a {protocol.bad_reply(op, exc)}"
            return
        for line in lines:
            if len(self.replies) >= len(self._sent):
                self.dead = f"slave at {self.address} sent a reply to no request"
                return
            op = self._sent[len(self.replies)]
            try:
                reply = protocol.decode_reply(op, line)
            except protocol.Refused as exc:
                reply = protocol.error(str(exc), exc.kind)
            except protocol.ProtocolError as exc:
                reply = protocol.error(f"slave at {self.address} sent a {exc}",
                                       exc.kind)
            self.replies.append(reply)
            self.answered.append(time.monotonic())

    def error(self, i: int) -> str:
        """The coordinator's one line for reply ``i`` (a refusal), or why the
        connection died before it."""
        if i >= len(self.replies):
            return str(SlaveUnreachable(self.name, f"slave {self.name}: {self.dead}"))
        r = self.replies[i]
        return str(translate(self.name, ControlError(r["error"], r["kind"])))

    def abort_outcome(self) -> str:
        """How the abort ended, in ``abort_one``'s words."""
        if len(self.replies) >= 2:
            r = self.replies[1]
            if r["ok"]:
                return "aborted"
            if r["kind"] in NOT_IN_CUT:
                return "not in cut"
            return f"failed: {self.error(1)}"
        if self.dead:
            return f"unreachable: {self.error(len(self.replies))}"
        return "no answer (its lease will thaw it)"

    def close(self) -> None:
        if self.sock is not None:
            self.sock.close()


@contextmanager
def realtime() -> Iterator[bool]:
    """Run the calling thread at the lowest real-time priority (SCHED_FIFO 1)
    where allowed (root, CAP_SYS_NICE), as the slaves' gate threads do
    (native/gate.c): between the first gate closing and the last opening,
    each wake-up of this thread must not wait behind the host's writers for
    a CPU.  Measured (bench_freeze's set-up, 4 slaves, writes running, two
    cores): gates held p50 0.68 -> 0.21 ms.  The thread only sleeps in
    select or does a few hundred microseconds of work; elsewhere (EPERM) it
    is a no-op.  Yields whether the priority was granted."""
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except (OSError, AttributeError):     # EPERM, or no such policy here
        yield False
        return
    try:
        yield True
    finally:
        os.sched_setscheduler(0, os.SCHED_OTHER, os.sched_param(0))


def pump(wires: list[Wire], done: Callable[[], bool], until: float) -> None:
    """Read replies from every live wire until ``done()`` or ``until``."""
    with selectors.DefaultSelector() as sel:
        for w in wires:
            if not w.dead:
                sel.register(w.sock, selectors.EVENT_READ, w)
        while not done() and sel.get_map():
            left = until - time.monotonic()
            if left <= 0:
                return
            for key, _ in sel.select(left):
                w = key.data
                w.pump()
                if w.dead:
                    sel.unregister(w.sock)
