"""``cgmirror mirror run|pause|resume|rate RATE|status [--json] [--watch]``.

``run`` is the long-running coordinator (``coordinator.mirror.Mirror``) in
the foreground, one per session (it holds the session lock: a second one
gets BUSY), systemd-friendly: one event a line on stderr, ``READY=1`` on
``$NOTIFY_SOCKET`` once it serves, and SIGTERM or SIGINT finish or abandon
the current group (never leaving a gate closed) and exit 0.  The other
actions talk to it over its control socket (``[mirror] control``).

    mirror status --json  {"ok", "session", "pid", "state" (starting, running,
                           paused, parked (the direction forms no group: failover,
                           DR test), severe, stopped), "why" (a line, if severe
                           or parked),
                           "paused", "phase", "hardened", "rpo_s",
                           "rpo_threshold_s", "groups_formed", "groups_failed",
                           "drain_failures_in_a_row", "timer_lifted",
                           "hold_ms": {"last", "p50", "p99"}, "drain_mb_s" (decimal MB,
                           kept for scripts), "drain_bytes_s", "rate_bytes_s" (the
                           drain's limit per volume, null: none),
                           "last_group": {"n", "outcome", "error", "bytes"} | null,
                           "direction": {"source", "state", "from"?, "to"?, "why"?},
                           "failures": {"pairs": {"S/V": F}, "nodes": {N: F},
                           "mirror": F | null} (F: {"error", "group", "at"}: the
                           last failure since a group hardened),
                           "volumes": {S: {V: {"secondary", "phase",
                           "dirty_bytes", "behind_bytes", "error" (the primary
                           unreachable, or the pair's last failure), "failed_group"}}},
                           "secondaries": {R: {"hardened", "prepared", "role",
                           "error"}}}
    With no mirror running: {"ok", "session", "state": "stopped", "why",
    "direction", "secondaries"} (exit 0: saying so is the answer).

Cluster mode (``[cluster]``, coordinator/cluster.py): ``run`` stands by
until it leads (any number of them, one per host).  ``status`` reads etcd,
so every host gives the same answer: the leader's own document (``P/status``)
with ``"hardened"`` from ``P/state/hardened`` and
``"cluster": {"leader": {"host", "pid", "id", "epoch", "since"} | null,
"hardened": {"n", "cut", "at", "epoch"} | null, "paused": {...} | null,
"local": the cluster part of this host's mirror, if one runs | null,
"error": etcd's refusal | null}``; no leader: state "stopped" (or the local
standby's "standby"/"no-quorum").  ``pause|resume`` write
``P/control/paused``, which the leader (whichever it is, now or later)
reads before each group.
"""

from __future__ import annotations

import os
import signal
import time

from wire import sdnotify
from wire.units import parse_size

from .. import cluster, direction, group, output
from ..errors import BusyError, CgmirrorError, ExitCode, MirrorNotRunning, UsageError
from ..link import SlaveLink
from ..mirror import Mirror, call, control_path
from ..mirror.status import where


def register(sub) -> None:
    """``cgmirror mirror run|pause|resume|rate|status``."""
    m = sub.add_parser("mirror", help="continuous consistency-group mirroring")
    actions = m.add_subparsers(dest="action", required=True, metavar="ACTION")
    a = actions.add_parser("run", help="form groups until SIGTERM (foreground)")
    a.set_defaults(func=lambda ctx, args: run(ctx))
    for name, text in (("pause", "no new group until resume"),
                       ("resume", "form groups again")):
        a = actions.add_parser(name, help=text)
        a.add_argument("--json", action="store_true", help="one JSON document on stdout")
        a.set_defaults(func=lambda ctx, args, op=name: control(ctx, op))
    a = actions.add_parser("rate", help="the drain's limit per volume from now on")
    a.add_argument("rate", metavar="RATE", help="bytes per second like 50M, or 0 for none")
    a.add_argument("--json", action="store_true", help="one JSON document on stdout")
    a.set_defaults(func=lambda ctx, args: set_rate(ctx, args.rate))
    a = actions.add_parser("status", help="state, RPO, groups, hold times, per volume")
    a.add_argument("--json", action="store_true", help="one JSON document on stdout")
    a.add_argument("--watch", action="store_true", help="redraw every second until"
                                                        " Ctrl-C")
    a.set_defaults(func=lambda ctx, args: (
        _watch(ctx) if args.watch else status(ctx)))


