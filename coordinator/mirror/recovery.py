"""The recovery rule of a mirrored session's secondaries, as plain functions
over the session's control links: the mirror runs it before a group when a
harden failed (or at start), and the role commands
(coordinator/roles/failover.py) run it to settle a site.

Prepare or commit failures.  The rule can always finish the job, so every
harden failure simply marks the mirror "needs recovery" and the next group
starts with it:

* any secondary committed n -> commit n on every one prepared n (forward);
* else, if some prepared n: prepare n on the others and commit n on all
  (forward too).  DESIGN.md says roll back here; forward is as sound,
  because prepare is only ever sent once every drain of n has finished
  (each primary cleared its bits only after its secondary flushed them),
  so every secondary holds all of n.  Rolling back would resend every
  block of the group; before main's 0bffd00 it also broke the primaries'
  baseline proof (samples read after the drain, blocks rewritten by the
  rollback: the next copy was a full one -- tests/test_mirror.py's
  kill -9 after prepare found it).
* only if that is refused: every secondary prepared n is rolled back to the
  common hardened group; the blocks it restored land in its ``tgt`` map;
* then for each secondary volume with ``tgt`` blocks: ``mark`` them on the
  primary volume it mirrors (durable in ``cr``: resent by the next group),
  and only then ``clear_tgt`` them (a crash between the two resends a block
  twice, never loses one).

Rejected: rolling back a secondary after an abandoned drain (it would resend
every block the drain had confirmed, and a group under overload would never
form; ``settle``'s ``unfinished`` does it only for a failover, whose
primaries are gone and will finish no drain); rolling back a group some
secondary prepared, as DESIGN.md says (the second point above says why not).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from .. import group
from ..errors import CgmirrorError, MirrorError, SlaveError
from ..link import SlaveLink
from ..session import Session
from . import joins

Log = Callable[[str], None]


@dataclass
class Links:
    """The control links of an (oriented) session: its primaries and the
    secondaries that mirror them.  Links connect when first used."""

    session: Session
    slaves: list[SlaveLink]
    secondaries: list[SlaveLink]

    @classmethod
    def of(cls, session: Session) -> "Links":
        # from_spec: the spec knows a TCP control channel's TLS context.
        used = {r for _, _, r, _ in session.pairs()}
        return cls(session, [SlaveLink.from_spec(s.spec()) for s in session.slaves],
                   [SlaveLink.from_spec(r.spec()) for r in session.secondaries
                    if r.name in used])

    def link(self, name: str) -> SlaveLink:
        return next(lk for lk in self.slaves + self.secondaries if lk.name == name)

    def set_epoch(self, epoch: int | None) -> None:
        """Send the leader's ``epoch`` in every request of every link from
        now on (None: stop sending it); nodes refuse a lower one."""
        for lk in self.slaves + self.secondaries:
            lk.epoch = epoch

    def close(self) -> None:
        for lk in self.slaves + self.secondaries:
            lk.close()

    def __enter__(self) -> "Links":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


def secondary_statuses(links: Links) -> dict[str, dict]:
    """{name: status} of every secondary; raises if one does not answer
    or is not a secondary."""
    replies = group.statuses(links.secondaries)
    for name, r in replies.items():
        if isinstance(r, Exception):
            raise r
        if r.get("role") != "secondary":
            raise MirrorError(f"{name} at {links.session.secondary(name).control} is"
                              f" not a secondary (role {r.get('role', 'primary')})")
    return replies


def settle(links: Links, log: Log, unfinished: bool = False) -> dict[str, dict]:
    """Bring every secondary to one hardened group by the module doc's
    recovery rule and return their statuses after; the blocks a rollback
    restored stay in their ``tgt`` maps (``return_tgt`` hands them on).
    ``unfinished`` (failover, whose primaries are gone) also rolls back
    the undo blocks of a drain that never reached prepare: the mirror
    keeps them, since its next group continues on top of them."""
    st = secondary_statuses(links)
    top = max(r["hardened"] for r in st.values())
    if any(r["hardened"] < top for r in st.values()):
        for name, r in st.items():
            if r["hardened"] == top:
                continue
            if r["prepared"] != top:
                raise MirrorError(
                    f"secondary {name} is at group {r['hardened']} (prepared"
                    f" {r['prepared']}), others committed {top}: it cannot roll"
                    f" forward; was it replaced? restore its state directory")
            links.link(name).call("commit", n=top, **_gens(links, name))
            log(f"recovery: {name} rolled forward to group {top}")
        st = secondary_statuses(links)
    pending = {r["prepared"] for r in st.values() if r["prepared"] is not None}
    # One prepared group (the normal case) rolls forward; anything else
    # (refused, or two numbers: never made by this coordinator) rolls back.
    if pending and not (len(pending) == 1 and _roll_forward(links, st, pending.pop(), log)):
        _roll_back(links, st, log)
    st = secondary_statuses(links)
    if unfinished and any(r["prepared"] is not None
                          or any(v["undo_blocks"] for v in r["volumes"].values())
                          for r in st.values()):
        _roll_back(links, st, log, unfinished=True)
        st = secondary_statuses(links)
    return st


def _gens(links: Links, secondary: str) -> dict:
    """``gens`` for a commit on ``secondary`` rolled forward (wire/lineage.py
    event 4): its primaries' current generations when they answer; none
    when they do not (a failover: the secondary keeps its generation)."""
    try:
        replies = group.statuses(links.slaves)
    except (CgmirrorError, ValueError):     # ValueError: no primaries at all
        return {}
    g = joins.gens(links.session, replies).get(secondary)
    return {"gens": g} if g else {}


def _roll_forward(links: Links, st: dict[str, dict], n: int, log: Log) -> bool:
    """Some secondary prepared n, none committed it: prepare n on the
    others and commit it on all.  Sound because prepare is only ever sent
    once every drain of n finished (the primaries cleared their bits
    after each secondary flushed), so every secondary holds all of n.
    False (and a log line) if a secondary refuses."""
    try:
        for name, r in st.items():
            if r["prepared"] != n:
                links.link(name).call("prepare", n=n)
        for name in st:
            links.link(name).call("commit", n=n, **_gens(links, name))
    except SlaveError as exc:
        log(f"recovery: cannot roll group {n} forward ({exc}); rolling back")
        return False
    log(f"recovery: group {n} was prepared; rolled forward on every secondary")
    return True


def _roll_back(links: Links, st: dict[str, dict], log: Log,
               unfinished: bool = False) -> None:
    """Every secondary that prepared a group (``unfinished``: or holds
    undo blocks of a drain) goes back to the common hardened group; the
    blocks it restored land in its tgt map (resent by ``return_tgt``)."""
    for name, r in st.items():
        undo = any(v["undo_blocks"] for v in r["volumes"].values())
        if r["prepared"] is None and not (unfinished and undo):
            continue
        back = links.link(name).call("rollback")
        blocks = sum(back["rolled_back"].values())
        what = (f"group {r['prepared']}" if r["prepared"] is not None
                else "an unfinished drain")
        log(f"recovery: {name} rolled back {what} to {back['hardened']}"
            f" ({blocks} blocks into its tgt map)")


def return_tgt(links: Links, st: dict[str, dict], log: Log) -> None:
    """Mark every secondary volume's tgt blocks on its primary, then clear
    them on the secondary (that order: a crash between resends, never loses)."""
    by_remote = {(r, rv): (s, v) for s, v, r, rv in links.session.pairs()}
    prim: dict[str, dict] = {}
    for r, rst in st.items():
        for rv, vs in rst["volumes"].items():
            if not vs["tgt_blocks"]:
                continue
            if (r, rv) not in by_remote:
                log(f"warning: {r}/{rv} has {vs['tgt_blocks']} target-side"
                    f" blocks but mirrors no volume of this session")
                continue
            s, v = by_remote[(r, rv)]
            if s not in prim:
                prim[s] = links.link(s).status()
            pv = prim[s]["volumes"][v]
            pg, nblocks = pv["granularity"], -(-pv["size"] // pv["granularity"])
            rlink, plink = links.link(r), links.link(s)
            start, total = 0, 0
            while start is not None:
                page = rlink.call("tgt", volume=rv, start=start)
                runs = page["runs"]
                if runs:
                    plink.call("mark", volume=v,
                               runs=map_runs(runs, page["granularity"], pg, nblocks))
                    rlink.call("clear_tgt", volume=rv, runs=runs)
                    total += sum(c for _, c in runs)
                start = page["next"]
            log(f"recovery: {total} target-side blocks of {r}/{rv} marked for"
                f" resend on {s}/{v}")


def map_runs(runs, from_g: int, to_g: int, to_blocks: int) -> list[list[int]]:
    """Runs of blocks of ``from_g`` bytes as runs of blocks of ``to_g`` bytes
    covering the same bytes (a partial block counts whole), clipped to
    ``to_blocks``: a secondary's tgt runs on its primary volume."""
    out: list[list[int]] = []
    for start, count in runs:
        lo = start * from_g // to_g
        hi = min(to_blocks, -(-(start + count) * from_g // to_g))
        if hi <= lo:
            continue
        if out and out[-1][0] + out[-1][1] >= lo:
            out[-1][1] = max(out[-1][0] + out[-1][1], hi) - out[-1][0]
        else:
            out.append([lo, hi - lo])
    return out


__all__ = ["Links", "map_runs", "return_tgt", "secondary_statuses", "settle"]
