"""The running mirror's log: one line an event on stderr, quiet when idle.

Timestamps.  Under systemd with stderr connected to the journal (the
``JOURNAL_STREAM`` variable names stderr's device and inode, as
systemd.exec(5) says) the journal stamps each line itself; anywhere else
(a terminal, a log file, a pipe) each line begins with an ISO-8601 UTC time
with milliseconds, ``2026-12-07T14:12:47.123Z``.

Idle.  A mirror with nothing to send hardens an empty group every
interval (ten a second with ``interval_ms = 100``).  ``Quiet`` keeps those
off the log: empty groups are counted and said at most once a
``SUMMARY_EVERY_S`` (and before any other line, and at the end) as
"12 empty groups hardened since 14:12:47.123Z, last group 9"; failures,
groups that carried data and every other line are written at once.
"""

from __future__ import annotations

import os
import sys
import threading
import time
from typing import Callable

SUMMARY_EVERY_S = 60.0


def to_journal(fd: int = 2) -> bool:
    """Is ``fd`` the stream ``JOURNAL_STREAM`` names (systemd's journal)?"""
    js = os.environ.get("JOURNAL_STREAM", "")
    try:
        dev, ino = (int(x) for x in js.split(":"))
        st = os.fstat(fd)
    except (ValueError, OSError):
        return False
    return (st.st_dev, st.st_ino) == (dev, ino)


def stamp(t: float | None = None) -> str:
    """``t`` (unix time, default now) as ISO-8601 UTC with milliseconds."""
    t = time.time() if t is None else t
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(t)) + f".{int(t % 1 * 1000):03d}Z"


def stderr_log(prefix: str = "cgmirror mirror") -> Callable[[str], None]:
    """A log function writing ``prefix: line`` to stderr, time-stamped
    unless stderr is the journal."""
    journal = to_journal(2)

    def log(line: str) -> None:
        head = "" if journal else stamp() + " "
        print(f"{head}{prefix}: {line}", file=sys.stderr, flush=True)
    return log


class Quiet:
    """A log function that counts empty groups instead of writing each
    (see the module doc)."""

    def __init__(self, log: Callable[[str], None], every: float = SUMMARY_EVERY_S):
        self._log = log
        self.every = every
        self._said = time.monotonic()           # the last summary (or the start)
        self._count = 0
        self._since: float | None = None        # unix time of the first one counted
        self._last: int | None = None
        self._lock = threading.RLock()          # the cycle's and the control threads

    def __call__(self, line: str) -> None:
        with self._lock:
            self.flush()
            self._log(line)

    def empty(self, n: int) -> None:
        """Group ``n`` hardened with no byte to send."""
        with self._lock:
            if not self._count:
                self._since = time.time()
            self._count += 1
            self._last = n
            if time.monotonic() - self._said >= self.every:
                self.flush()

    def flush(self) -> None:
        """Say the empty groups counted so far, if any."""
        with self._lock:
            self._flush()

    def _flush(self) -> None:
        if self._count:
            n, since, last = self._count, self._since, self._last
            self._count, self._since, self._last = 0, None, None
            self._log(f"{n} empty group{'s' if n > 1 else ''} hardened since"
                      f" {stamp(since)[11:]}, last group {last}")
        self._said = time.monotonic()


__all__ = ["Quiet", "SUMMARY_EVERY_S", "stamp", "stderr_log", "to_journal"]