def run(ctx) -> ExitCode:
    # The direction recorded by failover/resync/switchover (coordinator/direction.py).
    session = direction.oriented(ctx.session, direction.load(ctx.session)["source"])
    if ctx.session.cluster is None:
        direction.check_mirror(session)
    # Cluster mode: a unit (re)started while the sites are split stands by
    # or leads parked, and follows the direction once they are joined.
    mirror = Mirror(session)
    old = {sig: signal.signal(sig, lambda *_: mirror.stop())
           for sig in (signal.SIGTERM, signal.SIGINT)}
    try:
        with mirror:
            mirror.log(f"session {ctx.session.name}: running (pid {os.getpid()},"
                       f" control {ctx.session.mirror.control})")
            sdnotify.notify("READY=1")
            mirror.run()
    finally:
        for sig, h in old.items():
            signal.signal(sig, h)
    return ExitCode.OK


def control(ctx, op: str) -> ExitCode:
    if getattr(ctx.session, "cluster", None) is not None:
        return _cluster_control(ctx, op)
    doc = call(control_path(ctx.session), op)
    if ctx.json:
        output.emit_json(doc, ctx.out)
    else:
        ctx.say(f"mirror of session {ctx.session.name}: {op}d (state {doc['state']})")
    return ExitCode.OK


def _cluster_control(ctx, op: str) -> ExitCode:
    """``mirror pause|resume`` in cluster mode: the flag in etcd, taken by
    whichever coordinator leads (before its next group)."""
    s = ctx.session
    me = cluster.me()
    with cluster.client(s) as etcd:
        h = cluster.role_holder(etcd, s.name) if op == "resume" else None
        if h is not None:
            # The command parked the leader to form groups itself; it
            # resumes the leader when the sites are joined.
            raise BusyError(f"`cgmirror {h.get('command', '?')}` runs for session"
                            f" {s.name} on host {h.get('host', '?')} (pid"
                            f" {h.get('pid', '?')}) with the leader parked: it resumes"
                            f" the mirror when it ends; `cgmirror mirror resume` only"
                            f" if it failed", h.get("pid"))
        cluster.set_paused(etcd, s.name, op == "pause", f"mirror {op}",
                           f"`cgmirror mirror {op}` on {me['host']} pid {me['pid']}")
        doc = _cluster_doc(s, etcd)
    if ctx.json:
        output.emit_json(doc, ctx.out)
    else:
        lead = doc["cluster"]["leader"]
        who = (f"leader {lead['host']} pid {lead['pid']} (epoch {lead['epoch']}) takes it"
               f" before its next group" if lead else
               "no coordinator leads now: the next leader takes it")
        ctx.say(f"mirror of session {s.name}: {op}d in etcd; {who}")
    return ExitCode.OK


def set_rate(ctx, text: str) -> ExitCode:
    """``mirror rate RATE``: the running mirror's drain limit, at once."""
    try:
        rate = 0 if text.strip() in ("0", "none", "off") else parse_size(text)
    except ValueError as exc:
        raise UsageError(f"rate {text!r}: {exc} (like 50M, or 0 for no limit)") from exc
    if 0 < rate < 4096:
        raise UsageError(f"rate {text!r} is below 4K bytes per second (0: no limit)")
    doc = call(control_path(ctx.session), "rate", rate=rate)
    if ctx.json:
        output.emit_json(doc, ctx.out)
    else:
        ctx.say(f"mirror of session {ctx.session.name}: drain limit"
                f" {output.rate(rate)} per volume")
    return ExitCode.OK


def _watch(ctx) -> ExitCode:
    """``status --watch``: redraw every second until Ctrl-C (exit OK)."""
    output.watch(ctx.out, lambda: status(ctx))
    return ExitCode.OK


