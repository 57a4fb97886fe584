"""``cgmirror verify [--repair] [--json]``: online verify of a running mirror.

Asks the session's running mirror to compare, between two groups and
without stopping host writes, every primary volume's clean blocks with its
secondary's hardened group (coordinator/mirror/verify.py); prints the differing
blocks.  ``--repair`` marks them so the next group sends them.

Exit status: 0 if nothing differs or the differences were marked (repair);
1 (FAILED) if blocks differ and were left alone, as ``cmp`` says 1 for
different files; 4 (UNREACHABLE) if no mirror runs, or if no group hardened
within the wait bound (``--timeout``, else the mirror's: a few groups' times;
coordinator/mirror/verify.py), with one line naming the group it waited
after and the mirror's last failure.

    verify --json   {"ok", "session", "group", "differing_blocks", "repaired",
                     "volumes": {S: {V: {"secondary", "blocks", "compared",
                     "skipped" (changed since the group: not comparable),
                     "differ": [[start, count], ...] (blocks of the primary's
                     granularity), "marked"}}}}
"""

from __future__ import annotations

import argparse

from .. import output
from ..errors import ExitCode
from ..mirror import VERIFY_TIMEOUT_S, call, control_path


def register(sub) -> None:
    """``cgmirror verify``."""
    a = sub.add_parser("verify", help="compare the remote's hardened group with the"
                                      " primaries, online")
    a.add_argument("--repair", action="store_true",
                   help="mark differing blocks so that the next group sends them")
    a.add_argument("--timeout", type=_seconds, metavar="SECONDS",
                   help="give up (exit 4) if no group hardens within this long"
                        " (default: three groups' interval, coordination and drain"
                        " times, plus 30 s)")
    a.add_argument("--json", action="store_true", help="one JSON document on stdout")
    a.set_defaults(func=lambda ctx, args: run(ctx, args.repair, args.timeout))


def _seconds(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        v = 0
    if not 1 <= v <= 86400:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number of seconds from 1"
                                         f" to 86400")
    return v


def run(ctx, repair: bool, wait_s: int | None = None) -> ExitCode:
    extra = {"wait_s": wait_s} if wait_s else {}
    # The mirror answers within the wait bound plus the reads: the socket's
    # timeout is only a last line of defence.
    doc = call(control_path(ctx.session), "verify",
               timeout=(wait_s or 86400) + VERIFY_TIMEOUT_S + 60, repair=repair, **extra)
    if ctx.json:
        output.emit_json(doc, ctx.out)
    else:
        rows = [[s, v, d["secondary"], d["compared"], d["skipped"],
                 sum(c for _, c in d["differ"]),
                 " ".join(f"{a}" if c == 1 else f"{a}-{a + c - 1}"
                          for a, c in d["differ"][:20])
                 + (" ..." if len(d["differ"]) > 20 else "")]
                for s, vols in doc["volumes"].items() for v, d in vols.items()]
        ctx.say(f"session {doc['session']}: verified against hardened group"
                f" {doc['group']}")
        output.table(rows, ["SLAVE", "VOLUME", "SECONDARY", "COMPARED", "SKIPPED",
                            "DIFFER", "BLOCKS"], ctx.out)
        n = doc["differing_blocks"]
        ctx.say("no block differs" if n == 0 else
                f"{n} blocks differ; marked: the next group sends them" if repair else
                f"{n} blocks differ; `cgmirror verify --repair` has the next group"
                f" send them")
    return ExitCode.FAILED if doc["differing_blocks"] and not repair else ExitCode.OK
