"""Connection slots that nobody can hold against the coordinator.

A server keeps at most ``capacity`` connections (each costs a thread or a
poll slot).  Refusing the newest one when full lets anyone who can connect
-- on TCP without any certificate, since the handshake comes after the
accept -- keep the coordinator out with a handful of idle connections.  So
a full table makes room instead: the new connection takes the slot of the
one that can best spare it, in this order:

  1. a connection that has not authenticated and has sent nothing, the
     oldest first;
  2. one in the middle of its TLS handshake (it sent something), the
     oldest first;
  3. an authenticated one that has never sent a request, the oldest first;
  4. an authenticated one that has, the longest idle first.

A connection inside a request (``busy``) or marked ``pinned`` (it owns a
frozen cut: closing it would abort the cut) is never taken; when every slot
is such, the new connection is refused.  The coordinator sends its request
right after it connects and keeps using its connections, so it sits at the
far end of that order: a flood of idle connections evicts itself.  (A flood
that speaks the first TLS message competes with the coordinator's own
handshakes in class 2; only a certificate gets past it.)

native/gate.c applies the same order to the gate socket's slots.

Rejected: a per-address limit (one attacker address on TCP, one uid on unix
sockets: the coordinator shares both), and a reserved slot for the
coordinator (nothing tells its connection apart before it authenticates).

The table is a plain object: its owner serialises calls (one lock).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Callable, Generic, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)


@dataclass
class _Slot:
    admitted: float
    last: float
    authenticated: bool = False
    heard: bool = False
    used: bool = False
    busy: int = 0
    pinned: bool = False


@dataclass
class SlotTable(Generic[K]):
    """At most ``capacity`` connections, keyed by any hashable object."""

    capacity: int
    clock: Callable[[], float] = time.monotonic
    _slots: dict = field(default_factory=dict)

    def __post_init__(self):
        if self.capacity < 1:
            raise ValueError(f"capacity must be at least 1, not {self.capacity}")

    def __len__(self) -> int:
        return len(self._slots)

    def __contains__(self, key) -> bool:
        return key in self._slots

    def admit(self, key: K, authenticated: bool = False) -> tuple[bool, K | None]:
        """Take a slot for ``key``: ``(True, None)``, or ``(True, victim)``
        when full (the caller closes ``victim``, already forgotten here), or
        ``(False, None)`` when every slot is busy or pinned (refuse ``key``)."""
        victim = None
        if len(self._slots) >= self.capacity:
            victim = self.victim()
            if victim is None:
                return False, None
            del self._slots[victim]
        now = self.clock()
        self._slots[key] = _Slot(admitted=now, last=now, authenticated=authenticated)
        return True, victim

    def victim(self) -> K | None:
        """The connection a new one would replace (see the module doc), or None."""
        best, rank = None, None
        for key, s in self._slots.items():
            if s.busy or s.pinned:
                continue
            r = ((0 + s.heard, s.admitted) if not s.authenticated else
                 (2, s.admitted) if not s.used else (3, s.last))
            if rank is None or r < rank:
                best, rank = key, r
        return best

    def heard(self, key: K) -> None:
        """``key`` sent its first bytes (a handshake under way)."""
        s = self._slots.get(key)
        if s is not None:
            s.heard = True

    def authenticated(self, key: K) -> None:
        """``key`` finished its handshake (TLS), or needs none (unix socket)."""
        s = self._slots.get(key)
        if s is not None:
            s.authenticated = True
            s.last = self.clock()

    def busy(self, key: K) -> None:
        """A request of ``key`` is being served: never evict it meanwhile."""
        s = self._slots.get(key)
        if s is not None:
            s.busy += 1
            s.used = True
            s.last = self.clock()

    def done(self, key: K) -> None:
        """The request ``busy`` announced is answered."""
        s = self._slots.get(key)
        if s is not None:
            s.busy = max(0, s.busy - 1)
            s.last = self.clock()

    def pin(self, key: K, pinned: bool = True) -> None:
        """Keep ``key`` (e.g. it owns a frozen cut) until unpinned."""
        s = self._slots.get(key)
        if s is not None:
            s.pinned = pinned

    def release(self, key: K) -> bool:
        """Forget ``key``; False if it was not here (evicted before)."""
        return self._slots.pop(key, None) is not None

    def keys(self) -> list[K]:
        return list(self._slots)
