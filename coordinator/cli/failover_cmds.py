"""``cgmirror failover [--test | --end-test]``, ``cgmirror failback``,
``cgmirror resync --from SITE --to SITE``, ``cgmirror switchover [--to SITE]``.

The handlers call ``coordinator.roles.failover.RoleSwitch`` (the design is at the
top of that module; sites and the recorded direction in
coordinator/direction.py).  Each prints one line per step on stderr and a
result line (or, with ``--json``, one JSON document: the API's result).
Every command can be run again after a crash or a failure: it resumes from
the direction recorded on the session's nodes (coordinator/direction.py,
with ``by``: the command that wrote it).  Run again after it succeeded, it
says "... nothing to do" and exits 0 (``switchover`` too: ``--to SITE``
swaps back).

Beside a running ``cgmirror mirror run`` (the whole rule, for every
command, is the table in coordinator/lock.py and the README's "Failover"
section): ``failover`` pauses the mirror, waits until its group in flight
is over, then settles and promotes (the mirror stays paused);
``failover --test`` parks it and ``--end-test`` resumes it; ``failback``,
``resync`` and ``switchover`` form groups themselves and are refused
(exit 5) before any change, with the line naming the mirror's pid and
``systemctl stop cgmirror-mirror@SESSION``.
"""

from __future__ import annotations

from .. import output
from ..direction import SITES
from ..errors import ExitCode
from ..roles.failover import RoleSwitch


def register(sub) -> None:
    """The nouns ``failover``, ``failback``, ``resync``, ``switchover``."""
    a = sub.add_parser("failover", help="make the secondaries writable primaries"
                                        " (primary site lost, or a DR test)")
    g = a.add_mutually_exclusive_group()
    g.add_argument("--test", action="store_true",
                   help="DR test: the primary keeps its role and records; the mirror parks")
    g.add_argument("--end-test", action="store_true",
                   help="end a DR test: throw its writes away, resume the mirror")
    _json(a)
    a.set_defaults(func=lambda ctx, args: _run(
        ctx, lambda rs: rs.end_test() if args.end_test else rs.failover(args.test),
        _ended if args.end_test else _failed_over))

    a = sub.add_parser("failback", help="after a failover: resync the old primary site"
                                        " and make it the primary again")
    _resync_options(a)
    a.set_defaults(func=lambda ctx, args: _run(
        ctx, lambda rs: rs.failback(args.full, args.keep_overwritten),
        lambda r: "failback: " + "; ".join(
            ([_resynced(r["resync"])] if r["resync"] is not None else [])
            + [_switched(r["switchover"])])))

    a = sub.add_parser("resync", help="send exactly the changed blocks of both sites"
                                      " (source cr|oos, target tgt) and harden them")
    a.add_argument("--from", dest="source", required=True, choices=SITES,
                   help="the site whose data wins (a: the [[slave]] tables, b: the"
                        " [[secondary]] tables)")
    a.add_argument("--to", dest="target", required=True, choices=SITES,
                   help="the site brought in line")
    _resync_options(a)
    a.set_defaults(func=lambda ctx, args: _run(
        ctx, lambda rs: rs.resync(args.source, args.target, args.full,
                                  args.keep_overwritten), _resynced))

    a = sub.add_parser("switchover", help="planned role swap with no data loss")
    a.add_argument("--to", choices=SITES,
                   help="the site to become the source (nothing to do if it is);"
                        " without it the sites swap, unless the last switchover"
                        " finished just now (a rerun)")
    _json(a)
    a.set_defaults(func=lambda ctx, args: _run(ctx, lambda rs: rs.switchover(args.to),
                                               _switched))


def _json(parser) -> None:
    parser.add_argument("--json", action="store_true", help="one JSON document on stdout")


def _resync_options(parser) -> None:
    parser.add_argument("--full", action="store_true",
                        help="copy every block, not only the changed ones")
    parser.add_argument("--keep-overwritten", metavar="DIR",
                        help="first save the target blocks about to be overwritten"
                             " (a sparse image and its runs per volume)")
    _json(parser)


def _run(ctx, action, sentence) -> ExitCode:
    """Run ``action`` on a RoleSwitch; print its result as ``sentence``
    words it (or, with --json, as the API returned it)."""
    result = action(RoleSwitch(ctx.session))
    if ctx.json:
        output.emit_json({"ok": True, **result}, ctx.out)
    elif result.get("nothing_to_do"):
        ctx.say(result["nothing_to_do"])        # a rerun after success
    else:
        ctx.say(sentence(result))
    return ExitCode.OK


# The result lines, for people.
def _failed_over(r: dict) -> str:
    what = "for a DR test (the mirror is parked until --end-test)" if r["test"] else ""
    return f"site {r['site']} is writable at group {r['hardened']} {what}".rstrip()


def _ended(r: dict) -> str:
    return f"DR test ended: site {r['site']} is a secondary again at group {r['hardened']}"


def _resynced(r: dict) -> str:
    return f"resync hardened as group {r['n']} ({output.size(r['bytes'])} sent)"


def _switched(r: dict) -> str:
    return f"site {r['source']} is the source at group {r['hardened']}"
