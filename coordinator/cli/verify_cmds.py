"""``cgmirror verify [--repair] [--json]``: online verify of a running mirror.

Asks the session's running mirror to compare, between two groups and
without stopping host writes, every primary volume's clean blocks with its
secondary's hardened group (coordinator/verify.py); prints the differing
blocks.  ``--repair`` marks them so the next group sends them.

Exit status: 0 if nothing differs or the differences were marked (repair);
1 (FAILED) if blocks differ and were left alone, as ``cmp`` says 1 for
different files; 4 (UNREACHABLE) if no mirror runs.

    verify --json   {"ok", "session", "group", "differing_blocks", "repaired",
                     "volumes": {S: {V: {"secondary", "blocks", "compared",
                     "skipped" (changed since the group: not comparable),
                     "differ": [[start, count], ...] (blocks of the primary's
                     granularity), "marked"}}}}
"""

from __future__ import annotations

from .. import output
from ..errors import ExitCode
from ..mirror import VERIFY_TIMEOUT_S, call, control_path


def register(sub) -> None:
    """``cgmirror verify``."""
    a = sub.add_parser("verify", help="compare the remote's hardened group with the"
                                      " primaries, online")
    a.add_argument("--repair", action="store_true",
                   help="mark differing blocks so that the next group sends them")
    a.add_argument("--json", action="store_true", help="one JSON document on stdout")
    a.set_defaults(func=lambda ctx, args: run(ctx, args.repair))


def run(ctx, repair: bool) -> ExitCode:
    doc = call(control_path(ctx.session), "verify", timeout=VERIFY_TIMEOUT_S + 60,
               repair=repair)
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
