"""The running mirror's status document (``cgmirror mirror status --json``,
coordinator/cli/mirror_cmds.py lists its fields), its RPO and when it is
"severe"; read from a cycle.Mirror by the control socket and the metrics.
"""

from __future__ import annotations

import math
import os
import time

from .. import direction
from ..errors import CgmirrorError


def percentile(values, p: float) -> float | None:
    """The p-th percentile (nearest rank) of ``values``, None if empty."""
    v = sorted(values)
    if not v:
        return None
    return v[min(len(v) - 1, max(0, math.ceil(p / 100 * len(v)) - 1))]


def rpo(mirror, now: float | None = None) -> float | None:
    """Age of ``mirror``'s last hardened group (its cut time to now), seconds."""
    now = time.time() if now is None else now
    if mirror.hardened_cut is None:
        return None
    return max(0.0, now - mirror.hardened_cut)


def severity(mirror, now: float | None = None) -> str | None:
    """Why the session is "severe" (one line), or None."""
    now = time.time() if now is None else now
    limit = mirror.settings.rpo_threshold_s
    age = rpo(mirror, now)
    if age is not None and age > limit:
        return (f"the last hardened group {mirror.hardened} is {age:.1f} s old, past"
                f" rpo_threshold_s {limit:g}")
    if age is None and now - mirror.started > limit:
        return (f"no group hardened in the {now - mirror.started:.0f} s since the"
                f" mirror started (rpo_threshold_s {limit:g})")
    return None


# The status document asks every node at once, each with this timeout, and
# waits for none longer than a second more (link.parallel): a control
# request (pause, resume, status: each replies with the document) must be
# answered within the client's CONTROL_TIMEOUT_S whatever the nodes do.  It
# used to ask twice in a row (the direction 5 s, then the primaries over
# the cycle's links, 10 s): with site a cut off (silence, no RST) every
# reply took over 16 s and ``cgmirror mirror resume`` timed out.
STATUS_TIMEOUT_S = 2.5


def where(session, statuses: dict | None = None) -> dict:
    """The recorded direction of ``session`` for status: {"source", "state",
    "from"?, "to"?, "why"?} ("why": the line saying why no group forms, if
    none may), or {"error"} if it cannot be read.  ``statuses``: every
    node's (direction.poll), else asked now."""
    try:
        d = direction.load(session, statuses, check=False)
    except CgmirrorError as exc:
        return {"source": None, "state": None, "error": str(exc)}
    out = {k: d[k] for k in ("source", "state", "from", "to") if k in d}
    if d["state"] not in direction.MIRRORS:
        out["why"] = direction.why(d)
    return out


def document(mirror) -> dict:
    """The status document of the running ``mirror`` (a cycle.Mirror)."""
    now = time.time()
    # One round, every node at once, bounded (STATUS_TIMEOUT_S): the
    # direction and the primaries' volumes both come from it.
    replies = direction.poll(mirror.session, timeout=STATUS_TIMEOUT_S)
    dirn = where(mirror.session, replies)
    why = severity(mirror, now)
    state = "severe" if why and mirror.state in ("running", "paused") else mirror.state
    if dirn.get("why") and mirror.state in ("running", "paused"):
        state, why = "parked", dirn["why"]         # failover, DR test: deliberate
    if mirror.session_file.problem and mirror.state in ("running", "paused"):
        state, why = "severe", mirror.session_file.problem
    holds = list(mirror.holds)
    vols: dict[str, dict] = {}
    for s_ in mirror.session.slaves:
        r = replies.get(s_.name)
        for v in s_.volumes:
            # ERROR: the primary unreachable now, else the last failure of the
            # pair (or of its primary or secondary) since a group hardened.
            f = mirror.failures.of_pair(s_.name, v.name, v.secondary)
            d = {"secondary": f"{v.secondary}/{v.remote_volume}", "phase": mirror.phase,
                 "dirty_bytes": None, "behind_bytes": None,
                 "error": f["error"] if f else None,
                 "failed_group": f["group"] if f else None}
            if isinstance(r, Exception):
                d["error"] = str(r)
            elif v.name in r["volumes"]:
                vs = r["volumes"][v.name]
                g = vs["granularity"]
                d["dirty_bytes"] = vs.get("cr_blocks", 0) * g
                d["behind_bytes"] = vs.get("dirty_blocks", 0) * g
                if vs.get("problem"):
                    d["error"] = vs["problem"]
            vols.setdefault(s_.name, {})[v.name] = d
    last = mirror.last
    doc = {"ok": True, "session": mirror.session.name, "pid": os.getpid(),
            "state": state, "why": why, "paused": mirror.paused, "phase": mirror.phase,
            "hardened": mirror.hardened or None, "rpo_s": _round(rpo(mirror, now)),
            "rpo_threshold_s": mirror.settings.rpo_threshold_s,
            "groups_formed": mirror.formed, "groups_failed": mirror.failed,
            "drain_failures_in_a_row": mirror.consecutive_drain_failures,
            "timer_lifted": mirror.timer_lifted,
            "hold_ms": {"last": holds[-1] if holds else None,
                        "p50": percentile(holds, 50), "p99": percentile(holds, 99)},
            "drain_mb_s": (round(mirror.drain_bytes / 1e6 / mirror.drain_seconds, 1)
                           if mirror.drain_seconds > 0 else None),
            "drain_bytes_s": (round(mirror.drain_bytes / mirror.drain_seconds)
                              if mirror.drain_seconds > 0 else None),
            "rate_bytes_s": mirror.rate or None,
            "direction": dirn, "failures": mirror.failures.document(),
            "last_group": None if last is None else {
                "n": last.n, "outcome": last.outcome, "error": last.error,
                "bytes": last.bytes},
            "volumes": vols}
    if getattr(mirror, "cluster", None) is not None:
        # Cluster mode: who leads (a standby names the leader it follows).
        doc["cluster"] = mirror.cluster.document()
    return doc


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


__all__ = ["document", "percentile", "rpo", "severity"]
