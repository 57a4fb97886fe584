"""``cgmirror status`` and ``cgmirror history``: read-only, no session lock.

status asks every slave at once.  A slave that does not answer is a row
saying so (and whether its process runs at all); a session volume the slave
does not serve is a row saying so.  Exit UNREACHABLE if any slave did not
answer, else CONFIG if any volume is missing, else OK.

Both say, per session, what the targets hold as a group (from the history,
``History.group``): "group consistent at cut N, taken at T (age)" only when
every target holds the same completed cut, else "group not consistent: ..."
with the volumes at each cut.  A volume's ``synced`` is true only when its
slave has it as a baseline *and* its target holds a completed cut: never
"yes" next to a failed copy.
"""

from __future__ import annotations

import argparse

from coordinator import launch

from .. import errors, group, output
from .copy_cmds import links
from ..errors import ExitCode
from ..history import History
from ..lock import SessionLock

STATUS_TIMEOUT = 5.0
# SQLite's LIMIT is a signed 64-bit integer; no one reads more rows than this.
MAX_LIMIT = 1_000_000


def register(sub) -> None:
    """``cgmirror status [--json]`` and ``cgmirror history [--json] [--limit N]``."""
    s = sub.add_parser("status", help="slaves, volumes, copies")
    s.add_argument("--json", action="store_true", help="one JSON document on stdout")
    s.set_defaults(func=lambda ctx, args: status(ctx))
    h = sub.add_parser("history", help="past copies, newest first")
    h.add_argument("--json", action="store_true", help="one JSON document on stdout")
    h.add_argument("--limit", type=_limit, default=None, metavar="N",
                   help=f"the newest N copies (1 to {MAX_LIMIT})")
    h.set_defaults(func=lambda ctx, args: history(ctx, args.limit))


def _limit(text: str) -> int:
    """--limit N: a whole number of rows; argparse turns the ValueError into
    one usage line (``1e20``, ``0``, ``-1`` and ``10**30`` are all refused)."""
    if not text.isdigit() or not 1 <= int(text) <= MAX_LIMIT:
        raise argparse.ArgumentTypeError(f"must be a whole number from 1 to {MAX_LIMIT},"
                                         f" not {text!r}")
    return int(text)


def group_state(session) -> dict:
    """What the session's targets hold as a group (``History.group``)."""
    copying = SessionLock(session.name, session.state_dir).holder() is not None
    with History(session.state_dir) as hist:
        return hist.group(session.targets(), copying=copying)


def collect(session) -> dict:
    """The status document (see ``status --json``)."""
    lks = links(session, timeout=STATUS_TIMEOUT)
    try:
        replies = group.statuses(lks)
    finally:
        for lk in lks:
            lk.close()
    grp = group_state(session)
    doc = {"ok": True, "session": session.name, "group": grp, "slaves": {}}
    for cfg in session.slaves:
        r = replies[cfg.name]
        if isinstance(r, Exception):
            pid = launch.running_pid(cfg.spec())
            why = errors.describe(r) if pid else (f"slave {cfg.name} is not running (start it with:"
                                      f" cgmirror slave start {cfg.name})")
            doc["ok"] = False
            doc["slaves"][cfg.name] = {"reachable": False, "error": why, "pid": pid,
                                       "phase": None, "n": None, "ended": None,
                                       "volumes": {}}
            continue
        vols = {}
        for v in cfg.volumes:
            st = r["volumes"].get(v.name)
            if st is None:
                doc["ok"] = False
                vols[v.name] = {"present": False, "target": v.target,
                                "error": f"slave {cfg.name} has no volume {v.name!r}"
                                         f" (it serves: {', '.join(r['volumes'])})"}
                continue
            dirty = min(st["dirty_blocks"] * st["granularity"], st["size"])
            holds = grp["volumes"][cfg.name][v.name]
            vols[v.name] = {"present": True, "target": v.target,
                            "synced": (st["synced_target"] == v.target
                                       and holds["state"] == "holds"),
                            "target_holds": holds,
                            "dirty_bytes": dirty, "error": None} | st
        doc["slaves"][cfg.name] = {"reachable": True, "error": None, "pid": r["pid"],
                                   "phase": r["phase"], "n": r["n"], "ended": r["ended"],
                                   "last_copy_ok": (r["last_copy"] or {}).get("ok"),
                                   "volumes": vols}
    return doc


def status(ctx) -> ExitCode:
    doc = collect(ctx.session)
    if ctx.json:
        output.emit_json(doc, ctx.out)
    else:
        print_status(doc, ctx.out)
    code = ExitCode.OK
    for sl in doc["slaves"].values():
        if not sl["reachable"]:
            print(f"cgmirror: {sl['error']}", file=ctx.err)
            code = ExitCode.UNREACHABLE
        for v in sl["volumes"].values():
            if not v["present"]:
                print(f"cgmirror: {v['error']}", file=ctx.err)
                code = code or ExitCode.CONFIG
    return code


