"""``cgmirror copy [--full|--incremental] [--json]``: one consistent copy.

Holds the session lock, checks every slave (``group.preflight``), decides
which volumes are copied whole (``group.full_volumes``: the slaves must know
at the freeze), takes a cut number above the history's and every slave's,
establishes the point in time on all slaves (``group.establish``), records
that every target is about to be overwritten (``History.start_volumes``, so
that a copy that dies half-way is never taken for a consistent group), copies
it (``group.copy``) and records the outcome in the history, whatever it is.

A copy sends to fixed targets (``target =``) only: a session that mirrors
a volume to a secondary is refused (exit 2, before the session lock) with
one line naming what to run in the state the session is in -- the mirror
copies its pairs itself (coordinator/lock.py has the rule for every
command beside a running mirror).
"""

from __future__ import annotations

import datetime

from .. import direction, errors, group, output
from ..errors import CgmirrorError, ExitCode, MirrorError, MirrorNotRunning, UsageError
from ..history import History
from ..link import SlaveLink
from ..lock import SessionLock
from ..mirror import call as mirror_call, control_path


def register(sub) -> None:
    """``cgmirror copy [--full | --incremental] [--json]``."""
    c = sub.add_parser("copy", help="establish a consistent point in time and copy it")
    m = c.add_mutually_exclusive_group()
    m.add_argument("--full", dest="mode", action="store_const", const="full",
                   help="copy every block")
    m.add_argument("--incremental", dest="mode", action="store_const",
                   const="incremental", help="copy only what changed since the"
                                             " last copy to the same target")
    c.set_defaults(mode="auto", func=lambda ctx, args: copy(ctx, args.mode))
    c.add_argument("--json", action="store_true", help="one JSON document on stdout")


def links(session, timeout: float | None = None) -> list[SlaveLink]:
    """One link per slave of the session, naming the session's volumes."""
    kw = {} if timeout is None else {"timeout": timeout}
    return [SlaveLink.from_spec(s.spec(), **kw) for s in session.slaves]


def refuse_mirrored(s) -> None:
    """``cgmirror copy`` sends to fixed targets (``target =``) only.  A
    session that mirrors a volume to a secondary is refused before the
    session lock, in one line naming what to run instead in the state the
    session is in (it froze the slaves, then failed with "'targets' must
    have 1 to 1024 entries", or exited BUSY beside the running mirror)."""
    pairs = s.pairs()
    if not pairs:
        return
    slave, vol, sec, _ = pairs[0]
    head = (f"session {s.name} mirrors {slave}/{vol} to secondary {sec}, and copy"
            f" sends only to a volume's fixed 'target'")
    try:
        mirror_call(control_path(s), "status", timeout=5)
    except (MirrorError, MirrorNotRunning):
        try:
            direction.check_mirror(s)
        except CgmirrorError as exc:
            raise UsageError(f"{head}, and {exc}") from None
        src = direction.load(s)["source"]
        raise UsageError(f"{head}: start the mirror with `cgmirror mirror run`, or copy"
                         f" every pair whole with `cgmirror resync --from {src} --to"
                         f" {direction.other(src)} --full`") from None
    raise UsageError(f"{head}: the running mirror forms its groups; `cgmirror mirror"
                     f" status` shows what each secondary holds")


def copy(ctx, mode: str) -> ExitCode:
    s = ctx.session
    refuse_mirrored(s)
    with SessionLock(s.name, s.state_dir), History(s.state_dir) as hist:
        hist.mark_interrupted()
        lks = links(s)
        try:
            replies = group.preflight(lks, warn=ctx.warn)
            full = group.full_volumes(replies, s.targets(), mode)
            group.verify_baselines(lks, s.targets(), full, s.copy_timeout_ms)
            doc = run(ctx, hist, lks, group.next_n(replies, hist.max_n()), mode, full)
        finally:
            for lk in lks:
                lk.close()
    if ctx.json:
        output.emit_json(doc, ctx.out)
    else:
        print_report(doc, ctx.out)
    return ExitCode.OK


def run(ctx, hist: History, lks: list[SlaveLink], n: int, mode: str,
        full: dict[str, list[str]]) -> dict:
    """Establish and copy cut n, recording it; return the copy document."""
    s = ctx.session
    doc = {"ok": False, "session": s.name, "n": n, "mode": mode, "result": "running",
           "started": datetime.datetime.now(datetime.timezone.utc).isoformat(
               timespec="milliseconds").replace("+00:00", "Z"),
           "establish": None, "copy": None}
    hist.begin(n, s.name, mode)
    est = None
    bar = output.ProgressBar(f"copy {n}", ctx.err) if not ctx.json else None
    try:
        est = group.establish(lks, n, s.lease_ms, s.max_coordination_ms, full=full)
        doc["establish"] = est.to_json()
        hist.start_volumes(n, s.targets(), full)
        report = group.copy(lks, n, s.targets(), mode, bar, timeout_ms=s.copy_timeout_ms)
    except BaseException as exc:
        result = "aborted" if est is None else "failed"
        partial = getattr(exc, "report", None)
        doc.update(result=result, copy=partial)
        hist.finish(n, result, errors.describe(exc), est, partial)
        if isinstance(exc, CgmirrorError):
            exc.details = doc
        raise
    finally:
        if bar:
            bar.close()
    doc.update(ok=True, result="ok", copy=report.to_json())
    hist.finish(n, "ok", None, est, doc["copy"])
    return doc


def print_report(doc: dict, out) -> None:
    est, cp = doc["establish"], doc["copy"]
    print(f"cut {doc['n']}: established in {est['total_ms']:.1f} ms (all frozen after"
          f" {est['coordination_ms']:.1f} ms, gates held at most"
          f" {est['max_held_ms']:.1f} ms)", file=out)
    rows = []
    for slave, vols in cp["slaves"].items():
        for vol, c in vols.items():
            rows.append([slave, vol, c["mode"], output.size(c["bytes"]),
                         f"{c['seconds']:.2f}",
                         output.rate(c["bytes"] / c["seconds"]) if c["seconds"] else "-",
                         c["state"]])
    output.table(rows, ["SLAVE", "VOLUME", "MODE", "COPIED", "SECONDS", "SPEED", "RESULT"],
                 out)
    print(f"copied {output.size(cp['bytes'])} in {cp['seconds']:.2f} s", file=out)
