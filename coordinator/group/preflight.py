"""Before a cut: every slave answers, serves the session's volumes and is
idle; which volumes a copy takes whole; whether targets still hold their
baselines."""

from __future__ import annotations

from typing import Callable

from ..errors import CgmirrorError, SlaveBusy, TargetError, UnknownVolume, UsageError
from ..link import SlaveLink, statuses  # noqa: F401 (statuses: group's API, link.py's code)
from .fanout import abort_one


def preflight(links: list[SlaveLink], abort_leftover: bool = True,
              warn: Callable[[str], None] | None = None) -> dict[str, dict]:
    """Check every slave before a cut; return {name: status}.

    Raises ``SlaveUnreachable`` for a slave that does not answer,
    ``UnknownVolume`` if a link names a volume its slave does not serve, and
    ``SlaveBusy`` if a slave is in a cut and ``abort_leftover`` is false.  With
    ``abort_leftover`` (the caller holds the session lock, so any cut in
    progress was left by a coordinator that died), that cut is aborted and
    ``warn`` is told.
    """
    replies = statuses(links)
    for lk in links:
        r = replies[lk.name]
        if isinstance(r, Exception):
            raise r
        for v in lk.volumes or ():
            if v not in r["volumes"]:
                raise UnknownVolume(lk.name, v, f"slave {lk.name} has no volume {v!r}"
                                    f" (it serves: {', '.join(r['volumes']) or 'none'});"
                                    f" fix the session file or restart the slave")
    for lk in links:
        r = replies[lk.name]
        if r["phase"] != "idle":
            if not abort_leftover:
                raise SlaveBusy(lk.name, f"slave {lk.name} is in cut {r['n']}"
                                         f" ({r['phase']})")
            if warn:
                warn(f"slave {lk.name}: aborting cut {r['n']} ({r['phase']}) left by"
                     f" a coordinator that stopped")
            abort_one(lk, r["n"])
            replies[lk.name] = lk.status()
    return replies


def next_n(replies: dict[str, dict], floor: int = 0) -> int:
    """A cut number above ``floor`` and above every cut any slave has seen."""
    return max([floor] + [r["n"] for r in replies.values()]) + 1


def full_volumes(replies: dict[str, dict], targets: dict[str, dict[str, str]],
                 mode: str = "auto") -> dict[str, list[str]]:
    """Which volumes a copy in ``mode`` copies whole: {slave: [volume, ...]}.

    A slave preserves for a cut exactly the blocks its copy will read, so
    this is decided before the freeze and passed to ``establish(full=...)``.
    "full": every volume in ``targets``; "auto": those whose last completed
    copy (``synced_target`` in ``replies``, from ``statuses``/``preflight``)
    is not on the same target; "incremental": none, and a volume without
    such a copy raises ``UsageError`` (before anything is frozen).
    """
    out: dict[str, list[str]] = {}
    for slave, vols in targets.items():
        status = replies[slave]["volumes"]
        synced = {v: status[v]["synced_target"] == uri for v, uri in vols.items()}
        if mode == "incremental":
            missing = [v for v, ok in synced.items() if not ok]
            if missing:
                raise UsageError(f"--incremental: {slave}/{missing[0]} has no completed"
                                 f" copy on {vols[missing[0]]}: run `cgmirror copy --full` first")
        out[slave] = [v for v, ok in synced.items() if mode == "full" or not ok]
    return out


def verify_baselines(links: list[SlaveLink], targets: dict[str, dict[str, str]],
                     full: dict[str, list[str]], timeout_ms: int = 30000) -> None:
    """Before the freeze: raise ``TargetError`` (one line naming --full) if a
    volume to be copied incrementally has a target that no longer holds its
    last copy (replaced, reformatted, written by someone else)."""
    for lk in links:
        incremental = {v: uri for v, uri in targets[lk.name].items()
                       if v not in full.get(lk.name, ())}
        if incremental:
            # A silent target must fail as a target, within the link's own
            # timeout, not make the slave look unreachable.
            failed = lk.call("verify", targets=incremental,
                             timeout_ms=min(timeout_ms, int(lk.timeout * 500)))["failed"]
            if failed:
                v, line = next(iter(failed.items()))
                raise TargetError(f"{lk.name}/{v}: {line}")
