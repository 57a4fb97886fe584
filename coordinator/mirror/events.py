"""Events of a running mirror, one JSON object per line (``cgmirror events``).

Like ``drbdsetup events2``: a client opens the mirror's control socket, sends
``{"op": "subscribe"}`` and then reads one line per event until it closes
the connection.  Every event has ``time`` (unix seconds), ``session`` and
``event``, one of::

    group-formed   n, bytes, hold_ms, drain_ms
    group-failed   n (null: no group began), outcome (drain-timeout, aborted,
                   failed), error
    pause, resume
    verify         group, differing_blocks, repaired (coordinator/mirror/verify.py)
    slave-up, slave-down        name, role (primary or secondary), error (down)
    failover       action (failover, dr-test, end-test), site (the one now
                   writable, or given back for end-test), hardened (the group
                   it stands at)
    leader         epoch, host, previous (the leader before, {host, pid,
                   epoch} or null): this coordinator leads (cluster mode)
    standby        leader ({host, pid, epoch}): it stands by behind that leader
    leader-lost    epoch, why: it led and lost the lease; its group was
                   abandoned (never committed)
    fenced         epoch, error: a node refused its request, as deposed
    no-quorum      error: etcd does not answer; no group forms

``failover`` comes from ``cgmirror failover [--test | --end-test]``
(coordinator/roles/failover.py), which tells a running mirror of the
session over its control socket (op ``role``) what it did; the mirror
emits it.  With no mirror running nobody can be subscribed, so nothing is
lost.  ``resync``, ``switchover`` and ``failback`` emit none: they run the
cycle themselves under the session lock, so no mirror (and no ``cgmirror
events``) can run while they do; what they did is in the direction record the nodes hold
(coordinator/direction.py) and in the history's groups.

Cluster mode: every event also goes to etcd (``P/events/``, with the
``host`` and ``pid`` of the coordinator that emitted it, kept about ten
minutes; empty groups' ``group-formed`` stay out), and ``cgmirror events``
reads them there, so a takeover on another host shows on every host.

``EventBus`` fans events out to subscribers in the mirror process; a
subscriber that does not keep up loses its oldest events (a bounded queue:
one slow ``cgmirror events`` must never stall the cycle) and gets an
``{"event": "overflow", "lost": N}`` line saying so.  ``PeerWatch`` polls
every slave and secondary once a second with links of its own (the cycle's
links are not shared between threads) to see them come and go; the metrics
(coordinator/mirror/metrics.py) read its last replies.
"""

from __future__ import annotations

import json
import queue
import socket
import threading
import time
from typing import Callable

from .. import group
from ..link import SlaveLink

QUEUE_MAX = 1000            # events kept for one slow subscriber
WATCH_INTERVAL_S = 1.0


class EventBus:
    """Events of one session to every subscriber, in order."""

    def __init__(self, session: str):
        self.session = session
        self._lock = threading.Lock()
        self._subs: list[queue.Queue] = []
        # Cluster mode: every event also goes to etcd (coordinator/cluster.py
        # Publisher.event, which never blocks).
        self.sink: Callable[[dict], None] | None = None

    def emit(self, event: str, **fields) -> dict:
        """Send ``event`` to every subscriber; return the event."""
        doc = {"time": round(time.time(), 3), "session": self.session, "event": event}
        doc.update(fields)
        with self._lock:
            for q in self._subs:
                try:
                    q.put_nowait(doc)
                except queue.Full:
                    # Drop the oldest; the subscriber learns how many it lost.
                    try:
                        q.get_nowait()
                    except queue.Empty:
                        pass
                    q.lost = getattr(q, "lost", 0) + 1
                    q.put_nowait(doc)
        if self.sink is not None:
            self.sink(doc)
        return doc

    def subscribe(self) -> queue.Queue:
        q: queue.Queue = queue.Queue(QUEUE_MAX)
        with self._lock:
            self._subs.append(q)
        return q

    def unsubscribe(self, q: queue.Queue) -> None:
        with self._lock:
            if q in self._subs:
                self._subs.remove(q)

    def stream(self, conn: socket.socket, stopping: Callable[[], bool]) -> None:
        """Write events to ``conn`` until the peer goes away or ``stopping()``."""
        q = self.subscribe()
        try:
            conn.sendall(_line({"ok": True, "event": "subscribed",
                                "session": self.session}))
            while not stopping():
                try:
                    doc = q.get(timeout=0.5)
                except queue.Empty:
                    continue
                lost = getattr(q, "lost", 0)
                if lost:
                    q.lost = 0
                    conn.sendall(_line({"event": "overflow", "lost": lost}))
                conn.sendall(_line(doc))
        except OSError:
            return                  # the subscriber left
        finally:
            self.unsubscribe(q)


def _line(doc: dict) -> bytes:
    return (json.dumps(doc, separators=(",", ":")) + "\n").encode()


ROLE_ACTIONS = ("failover", "dr-test", "end-test")


def emit_failover(bus: EventBus, action: str, site: str, hardened: int) -> dict:
    """The failover event: ``action`` (ROLE_ACTIONS) made ``site`` writable
    at group ``hardened`` (``end-test``: made it a secondary again)."""
    return bus.emit("failover", action=action, site=site, hardened=hardened)


class PeerWatch:
    """Polls every slave and secondary of a mirror once a second; emits
    slave-up/slave-down when one changes; keeps the last replies."""

    def __init__(self, bus: EventBus, slaves: list[SlaveLink],
                 secondaries: list[SlaveLink]):
        self.bus = bus
        self.links = [(lk, "primary") for lk in slaves] + \
                     [(lk, "secondary") for lk in secondaries]
        self.replies: dict[str, dict | Exception] = {}
        self._up: dict[str, bool] = {}
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def start(self) -> "PeerWatch":
        self._thread = threading.Thread(target=self._run, name="mirror-peers",
                                        daemon=True)
        self._thread.start()
        return self

    def close(self) -> None:
        self._stop.set()
        if self._thread:
            self._thread.join(30)
            self._thread = None
        for lk, _ in self.links:
            lk.close()

    def poll(self) -> None:
        """One round: ask everyone, emit what changed."""
        replies = group.statuses([lk for lk, _ in self.links])
        self.replies = replies
        for lk, role in self.links:
            r = replies.get(lk.name)
            up = not isinstance(r, Exception)
            if self._up.get(lk.name) == up:
                continue
            self._up[lk.name] = up
            if up:
                self.bus.emit("slave-up", name=lk.name, role=role)
            else:
                self.bus.emit("slave-down", name=lk.name, role=role, error=str(r))

    def up(self, name: str) -> bool | None:
        return self._up.get(name)

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                self.poll()
            except Exception as exc:        # never kill the mirror for a status
                self.replies = {lk.name: exc for lk, _ in self.links}
            self._stop.wait(WATCH_INTERVAL_S)