def secondaries(session) -> dict[str, dict]:
    """Each secondary's hardened and prepared group, from its own status:
    the secondaries of the recorded direction (after a failover, site a's
    nodes), reached as the session reaches them (TLS on TCP)."""
    # Read-only: a file the nodes disagree with is shown (the running
    # mirror's document says why), not refused.
    d = direction.load(session, check=False)
    session = direction.oriented(session, d["source"])
    links = [SlaveLink.from_spec(r.spec(), timeout=5.0) for r in session.secondaries]
    out = {}
    try:
        replies = group.statuses(links) if links else {}
        for name, r in replies.items():
            if isinstance(r, Exception):
                out[name] = {"hardened": None, "prepared": None, "role": None,
                             "error": str(r)}
                continue
            role = r.get("role")
            err = r.get("problem")              # a volume no longer at its path
            if role != "secondary" and not err:
                # After a failover the old primaries run on until resynced.
                err = (f"runs as a {role}, not as a secondary of site {d['source']}"
                       + (f": {direction.why(d)}"
                          if d["state"] not in direction.MIRRORS else ""))
            out[name] = {"hardened": r.get("hardened"), "prepared": r.get("prepared"),
                         "role": role, "error": err}
    finally:
        for lk in links:
            lk.close()
    return out


def _local(session) -> tuple[dict | None, str | None]:
    """This host's running mirror's document, or (None, why not)."""
    try:
        return call(control_path(session), "status"), None
    except MirrorNotRunning as exc:
        return None, str(exc)


def _cluster_doc(session, etcd=None) -> dict:
    """``mirror status`` in cluster mode (see the module doc): etcd's
    answer, the same from every host; etcd unreachable: this host's
    mirror's own document, saying so."""
    local, why = _local(session)
    mine = (local or {}).get("cluster")
    try:
        if etcd is None:
            with cluster.client(session) as etcd:
                st = cluster.read_state(etcd, session.name)
        else:
            st = cluster.read_state(etcd, session.name)
    except CgmirrorError as exc:
        doc = local or {"ok": True, "session": session.name, "state": "stopped",
                        "why": why, "direction": where(session)}
        doc["cluster"] = {"leader": None, "hardened": None, "paused": None,
                          "local": mine, "error": str(exc)}
        return doc
    lead, pub = st["leader"], st["status"]
    if lead and isinstance(pub, dict) and (pub.get("cluster") or {}).get("epoch") \
            == lead["epoch"]:
        doc = dict(pub)
    elif lead:
        doc = {"ok": True, "session": session.name, "state": "starting",
               "why": f"{lead['host']} pid {lead['pid']} leads (epoch {lead['epoch']})"
                      f" and has not published its status yet",
               "direction": where(session)}
    else:
        doc = {"ok": True, "session": session.name,
               "state": (mine or {}).get("role") or "stopped",
               "why": (f"no coordinator leads session {session.name} (etcd holds no"
                       f" leader)" + (f"; this host's mirror (pid {local.get('pid')})"
                                      f" is {local.get('state')}" if local else
                                      f"; none runs on this host: {why}")),
               "direction": where(session)}
    h = st["hardened"]
    if isinstance(h, dict) and h.get("n"):
        doc["hardened"] = h["n"]
    doc["cluster"] = {"leader": lead, "hardened": h, "paused": st["paused"],
                      "local": mine, "error": None}
    return doc


def status(ctx) -> ExitCode:
    if getattr(ctx.session, "cluster", None) is not None:
        doc = _cluster_doc(ctx.session)
    else:
        try:
            doc = call(control_path(ctx.session), "status")
        except MirrorNotRunning as exc:
            doc = {"ok": True, "session": ctx.session.name, "state": "stopped",
                   "why": str(exc), "direction": where(ctx.session)}
    doc["secondaries"] = secondaries(ctx.session)
    if ctx.json:
        output.emit_json(doc, ctx.out)
    else:
        print_status(doc, ctx.out)
    return ExitCode.OK


