"""The freeze gate of one volume.

Every modifying request (write, trim, zero) passes ``enter()`` before it
touches the volume and ``leave()`` after; reads do not pass the gate.
``close()`` stops new entries and waits for those inside to leave; after it
returns, no modifying request is inside and none can start until ``open()``.

Held writers are admitted in arrival order when the gate opens (a ticket
queue), and while any are queued new arrivals queue behind them, so a thaw
never lets a late write overtake an early one.
"""

from __future__ import annotations

import threading
import time


class Gate:
    def __init__(self) -> None:
        # Entering and leaving an open gate take only the plain lock (the hot
        # path); waiting goes through the condition built on the same lock.
        self._lock = threading.Lock()
        self._cond = threading.Condition(self._lock)
        self._closed = False
        self._inside = 0
        self._next_ticket = 0   # next ticket to hand out to a waiter
        self._serving = 0       # ticket allowed in next
        self.closed_at: float | None = None

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def inside(self) -> int:
        return self._inside

    @property
    def waiting(self) -> int:
        return self._next_ticket - self._serving

    def enter(self) -> None:
        with self._lock:
            if not self._closed and self._next_ticket == self._serving:
                self._inside += 1
                return
            ticket = self._next_ticket
            self._next_ticket += 1
            while self._closed or ticket != self._serving:
                self._cond.wait()
            self._serving += 1
            self._inside += 1
            self._cond.notify_all()

    def leave(self) -> None:
        with self._lock:
            self._inside -= 1
            # Only close() waits for the last one out, and only while closed.
            if self._inside == 0 and self._closed:
                self._cond.notify_all()

    def close(self, timeout: float) -> bool:
        """Close and wait up to ``timeout`` s for requests inside to leave.

        Returns False (gate left closed) if they did not; the caller decides
        whether to reopen.
        """
        with self._cond:
            self._closed = True
            self.closed_at = time.monotonic()
            return self._cond.wait_for(lambda: self._inside == 0, timeout)

    def open(self) -> float:
        """Open the gate; return how long it was closed, in seconds."""
        with self._cond:
            held = time.monotonic() - self.closed_at if self._closed else 0.0
            self._closed = False
            self.closed_at = None
            self._cond.notify_all()
            return held
