"""Data lineage of a volume, and the compare that says which way two sides
may be joined -- the part DRBD's generation identifiers play
(drbd_receiver.c, ``drbd_uuid_compare``).  Pure: no files, no sockets.

A node keeps, per volume (nbdplugin/noderecord.py writes it durably in its
``node.json`` before it acts on it), a LINEAGE:

    {"current": "16 hex",        generation of the data lineage the image is in
     "history": [[gen, n], ...], newest first, at most MAX_HISTORY: the
                                 generations this image left, each at the
                                 hardened group n it held when it left it
     "hardened": n,              last hardened group of `current` it holds
     "cut": n,                   primary: last cut whose drain may have reached
                                 the peer (recorded before the drain writes)
     "own": bool}                secondary: demoted holding writes the peer
                                 never got

The events that change it are the functions below, numbered as in the
team's spec: 1 ``fresh`` (first start), 2 ``promote`` (role to primary, a
DR test included), 3 ``demote`` (role to secondary), 4/5 ``take`` (a
secondary's commit or assume naming the peer's generation), 6 ``replaced``
(the volume's file is not the one recorded).  Each returns a new dict and
leaves its argument alone, so that the caller writes the new one durably
before it adopts it.

Generations are 64 random bits: two sides share one only by having been in
sync.  A promotion starts a new generation, so a node that was promoted and
written is told apart from one that only kept the old one.

How far an image reaches in its generation: a secondary holds its hardened
group; a primary holds every cut it made (its ``cut``), and its unsent
writes besides (``dirty``: any change bit).  A side is *ahead* of group n of
a generation when it is dirty or reaches past n: it holds something the
other side never got.

The compare is one table of numbered rules, first match wins; the rule
number is in the verdict, its log line and every refusal built on it:

  rule 1  same current; neither ahead of the other, or only the source
          -> in-sync (the source's changes are what a mirror sends)
  rule 2  same current; only the target ahead        -> target-newer
  rule 3  same current; both ahead                   -> diverged
  rule 4  the target's current is in the source's history at n (the source
          was promoted from it); the target not ahead of n -> source-newer
  rule 5  as 4, but the target ahead of n            -> diverged
  rule 6  the source's current is in the target's history at n; the source
          not ahead of n                              -> target-newer
  rule 7  as 6, but the source ahead of n            -> diverged
  rule 8  a generation in both histories (both promoted since)
                                                     -> diverged
  rule 9  no generation in common (a replaced file, a fresh node)
                                                     -> unrelated

Decided where the spec left room: "ahead" counts a primary's ``cut`` past
the common group, not only its dirty bits -- a primary whose drain of group
c may have reached the peer, which then rolled back or was promoted at
n < c, has writes the peer lost even after its bits were cleared.  Rule 1
also looks at how far each side reaches, so that a secondary that hardened
more of the same generation than the other side is not overwritten by it.
Rejected: comparing only ``current`` and a dirty flag (DRBD's bitmap
UUID); a cleared drain leaves no bit behind, so the cut has to be kept.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass

from wire.protocol import MAX_HISTORY

KINDS = ("in-sync", "source-newer", "target-newer", "diverged", "unrelated")


def new_generation() -> str:
    """64 random bits as 16 hex digits."""
    return secrets.token_hex(8)


def short(gen: str) -> str:
    """A generation as people read it: its first 8 hex digits."""
    return gen[:8]


# ---------------------------------------------------------------- events

def fresh() -> dict:
    """Event 1: a volume the node has never recorded."""
    return {"current": new_generation(), "history": [], "hardened": 0, "cut": 0,
            "own": False}


def _left(lin: dict) -> list:
    """The history with ``current`` pushed on top at its hardened group."""
    return ([[lin["current"], lin["hardened"]]] + [list(h) for h in lin["history"]]
            )[:MAX_HISTORY]


def promote(lin: dict) -> dict:
    """Event 2: the node becomes a primary (failover, switchover, DR test):
    a new generation starts where the hardened group left the old one.
    Its cuts are counted again in the new generation."""
    return {**lin, "history": _left(lin), "current": new_generation(), "cut": 0,
            "own": False}


def demote(lin: dict, dirty: bool) -> dict:
    """Event 3: the node becomes a secondary; ``dirty``: it holds writes
    (change bits) the peer never got.  Its ``cut`` is kept: a drain that
    may have reached the peer past the peer's group is found by compare."""
    return {**lin, "own": bool(dirty)}


def take(lin: dict, gen: str, n: int) -> dict:
    """Events 4 and 5: a secondary's commit or assume of group ``n`` of the
    peer's generation ``gen``: its image now is that group."""
    out = dict(lin)
    if lin["current"] != gen:
        out["history"] = _left(lin)
        out["current"] = gen
        out["cut"] = 0
    out["hardened"] = n
    out["own"] = False
    return out


