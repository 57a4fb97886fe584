"""The primary's write lease (issue 19, ``fence = "lease"``): a primary takes
host writes only while its site holds a lease in etcd.

Theory of operation
===================

Keys (``P = {prefix}/{session}/``; wire/etcd.py's ``Etcd.key``):

``P/writer``                 the site whose primaries may take host writes:
                             JSON ``"a"`` or ``"b"``.  Written by the role
                             commands (coordinator/roles/failover.py); if
                             absent, the first node creates it as the
                             direction's source (``P/state/direction``),
                             default ``"a"``.
``P/leases/<site>/<node>``   this node's key, under its own etcd lease.

``WriteLease`` is one thread in the primary's nbdkit process.  Each round
(every ``ttl/3``):

1. holding no lease: read ``P/writer``; not this site -> nothing (writes
   stay refused).  This site, but a key of the other site still exists ->
   wait (that site's primaries may still take writes: a failback must not
   let this site write before the other's lease lapsed).  Else grant a
   lease and put the key in a txn guarded on ``P/writer == site``.
2. holding one: keepalive it, then put the key again in the same guarded
   txn.  The keepalive proves the lease lives; the guarded put proves, in
   one atomic step, that the key exists and that this site is still the
   writer.  The txn failing (writer moved) -> refuse writes, THEN revoke
   (the key goes; a failover waiting for it may go on only once this node
   refuses).  The lease gone (expired while cut off) -> back to 1.

The deadline.  After a successful round the gates' write deadline
(native/gate.c "The write lease") becomes ``t0 + ttl - margin`` where ``t0``
is the monotonic time the round's first request was SENT.  etcd starts a
keepalive's new TTL when it receives it, after ``t0``, so the key lives at
least until ``t0 + ttl`` and this node stops writing ``margin`` before
that, whatever happens to the thread, the process (SIGSTOP) or the
network after ``t0``: nothing has to run for the deadline to pass.  The
margin (``min(1 s, ttl/5)``) covers a write that passed the gate's check
just before the deadline and lands just after, and clock rate error.
A round that fails (etcd unreachable, no quorum) changes nothing: the
deadline lapses by itself within ``ttl - margin`` of the last good round,
and the host gets EIO for every write (reads are served) until a round
succeeds again -- availability for safety, as Patroni's primary does.

Taking a lease.  The txn guard is one key's value (wire/etcd.py's
``put_if_value``), so "the other site holds no key" is a read: before the
guarded put, and again after it, before the deadline is set.  The second
look closes the gap between the first and the put: a key of the other
site created after it can only have been created while that site was the
writer, i.e. after our put, and a role command making it the writer waits
for our key to go first (``take_writer``).  So the two sites' keys -- and
so their deadlines -- never overlap, however the writer flips.

Why a failover is safe: ``P/writer = b`` is put first; from that revision
on no key under ``P/leases/a/`` can be created or renewed (the txn guard),
and the failover waits until none is left.  A key lives at least as long
as its holder's deadline, so once none is left no site-a primary takes a
write, and only then are site b's nodes promoted.

Rejected: re-checking ``P/writer`` by a separate read before each renewal
(a read and a renewal are two steps; the guarded put is one); a watch (a
stalled watch looks like a quiet one; a deadline needs no news); stopping
for good once the writer moved (a primary kept across ``resync`` or
``failback`` would never write again: it resumes once this site is the
writer and the other site's keys are gone).
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
from typing import Callable, Iterable

from native.gate import Gate, monotonic_ns

log = logging.getLogger(__name__)

SITES = ("a", "b")
# Before the first round: a deadline in the past (0 would mean "no lease
# mode").
EXPIRED = 1


def other(site: str) -> str:
    return "b" if site == "a" else "a"


def writer_value(site: str) -> bytes:
    """``P/writer``'s value for ``site`` (JSON text, as every value)."""
    return json.dumps(site).encode()


