"""What went wrong last, per pair and per node, for ``mirror status``.

A group that fails says why in one line (``GroupResult.error``), but the
operator asks "which pair, which node?": a secondary out of space, an I/O
error on one volume, a refused connection.  ``Failures`` keeps, until a
group hardens, the last failure of

* each pair ``S/V`` (primary volume -> its secondary volume), from a drain
  failure of that volume (``CopyFailed.failures`` keys it ``S/V``) or a
  slave error that names a volume (``UnknownVolume``);
* each node (primary or secondary), from an error that names it
  (``SlaveError.slave``, ``EstablishAborted.slave``, a prepare or commit
  that failed on it, ``CopyFailed`` keyed by a slave alone);
* the mirror itself (``general``), for what names neither (a session file
  changed under the mirror, a direction that parks it).

A hardened group covers every pair of the session, so it clears them all.
"""

from __future__ import annotations

import threading
import time

from ..errors import CopyFailed, EstablishAborted, SlaveError, describe


class Failures:
    def __init__(self, session):
        self.session = session
        self._lock = threading.Lock()
        self.pairs: dict[str, dict] = {}        # "S/V" -> {"error", "group", "at"}
        self.nodes: dict[str, dict] = {}        # node -> {"error", "group", "at"}
        self.general: dict | None = None

    def _entry(self, error: str, n: int | None) -> dict:
        return {"error": error, "group": n, "at": round(time.time(), 3)}

    def note(self, exc: BaseException, n: int | None) -> None:
        """Attribute ``exc`` (why group ``n``, or no group, failed)."""
        with self._lock:
            if isinstance(exc, CopyFailed):
                for key, line in exc.failures.items():
                    if "/" in key:
                        self.pairs[key] = self._entry(line, n)
                    else:
                        self.nodes[key] = self._entry(line, n)
                return
            who = getattr(exc, "slave", None)
            vol = getattr(exc, "volume", None)
            if who and vol:
                self.pairs[f"{who}/{vol}"] = self._entry(describe(exc), n)
            elif who and isinstance(exc, (SlaveError, EstablishAborted)):
                self.nodes[who] = self._entry(describe(exc), n)
            else:
                self.general = self._entry(describe(exc), n)

    def node(self, name: str, error: str, n: int | None) -> None:
        with self._lock:
            self.nodes[name] = self._entry(error, n)

    def mirror(self, error: str, n: int | None) -> None:
        with self._lock:
            self.general = self._entry(error, n)

    def clear(self) -> None:
        """A group hardened: every pair is as good as its group."""
        with self._lock:
            self.pairs.clear()
            self.nodes.clear()
            self.general = None

    def of_pair(self, slave: str, volume: str, secondary: str) -> dict | None:
        """The failure to show on pair ``slave/volume`` (mirrored to
        ``secondary``): its own, else its primary's, else its secondary's."""
        with self._lock:
            return (self.pairs.get(f"{slave}/{volume}") or self.nodes.get(slave)
                    or self.nodes.get(secondary))

    def document(self) -> dict:
        with self._lock:
            return {"pairs": dict(self.pairs), "nodes": dict(self.nodes),
                    "mirror": self.general}


__all__ = ["Failures"]
