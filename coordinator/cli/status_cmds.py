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

Cluster mode (``[cluster]``): both add ``"cluster"``, the session's shared
state read from etcd, the same from every host: ``status`` {"leader":
{"host", "pid", "id", "epoch", "since"} | null, "hardened": {"n", "cut",
"at", "epoch"} | null, "direction": the record the leader published,
"lineage": {node: {volume: generation}}, "history": {"formed", "failed",
"last": the newest group}, "paused": {...} | null, "error": null or why
etcd did not answer}; ``history`` {"formed", "failed", "groups": [the last
20 groups of every leader]} (the local history DB keeps the detail of
the groups formed on this host).  etcd not answering is said, not an
error: the rest of the document comes from the nodes.
"""

from __future__ import annotations

import argparse
import os
import time

from coordinator import launch

from wire import address as wire_address, lineage

from .. import cluster as cluster_mod, direction, errors, output
from ..errors import ExitCode
from ..history import History
from ..lock import SessionLock
from ..mirror import joins

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
    """The status document (see ``status --json``).

    The nodes are asked in the roles the session's direction gives them
    (after a failover site b's are the primaries).  A primary's volume
    shows what its copy target holds (from the history) or, if it is
    mirrored, the group its secondary last hardened; every secondary has a
    row of its own.  A node that answers in another role than the direction
    gives it is an error row, not a crash."""
    # One status of every node: the direction they hold, the lineage, the rows.
    replies = direction.poll(session, timeout=STATUS_TIMEOUT)
    # status shows what it can of a file the nodes disagree with (the rows
    # say MISSING): the one line of the refusal every other command gives.
    try:
        direction.check_nodes(session, replies)
        nodes = None
    except errors.ConfigError as exc:
        nodes = str(exc)
    d = direction.load(session, replies, check=False)
    s = direction.oriented(session, d["source"])
    grp = group_state(s)
    doc = {"ok": True, "session": session.name, "group": grp,
           "direction": {k: d.get(k) for k in ("source", "state", "from", "to")
                         if d.get(k) is not None},
           "split": split(session, d, replies),
           "replaced": [v["replaced"] for r in replies.values() if isinstance(r, dict)
                        for v in r.get("volumes", {}).values() if v.get("replaced")],
           "nodes": nodes, "slaves": {}, "secondaries": {}}
    if doc["split"] or doc["replaced"] or nodes:
        doc["ok"] = False
    for cfg in s.secondaries:
        doc["secondaries"][cfg.name] = _secondary(cfg, replies[cfg.name], doc)
    for cfg in s.slaves:
        doc["slaves"][cfg.name] = _primary(cfg, replies[cfg.name], grp, doc)
    if getattr(session, "cluster", None) is not None:
        doc["cluster"] = cluster_state(session)
    return doc


def cluster_state(session) -> dict:
    """The ``cluster`` part of ``status`` (module doc)."""
    try:
        with cluster_mod.client(session) as etcd:
            st = cluster_mod.read_state(etcd, session.name)
    except errors.CgmirrorError as exc:
        return {"leader": None, "hardened": None, "direction": None, "lineage": None,
                "history": None, "paused": None, "error": str(exc)}
    h = st["history"] or {}
    return {"leader": st["leader"], "hardened": st["hardened"],
            "direction": st["direction"], "lineage": st["lineage"],
            "history": {"formed": h.get("formed", 0), "failed": h.get("failed", 0),
                        "last": (h.get("groups") or [None])[-1]},
            "paused": st["paused"], "error": None}


def cluster_lines(c: dict | None) -> list[str]:
    """The cluster part for people."""
    if not c:
        return []
    if c["error"]:
        return [f"cluster: {c['error']}"]
    lead, h = c["leader"], c["hardened"] or {}
    lines = [f"leader: {lead['host']} pid {lead['pid']} (epoch {lead['epoch']})"
             if lead else "leader: none (no `cgmirror mirror run` leads this session)"]
    if h.get("n"):
        age = output.age(max(0.0, time.time() - h["cut"]))
        lines.append(f"hardened group {h['n']} (cut {age}, by epoch {h.get('epoch')})")
    hist = c["history"]
    if hist and (hist["formed"] or hist["failed"]):
        lines.append(f"groups formed {hist['formed']}, failed {hist['failed']} (every"
                     f" leader)")
    if (c.get("paused") or {}).get("paused"):
        lines.append(f"paused by {c['paused'].get('by')}: {c['paused'].get('why')}")
    return lines


def split(session, d: dict, replies: dict) -> dict | None:
    """Whether the two sites are split, from what the nodes report (either
    site's coordinator says the same): a pair whose sides were both written
    since their common generation (wire/lineage.py), or primaries at both
    sites outside a DR test.  {"line": one line with the command that
    resolves it, "pairs": [...]}, or None."""
    src = d["source"]
    dst = direction.other(src)
    live = {n: r for n, r in replies.items() if isinstance(r, dict)}
    pairs = joins.compare(direction.oriented(session, src), live, live)
    bad = [p for p in pairs if p.kind == "diverged"]
    prim = {site: [c.name for c in direction.nodes(session, site)
                   if live.get(c.name, {}).get("role", "primary") == "primary"
                   and c.name in live]
            for site in direction.SITES}
    both = prim["a"] and prim["b"] and d["state"] != "dr-test"
    resolve = (f"`cgmirror resync --from {src} --to {dst} [--keep-overwritten DIR]`"
               f" keeps site {src}'s writes, `cgmirror resync --from {dst} --to {src}"
               f" [--keep-overwritten DIR]` site {dst}'s")
    if bad:
        v = bad[0].verdict
        gen, n = v.common
        line = (f"split: site {src} and site {dst} both written since generation"
                f" {lineage.short(gen)} at group {n} ({v.line()}, lineage rule"
                f" {v.rule}{f'; {len(bad) - 1} more pairs' if len(bad) > 1 else ''}):"
                f" {resolve}")
    elif both:
        line = (f"split: site a ({', '.join(prim['a'])}) and site b"
                f" ({', '.join(prim['b'])}) both run primaries that accept host writes,"
                f" while site {src} is the source ({d['state']}): "
                + (f"`cgmirror failback` makes site {dst} a secondary again"
                   if d["state"] == "failed-over" else
                   f"`cgmirror resync --from {src} --to {dst}` makes site {dst} a"
                   f" secondary again"))
    else:
        return None
    return {"line": line, "pairs": [{"primary": f"{p.primary}/{p.volume}",
                                     "secondary": f"{p.secondary}/{p.remote_volume}",
                                     "kind": p.kind, "rule": p.verdict.rule,
                                     "why": p.verdict.why()} for p in pairs]}


def _unreachable(cfg, exc: Exception, kind: str) -> dict:
    spec = cfg.spec()
    pid = launch.running_pid(spec)
    # "Not running" is known only on the node's own host (a unix socket's,
    # or where its state directory is); elsewhere a node that does not
    # answer may run behind a cut link: say what the connection said.
    here = not wire_address.parse(spec.control).is_tcp or os.path.isdir(spec.statedir)
    why = errors.describe(exc) if pid or not here else (
        f"{kind} {cfg.name} is not running (start it with: cgmirror {kind} start {cfg.name})")
    return {"reachable": False, "error": why, "pid": pid, "role": None, "volumes": {}}


def _noun(role: str, doc: dict) -> str:
    """The session file's noun for a node in ``role`` now: after a failover
    (site b the source) the ``[[secondary]]`` nodes are the primaries, and
    ``cgmirror slave start`` knows only ``[[slave]]`` names."""
    first = doc["direction"].get("source", "a") == "a"
    return "slave" if (role == "primary") == first else "secondary"


def _wrong_role(cfg, r: dict, want: str, doc: dict) -> str:
    # A node's role is its own record (it starts in it): no restart by hand
    # changes it; a role command does, through the node's role op.  The
    # line names that command with this session's sites (a placeholder
    # such as SITE is not a command that can be run).
    d = doc["direction"]
    src = d.get("source", "a")
    dst = direction.other(src)
    if d.get("state") == "switching":
        fix = "a switchover was cut short: `cgmirror switchover` finishes it"
    elif d.get("state") == "failed-over":
        fix = (f"the sites are split (or a failover was cut short: run it again);"
               f" `cgmirror failback` ends the split, `cgmirror resync --from {src}"
               f" --to {dst}` keeps site {src} the source")
    else:
        fix = (f"a role command was cut short (run it again) or the sites are split;"
               f" `cgmirror resync --from {src} --to {dst}` puts every node in the"
               f" role the direction gives it")
    return (f"{cfg.name} at {cfg.control} runs as {r.get('role', 'primary')}, but the"
            f" session's direction makes it a {want}: {fix}")


def _secondary(cfg, r, doc: dict) -> dict:
    if isinstance(r, Exception):
        doc["ok"] = False
        return _unreachable(cfg, r, _noun("secondary", doc))
    row = {"reachable": True, "error": None, "pid": r.get("pid"), "role": r.get("role"),
           "hardened": r.get("hardened"), "prepared": r.get("prepared"), "volumes": {}}
    # A DR test's site runs as a primary (direction.role): not a wrong role.
    if r.get("role") != "secondary" and doc["direction"].get("state") != "dr-test":
        doc["ok"] = False
        row["error"] = _wrong_role(cfg, r, "secondary", doc)
        return row
    for name in (v.name for v in cfg.volumes):
        st = r["volumes"].get(name)
        if st is None:
            doc["ok"] = False
            row["volumes"][name] = {"present": False,
                                    "error": f"secondary {cfg.name} has no volume {name!r}"}
        else:
            row["volumes"][name] = {"present": True, "error": None} | st
    return row


def _primary(cfg, r, grp: dict, doc: dict) -> dict:
    if isinstance(r, Exception):
        doc["ok"] = False
        return _unreachable(cfg, r, _noun("primary", doc)) | {"phase": None, "n": None,
                                                               "ended": None}
    if r.get("role", "primary") != "primary":
        doc["ok"] = False
        return {"reachable": True,
                "error": _wrong_role(cfg, r, "primary", doc),
                "pid": r.get("pid"), "role": r.get("role"), "phase": None, "n": None,
                "ended": None, "volumes": {}}
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
        if v.secondary:
            sec = doc["secondaries"].get(v.secondary, {})
            holds = {"state": "mirrored", "secondary": f"{v.secondary}/{v.remote_volume}",
                     "n": sec.get("hardened")}
            synced = sec.get("error") is None and holds["n"] is not None
        else:
            holds = grp["volumes"][cfg.name][v.name]
            synced = st["synced_target"] == v.target and holds["state"] == "holds"
        vols[v.name] = {"present": True, "target": v.target, "synced": synced,
                        "target_holds": holds, "dirty_bytes": dirty, "error": None} | st
    return {"reachable": True, "error": None, "pid": r["pid"], "role": "primary",
            "phase": r["phase"], "n": r["n"], "ended": r["ended"],
            "last_copy_ok": (r["last_copy"] or {}).get("ok"), "volumes": vols}


def status(ctx) -> ExitCode:
    doc = collect(ctx.session)
    if ctx.json:
        output.emit_json(doc, ctx.out)
    else:
        print_status(doc, ctx.out)
    code = ExitCode.OK
    # A split, a replaced volume, a node that disagrees with this file: the
    # nodes disagree with the direction or the file (CONFIG, as a node in
    # the wrong role always was).
    for line in (([doc["split"]["line"]] if doc["split"] else []) + doc["replaced"]
                 + ([doc["nodes"]] if doc["nodes"] else [])):
        print(f"cgmirror: {line}", file=ctx.err)
        code = ExitCode.CONFIG
    for sl in (*doc["slaves"].values(), *doc["secondaries"].values()):
        if not sl["reachable"]:
            print(f"cgmirror: {sl['error']}", file=ctx.err)
            code = ExitCode.UNREACHABLE
        elif sl["error"]:
            print(f"cgmirror: {sl['error']}", file=ctx.err)
            code = code or ExitCode.CONFIG
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
    if h["state"] == "mirrored":
        at = "nothing hardened yet" if h["n"] is None else f"hardened group {h['n']}"
        return f"{h['secondary']}: {at}"
    return {"holds": f"cut {h['n']}", "partial": f"part of cut {h['n']}",
            "copying": f"copying cut {h['n']}"}.get(h["state"], "nothing copied")


def group_lines(g: dict) -> list[str]:
    """The group's state and the last copy, for people (status and history)."""
    if not g["volumes"] and not g["last_copy"]:
        return []           # no copy targets: a mirrored session's groups are its own
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
        if sl["error"]:
            rows.append([name, "-", sl["role"] or "?", "", "", "", "", sl["error"]])
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
    if doc["secondaries"]:
        print(file=out)
        output.table(list(_secondary_rows(doc["secondaries"])),
                     ["SECONDARY", "VOLUME", "HARDENED", "PREPARED", "UNDO BLOCKS",
                      "TGT BLOCKS", "ERROR"], out)
    d = doc["direction"]
    if d and (d["source"], d["state"]) != ("a", "mirroring"):
        print(f"direction: site {d['source']} is the source ({d['state']})", file=out)
    if doc.get("split"):
        print(doc["split"]["line"], file=out)
    for line in group_lines(doc["group"]):
        print(line, file=out)
    for line in cluster_lines(doc.get("cluster")):
        print(line, file=out)


def _secondary_rows(secondaries: dict):
    for name, r in secondaries.items():
        if not r["reachable"] or r["error"]:
            yield [name, "-", "", "", "", "", r["error"]]
            continue
        hardened = "none yet" if r["hardened"] is None else r["hardened"]
        for vname, v in r["volumes"].items():
            if not v["present"]:
                yield [name, vname, "", "", "", "", "MISSING: " + v["error"]]
            else:
                # A [[secondary]] promoted for a DR test runs as a primary:
                # it has no undo store or tgt counts to show.
                yield [name, vname, hardened, r["prepared"] or "-",
                       v.get("undo_blocks", "-"), v.get("tgt_blocks", "-"),
                       v.get("error") or ""]


def history(ctx, limit: int | None) -> ExitCode:
    with History(ctx.session.state_dir) as hist:
        copies = hist.copies(limit)
        groups = hist.groups(limit)
    grp = group_state(ctx.session)
    shared = None
    if getattr(ctx.session, "cluster", None) is not None:
        try:
            with cluster_mod.client(ctx.session) as etcd:
                st = cluster_mod.read_state(etcd, ctx.session.name)
            shared = {"formed": 0, "failed": 0, "groups": [], "error": None,
                      **(st["history"] or {})}
        except errors.CgmirrorError as exc:
            shared = {"formed": None, "failed": None, "groups": [], "error": str(exc)}
    if ctx.json:
        doc = {"ok": True, "session": ctx.session.name, "group": grp,
               "copies": copies, "groups": groups}
        if shared is not None:
            doc["cluster"] = shared
        output.emit_json(doc, ctx.out)
        return ExitCode.OK
    if shared is not None:
        if shared["error"]:
            print(f"cluster: {shared['error']}", file=ctx.out)
        else:
            print(f"every leader: groups formed {shared['formed']}, failed"
                  f" {shared['failed']}; the last {len(shared['groups'])}:", file=ctx.out)
            ms = (lambda v: "-" if v is None else f"{v:.1f}")
            output.table([[g["n"], g["outcome"], output.size(g["bytes"]),
                           ms(g.get("hold_ms")), ms(g.get("drain_ms"))]
                          for g in reversed(shared["groups"])],
                         ["GROUP", "OUTCOME", "BYTES", "HOLD MS", "DRAIN MS"], ctx.out)
            print(file=ctx.out)
    if groups:
        # The mirror's groups (coordinator/mirror/cycle.py), a row each.
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