def replaced() -> dict:
    """Event 6: the volume's file is not the one the lineage was about."""
    return fresh()


def reach(lin: dict) -> int:
    """The highest group of ``current`` the image may hold."""
    return max(lin["hardened"], lin["cut"])


# ---------------------------------------------------------------- compare

@dataclass(frozen=True)
class Side:
    """One side of a join as the compare sees it: a volume's status
    ``{"lineage": ..., "dirty": ...}`` and a name for messages."""

    lineage: dict
    dirty: bool
    name: str

    @classmethod
    def of(cls, status: dict, name: str) -> "Side":
        lin = status["lineage"]
        dirty = bool(status.get("dirty", lin.get("own", False)))
        return cls(lin, dirty, name)

    def branch(self, gen: str) -> int | None:
        """The group at which this side left ``gen``, or None."""
        for g, n in self.lineage["history"]:
            if g == gen:
                return n
        return None

    def ahead(self, n: int) -> bool:
        """Holds anything past group ``n`` of its current generation."""
        return self.dirty or reach(self.lineage) > n


@dataclass(frozen=True)
class Verdict:
    """What joining ``src`` to ``tgt`` would do (see the rules above)."""

    kind: str                       # one of KINDS
    rule: int
    common: tuple[str, int] | None  # (generation, group) both hold, if any
    src: Side
    tgt: Side

    @property
    def safe(self) -> bool:
        """A join src -> tgt loses nothing the target holds."""
        return self.kind in ("in-sync", "source-newer")

    @property
    def first(self) -> bool:
        """The target never held a group of any lineage and holds no own
        writes (a new node, or a replaced file: its status says which)."""
        lin = self.tgt.lineage
        return (self.kind == "unrelated" and not lin["history"] and not lin["hardened"]
                and not lin["cut"] and not self.tgt.dirty)

    def _describe(self, side: Side) -> str:
        lin = side.lineage
        n = None
        if self.common and self.common[0] != lin["current"]:
            n = side.branch(self.common[0])
        where = (f"group {reach(lin)}" if n is None
                 else f"from {short(self.common[0])} at group {n}")
        return (f"{side.name} at generation {short(lin['current'])} ({where}"
                f"{' + writes' if side.dirty else ''})")

    def line(self) -> str:
        """One line naming both generations, e.g. "a/vol0 at generation
        3f2a91c0 (group 12 + writes) and b/vol0 at generation 77e01b2d
        (from 3f2a91c0 at group 12 + writes)"."""
        return f"{self._describe(self.src)} and {self._describe(self.tgt)}"

    def why(self) -> str:
        """The verdict in one line, with its rule number."""
        what = {"in-sync": "in sync", "source-newer": f"{self.src.name} is newer",
                "target-newer": f"{self.tgt.name} is newer",
                "diverged": "diverged (both written since their common generation)",
                "unrelated": "unrelated (no common generation: only a full resync"
                             " joins them)"}[self.kind]
        return f"{what}: {self.line()} [lineage rule {self.rule}]"


def compare(src: dict, tgt: dict, src_name: str = "source",
            tgt_name: str = "target") -> Verdict:
    """The verdict for joining ``src`` to ``tgt`` (each a volume's status:
    ``{"lineage": LINEAGE, "dirty": bool}``), by the first rule that
    matches (the table at the top)."""
    s, t = Side.of(src, src_name), Side.of(tgt, tgt_name)
    sl, tl = s.lineage, t.lineage

    def verdict(kind, rule, common):
        return Verdict(kind, rule, common, s, t)

    if sl["current"] == tl["current"]:
        common = (sl["current"], min(reach(sl), reach(tl)))
        t_ahead = t.dirty or reach(tl) > reach(sl)
        s_ahead = s.dirty or reach(sl) > reach(tl)
        if not t_ahead:
            return verdict("in-sync", 1, common)
        if not s_ahead:
            return verdict("target-newer", 2, common)
        return verdict("diverged", 3, common)
    n = s.branch(tl["current"])
    if n is not None:
        common = (tl["current"], n)
        return verdict("diverged", 5, common) if t.ahead(n) else \
            verdict("source-newer", 4, common)
    n = t.branch(sl["current"])
    if n is not None:
        common = (sl["current"], n)
        return verdict("diverged", 7, common) if s.ahead(n) else \
            verdict("target-newer", 6, common)
    for g, ns in sl["history"]:
        nt = t.branch(g)
        if nt is not None:
            return verdict("diverged", 8, (g, min(ns, nt)))
    return verdict("unrelated", 9, None)