def _copy_cell(c: dict | None) -> str:
    if not c:
        return "-"
    text = f"{c['state']} {output.size(c['done_bytes'])}/{output.size(c['total_bytes'])}"
    return text + (f" ({c['error']})" if c.get("error") else "")


def _holds(h: dict) -> str:
    """What one target holds, for people."""
    return {"holds": f"cut {h['n']}", "partial": f"part of cut {h['n']}",
            "copying": f"copying cut {h['n']}"}.get(h["state"], "nothing copied")


def group_lines(g: dict) -> list[str]:
    """The group's state and the last copy, for people (status and history)."""
    if g["consistent"]:
        lines = [f"group consistent at cut {g['n']}, taken at {g['taken'] or '?'}"
                 f" ({output.age(g['age_s'])})"]
    else:
        at: dict[str, list[str]] = {}
        for slave, vols in g["volumes"].items():
            for vol, h in vols.items():
                label = _holds(h) + (" (copy failed)" if h["state"] == "partial" else "")
                at.setdefault(label, []).append(f"{slave}/{vol}")
        lines = ["group not consistent: " + "; ".join(f"{label}: {', '.join(v)}"
                                                      for label, v in at.items())]
    last = g["last_copy"]
    if last:
        why = f": {last['error']}" if last["error"] else ""
        lines.append(f"last copy: cut {last['n']} {last['result']}, started"
                     f" {last['started'] or '?'} ({output.age(last['age_s'])}){why}")
    else:
        lines.append("last copy: none")
    return lines


def print_status(doc: dict, out) -> None:
    rows = []
    for name, sl in doc["slaves"].items():
        if not sl["reachable"]:
            rows.append([name, "-", "UNREACHABLE", "", "", "", "", sl["error"]])
            continue
        phase = f"{sl['phase']} (cut {sl['n']})" if sl["n"] else sl["phase"]
        for vname, v in sl["volumes"].items():
            if not v["present"]:
                rows.append([name, vname, phase, "", "", "", "", "MISSING: " + v["error"]])
                continue
            rows.append([name, vname, phase, v["gate"], output.size(v["size"]),
                         f"{v['dirty_blocks']} ({output.size(v['dirty_bytes'])})",
                         _holds(v["target_holds"]), _copy_cell(v["copy"])])
    output.table(rows, ["SLAVE", "VOLUME", "PHASE", "GATE", "SIZE", "DIRTY BLOCKS",
                        "TARGET HOLDS", "LAST COPY"], out)
    for line in group_lines(doc["group"]):
        print(line, file=out)


def history(ctx, limit: int | None) -> ExitCode:
    with History(ctx.session.state_dir) as hist:
        copies = hist.copies(limit)
        groups = hist.groups(limit)
    grp = group_state(ctx.session)
    if ctx.json:
        output.emit_json({"ok": True, "session": ctx.session.name, "group": grp,
                          "copies": copies, "groups": groups}, ctx.out)
        return ExitCode.OK
    if groups:
        # The mirror's groups (coordinator/mirror.py), a row each.
        ms = (lambda v: "-" if v is None else f"{v:.1f}")
        output.table([[g["n"], g["cut"], g["hardened"] or "-", g["outcome"],
                       output.size(g["bytes"]), ms(g["coordination_ms"]), ms(g["hold_ms"]),
                       ms(g["drain_ms"]), ms(g["prepare_ms"]), ms(g["commit_ms"]),
                       g["error"] or ""] for g in groups],
                     ["GROUP", "CUT", "HARDENED", "OUTCOME", "BYTES", "COORD MS",
                      "HOLD MS", "DRAIN MS", "PREPARE MS", "COMMIT MS", "ERROR"], ctx.out)
        if not copies:
            return ExitCode.OK
    rows = [[c["n"], c["started"], c["mode"], c["result"],
             "-" if c["establish_ms"] is None else f"{c['establish_ms']:.1f}",
             "-" if c["max_held_ms"] is None else f"{c['max_held_ms']:.1f}",
             output.size(c["bytes"]),
             "-" if c["seconds"] is None else f"{c['seconds']:.2f}",
             c["error"] or ""] for c in copies]
    output.table(rows, ["N", "STARTED", "MODE", "RESULT", "ESTABLISH MS", "HELD MS",
                        "COPIED", "SECONDS", "ERROR"], ctx.out)
    for line in group_lines(grp):
        print(line, file=ctx.out)
    return ExitCode.OK