def _direction(d: dict | None) -> str | None:
    """The direction line of ``mirror status``."""
    if not d:
        return None
    if d.get("error"):
        return f"direction: {d['error']}"
    extra = (f", from site {d['from']}" if d.get("from") else "") + (
        f", to site {d['to']}" if d.get("to") else "")
    return f"direction: site {d['source']} is the source ({d['state']}{extra})"


def _when(f: dict) -> str:
    g = f"group {f['group']}, " if f.get("group") else ""
    return f"{g}{time.strftime('%H:%M:%S', time.localtime(f['at']))}"


def _leader_line(c: dict | None) -> str | None:
    """The cluster line of ``mirror status`` (cluster mode only)."""
    if not c:
        return None
    if c.get("error"):
        return f"cluster: {c['error']}"
    lead, h = c.get("leader"), c.get("hardened") or {}
    text = (f"leader: {lead['host']} pid {lead['pid']} (epoch {lead['epoch']})"
            if lead else "leader: none")
    if h.get("n"):
        text += f"; hardened group {h['n']} (by epoch {h.get('epoch')})"
    if (c.get("paused") or {}).get("paused"):
        text += f"; paused by {c['paused'].get('by')}"
    local = c.get("local")
    if local and local.get("role") != "leader":
        text += f"; this host's mirror: {local.get('role')}"
    return text


def print_status(doc: dict, out) -> None:
    line = _direction(doc.get("direction"))
    lead = _leader_line(doc.get("cluster"))
    if lead:
        print(lead, file=out)
    if doc["state"] == "stopped" or "hold_ms" not in doc:
        print(f"session {doc['session']}: {doc['why']}", file=out)
        if line:
            print(line, file=out)
    else:
        rpo = "-" if doc["rpo_s"] is None else f"{doc['rpo_s']:.1f} s"
        h = doc["hold_ms"]
        fmt = (lambda v: "-" if v is None else f"{v:.1f}")
        print(f"session {doc['session']}: {doc['state']} (pid {doc['pid']}, phase"
              f" {doc['phase']}); hardened group {doc['hardened'] or '-'}, RPO {rpo}"
              f" (threshold {doc['rpo_threshold_s']:g} s)", file=out)
        if doc.get("why"):
            print(f"{doc['state']}: {doc['why']}", file=out)
        if line:
            print(line, file=out)
        print(f"groups formed {doc['groups_formed']}, failed {doc['groups_failed']};"
              f" hold ms last {fmt(h['last'])} p50 {fmt(h['p50'])} p99 {fmt(h['p99'])};"
              f" drain {output.rate(doc.get('drain_bytes_s'))}"
              f" (limit {output.rate(doc.get('rate_bytes_s'))} per volume)", file=out)
        speed = doc.get("drain_bytes_s")

        def eta(behind):        # at the drain speed measured so far
            if doc["state"] in ("parked", "paused") and behind:
                return doc["state"]             # nothing drains: no time to say
            return ("-" if behind is None or (behind and not speed) else
                    output.duration(behind / speed) if behind else "0 s")
        rows = [[s, v, d["secondary"], output.size(d["dirty_bytes"]),
                 output.size(d["behind_bytes"]), eta(d["behind_bytes"]), d["phase"],
                 d["error"] or ""]
                for s, vols in doc["volumes"].items() for v, d in vols.items()]
        output.table(rows, ["SLAVE", "VOLUME", "SECONDARY", "DIRTY", "BEHIND", "ETA",
                            "PHASE", "ERROR"], out)
        fails = doc.get("failures") or {}
        for name, f in (fails.get("nodes") or {}).items():
            print(f"node {name} failed ({_when(f)}): {f['error']}", file=out)
        if fails.get("mirror") and doc["state"] != "parked":
            f = fails["mirror"]
            print(f"last failure ({_when(f)}): {f['error']}", file=out)
    for name, r in doc["secondaries"].items():
        where = r["error"] or (f"hardened {r['hardened'] or 'none yet'}"
                               + (f", prepared {r['prepared']}" if r["prepared"] else ""))
        print(f"secondary {name}: {where}", file=out)