def parse_writer(value: bytes | None) -> str | None:
    """The site a ``P/writer`` value names; None if absent or not a site."""
    if value is None:
        return None
    try:
        site = json.loads(value)
    except ValueError:
        return None
    return site if site in SITES else None


def writer_key(etcd, session: str) -> str:
    return etcd.key(session, "writer")


def leases_prefix(etcd, session: str, site: str) -> str:
    """The prefix of every lease key of ``site`` (with its trailing /)."""
    return etcd.key(session, "leases", site) + "/"


def margin_s(ttl: int) -> float:
    return min(1.0, ttl / 5)


class WriteLease:
    """Keeps this primary's write lease; see the module doc.  ``gates``: the
    primary's volumes' gates (their deadlines are set here)."""

    def __init__(self, etcd, session: str, site: str, node: str, ttl: int,
                 gates: Iterable[Gate], clock: Callable[[], int] = monotonic_ns):
        if site not in SITES:
            raise ValueError(f"site must be a or b, not {site!r}")
        self.etcd = etcd
        self.session = session
        self.site = site
        self.node = node
        self.ttl = int(ttl)
        self.gates = list(gates)
        self.clock = clock
        self.key = etcd.key(session, "leases", site, node)
        self.writer_key = writer_key(etcd, session)
        self.other_prefix = leases_prefix(etcd, session, other(site))
        self.margin_ns = int(margin_s(self.ttl) * 1e9)
        self.interval = self.ttl / 3
        self.lease = 0
        self.deadline = EXPIRED
        self.writer: str | None = None      # as last read
        self.why = "no round yet"           # why writes are refused (status)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()       # one round at a time (thread, stop)
        self._failing = False
        self._error: str | None = None     # the last round's failure
        self._rounds = 0
        self._set_deadline(EXPIRED)

    # ------------------------------------------------------------ deadline

    def _set_deadline(self, deadline_ns: int) -> None:
        self.deadline = deadline_ns
        for g in self.gates:
            g.set_deadline(deadline_ns)

    def held(self) -> bool:
        return self.clock() < self.deadline

    def status(self) -> dict:
        """The status op's ``write_lease``."""
        left = (self.deadline - self.clock()) / 1e9
        held = left > 0
        out = {"held": held, "expires_in_s": round(left, 3) if held else 0.0,
               "writer": self.writer, "site": self.site, "ttl_s": self.ttl}
        if not held:
            out["why"] = self.why or (f"etcd unreachable: {self._error}" if self._error
                                      else "the lease lapsed")
        return out

    # ------------------------------------------------------------ rounds

    def _value(self) -> bytes:
        # Unique per round: wire/etcd.py takes a guarded put whose reply was
        # lost and whose retry's compare failed for its own write if the key
        # holds the same value under the same lease; the previous round's
        # value must never pass for this one (the writer may have moved).
        self._rounds += 1
        return json.dumps({"node": self.node, "host": socket.gethostname(),
                           "pid": os.getpid(), "round": self._rounds}).encode()

    def _refuse(self, why: str) -> None:
        """Refuse writes from now on, then let the lease go (in that order:
        the key's end may let a failover promote the other site)."""
        self._set_deadline(EXPIRED)
        if self.why != why:
            log.warning("write lease of %s (site %s): host writes refused: %s",
                        self.node, self.site, why)
        self.why = why
        lease, self.lease = self.lease, 0
        if lease:
            try:
                self.etcd.revoke(lease)
            except Exception as exc:   # it lapses by itself within ttl
                log.warning("could not revoke write lease %x: %s", lease, exc)

    def _read_writer(self) -> str | None:
        kv = self.etcd.get(self.writer_key)
        if kv is None:
            # First node of the session in lease mode: the direction's source.
            src = "a"
            d = self.etcd.get(self.etcd.key(self.session, "state", "direction"))
            if d is not None:
                try:
                    src = json.loads(d.value).get("source", "a")
                except (ValueError, AttributeError):
                    pass
            if src not in SITES:
                src = "a"
            self.etcd.create(self.writer_key, writer_value(src))
            kv = self.etcd.get(self.writer_key)
        return parse_writer(kv.value if kv else None)

    def round(self) -> bool:
        """One renewal round; True if writes are allowed after it.  Raises
        what the etcd client raises (the deadline stays as it was)."""
        with self._lock:
            return self._round()

    def _round(self) -> bool:
        t0 = self.clock()
        if self.lease:
            if self.etcd.keepalive(self.lease) <= 0:
                self.lease = 0
                self._set_deadline(EXPIRED)
                self.why = "the lease expired in etcd (cut off longer than its ttl)"
                log.warning("write lease of %s (site %s) expired in etcd; taking a new one",
                            self.node, self.site)
            elif self.etcd.put_if_value(self.key, self._value(), self.writer_key,
                                        writer_value(self.site), lease=self.lease):
                self._set_deadline(t0 + self.ttl * 1_000_000_000 - self.margin_ns)
                self.writer = self.site
                return True
            else:
                self.writer = self._read_writer()
                self._refuse(f"site {self.writer} is the writer now"
                             if self.writer else "P/writer is gone")
                return False
        # No lease: take one if this site is the writer and the other
        # site holds none.
        t0 = self.clock()
        self.writer = self._read_writer()
        if self.writer != self.site:
            self._refuse(f"site {self.writer} is the writer (P/writer)")
            return False
        held = self.etcd.get_prefix(self.other_prefix)
        if held:
            self.why = (f"site {other(self.site)} still holds write leases"
                        f" ({', '.join(kv.key.rsplit('/', 1)[-1] for kv in held)})")
            return False
        lease = self.etcd.grant(self.ttl)
        if not self.etcd.put_if_value(self.key, self._value(), self.writer_key,
                                      writer_value(self.site), lease=lease):
            self.etcd.revoke(lease)
            self.why = "the writer moved while the lease was taken"
            return False
        # Again, now that our key exists: the first look and the put are two
        # steps (module doc, "Taking a lease").
        held = self.etcd.get_prefix(self.other_prefix)
        if held:
            self.etcd.revoke(lease)
            self.why = (f"site {other(self.site)} still holds write leases"
                        f" ({', '.join(kv.key.rsplit('/', 1)[-1] for kv in held)})")
            return False
        self.lease = lease
        self._set_deadline(t0 + self.ttl * 1_000_000_000 - self.margin_ns)
        if self.why:
            log.info("write lease of %s (site %s) held (lease %x, ttl %d s): host writes"
                     " accepted", self.node, self.site, lease, self.ttl)
        self.why = ""
        return True

    # ------------------------------------------------------------ thread

    def start(self) -> None:
        """One round now (bounded by the client's timeouts), then the
        thread; after any fork."""
        self._try_round()
        self._thread = threading.Thread(target=self._run, name="write-lease", daemon=True)
        self._thread.start()

    def _try_round(self) -> None:
        try:
            self.round()
            self._failing = False
            self._error = None
        except Exception as exc:
            self._error = str(exc)
            if not self._failing:
                log.warning("write lease of %s (site %s): etcd round failed: %s; host"
                            " writes stop %.1f s after the last good round", self.node,
                            self.site, exc, self.ttl - self.margin_ns / 1e9)
            self._failing = True

    def _run(self) -> None:
        next_at = time.monotonic()
        while True:
            next_at += self.interval
            now = time.monotonic()
            if next_at < now:           # a slow round: go on from now
                next_at = now + (self.interval / 4 if self._failing else self.interval)
            if self._stop.wait(max(0.0, next_at - now)):
                self.etcd.close()       # this thread's connections
                return
            self._try_round()

    def stop(self) -> None:
        """Refuse writes and let the lease go (clean shutdown)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=self.interval + 5)
        with self._lock:
            self._refuse("the node is stopping")
        self.etcd.close()
