"""Lineage checks before every join of two sides (DESIGN.md "Hosts, roles
and lineage"): ``mirror run`` (``Mirror.run_once``), ``resync``,
``failback``, ``switchover`` and ``copy`` to a secondary all call ``check``
with the statuses they read anyway, before they send a block.

Each pair (a primary's volume, the secondary volume it mirrors to) is
compared with wire/lineage.py's ``compare`` (the rules, numbered, live
there); what a join does with the verdict is decided here, one outcome per
kind:

- ``in-sync``, ``source-newer``: the only safe direction; proceed.
- ``unrelated`` where the target never held a group of anyone's
  (hardened 0, no history, no writes of its own): the first copy of a
  fresh pair; proceed (it copies whole).
- ``unrelated`` otherwise, or a volume reported ``replaced``: only a full
  resync joins them; refused unless asked (``full``).
- ``target-newer``: the target holds what the source lacks; refused,
  naming the command that sends the other way.
- ``diverged`` (split brain): refused, naming both generations and
  ``cgmirror resync --from X --to Y [--keep-overwritten DIR]``, unless the
  operator named the winner (``winner``: ``resync --from X --to Y``), then
  the caller says how many blocks of the loser it overwrites.

A node that does not report lineage (older than issue 18) is not checked.
Rejected: letting the newer side win by itself (DRBD's
``after-sb-*`` automatic policies): an acknowledged write would vanish
without anyone having said so.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..errors import DirectionError
from ..session import Session

SAFE = ("in-sync", "source-newer")


@dataclass(frozen=True)
class Pair:
    """One checked pair and its verdict (``wire.lineage.Verdict``)."""

    primary: str
    volume: str
    secondary: str
    remote_volume: str
    verdict: object

    @property
    def kind(self) -> str:
        return self.verdict.kind


def sites_of(oriented: Session, source: str | None) -> tuple[str, str]:
    """(source site, target site) names for messages."""
    if source is None:
        return "X", "Y"
    return source, ("b" if source == "a" else "a")


def compare(oriented: Session, primaries: dict, secondaries: dict) -> list[Pair]:
    """Every pair's verdict; pairs whose nodes report no lineage are left out."""
    from wire import lineage          # helper N's module: imported where used
    out = []
    for s, v, r, rv in oriented.pairs():
        src = (primaries.get(s) or {}).get("volumes", {}).get(v)
        tgt = (secondaries.get(r) or {}).get("volumes", {}).get(rv)
        if not src or not tgt or "lineage" not in src or "lineage" not in tgt:
            continue
        out.append(Pair(s, v, r, rv, lineage.compare(src, tgt, f"{s}/{v}", f"{r}/{rv}")))
    return out


def check(oriented: Session, primaries: dict, secondaries: dict, *,
          source: str | None = None, winner: bool = False, full: bool = False
          ) -> list[Pair]:
    """Raise DirectionError (one line) unless every pair of ``oriented`` may
    be joined from its primaries to its secondaries now; return the pairs
    (``winner``: the operator named the source the winner; ``full``: a full
    copy was asked for)."""
    x, y = sites_of(oriented, source)
    for s, v, r, rv in oriented.pairs():
        for node, vol in ((s, v), (r, rv)):
            st = (primaries if node == s else secondaries).get(node) or {}
            line = (st.get("volumes", {}).get(vol) or {}).get("replaced")
            if line and not full:
                named = line.replace("--from SOURCE --to TARGET", f"--from {x} --to {y}")
                raise DirectionError(named if "cgmirror resync" in named else
                                     f"{named} (`cgmirror resync --from {x} --to {y}"
                                     f" --full` copies it whole)")
    pairs = compare(oriented, primaries, secondaries)
    for p in pairs:
        k = p.kind
        if k in SAFE:
            continue
        if k == "unrelated" and (full or p.verdict.first):
            continue
        if k == "unrelated":
            raise DirectionError(
                f"{p.verdict.why()}: a replaced or foreign image; `cgmirror resync"
                f" --from {x} --to {y} --full` (or --from {y} --to {x} --full) copies it"
                f" whole")
        if winner:
            continue                  # the operator named the winner
        if k == "target-newer":
            raise DirectionError(
                f"{p.verdict.why()}: sending from site {x} would overwrite site {y}'s"
                f" writes; `cgmirror resync --from {y} --to {x}` (or `cgmirror"
                f" failback`) sends the safe way")
        raise DirectionError(
            f"split brain: {p.verdict.why()}: nothing is sent until you name the"
            f" winner: `cgmirror resync --from {x} --to {y} [--keep-overwritten DIR]`"
            f" or `cgmirror resync --from {y} --to {x} [--keep-overwritten DIR]`")
    return pairs


def gens(oriented: Session, primaries: dict) -> dict[str, dict[str, str]]:
    """{secondary: {remote volume: the generation of the primary volume it
    mirrors}} from the primaries' statuses, for ``commit``/``assume``'s
    ``gens`` (wire/lineage.py events 4 and 5); empty where a node reports
    no lineage."""
    out: dict[str, dict[str, str]] = {}
    for s, v, r, rv in oriented.pairs():
        st = primaries.get(s)
        lin = st.get("volumes", {}).get(v, {}).get("lineage") if isinstance(st, dict) else None
        if isinstance(lin, dict) and lin.get("current"):
            out.setdefault(r, {})[rv] = lin["current"]
    return out


def split(pairs: list[Pair]) -> list[Pair]:
    """The pairs a join would overwrite writes of the loser in."""
    return [p for p in pairs if p.kind not in SAFE and p.kind != "unrelated"]


__all__ = ["Pair", "SAFE", "check", "compare", "gens", "split"]
