"""A running mirror's part of cluster mode: its leadership, what it
publishes, and the pause flag (coordinator/cluster.py has the keys and the
reasoning; cycle.py's ``_run_cluster`` the loop).

Three etcd clients, one per thread that talks to etcd, so that none waits
for another's call to a dead member: the cycle's (campaign, the pause flag
read before each group), the keepalive thread's, the publisher's; the
control socket's threads (``mirror pause|resume`` sent to this process)
use a fourth.
"""

from __future__ import annotations

import threading
import time

from .. import cluster
from ..errors import CgmirrorError


class Cluster:
    """Cluster mode of one Mirror (``mirror.cluster``)."""

    def __init__(self, mirror):
        s = mirror.session
        self.mirror = mirror
        self.name = s.name
        ttl = s.cluster.ttl_s
        ident = cluster.me()
        self.etcd = cluster.connect(s)
        # The renewals' own client, each member given at most ttl/4: a
        # member that does not answer must not cost the whole lease.
        renew = cluster.connect(s, timeout=max(1.0, ttl / 4))
        self.leadership = cluster.Leadership(self.etcd, s.name, ttl, keepalive_etcd=renew,
                                             ident=ident, log=mirror.log)
        self.publisher = cluster.Publisher(cluster.connect(s), s.name, ident, mirror.log)
        self.publisher.status_fn = mirror.status
        self._ctl = cluster.connect(s)
        self._ctl_lock = threading.Lock()
        self.poll = cluster.poll_interval(ttl)
        self._pause_read = float("-inf")
        self.pause_seen: float | None = None    # "at" of the pause flag acted on
        self._hist: dict | None = None
        self._hardened: dict | None = None
        self._dir: dict | None = None
        self._lin: dict | None = None
        mirror.events.sink = self.publisher.event
        self.publisher.start()

    def close(self) -> None:
        self.leadership.resign()
        self.publisher.lead(None)
        self.publisher.close()

    # ---- pause

    def set_paused(self, paused: bool, by: str) -> None:
        """``P/control/paused`` from this process (its control socket)."""
        with self._ctl_lock:
            doc = cluster.set_paused(self._ctl, self.name, paused, by,
                                     f"{by} through the mirror on {self.leadership.me['host']}"
                                     f" pid {self.leadership.me['pid']}")
        self.pause_seen = doc["at"]
        self.publisher.status_now()

    def sync_pause(self, force: bool = False) -> None:
        """Take ``P/control/paused`` (read at most every ``poll`` seconds;
        etcd not answering: as it was, the lease decides the rest)."""
        now = time.monotonic()
        if not force and now - self._pause_read < self.poll:
            return
        self._pause_read = now
        m = self.mirror
        try:
            doc = cluster.paused(self.etcd, self.name)
        except CgmirrorError as exc:
            if force and not m.paused:
                # At a takeover the flag is unknown: a role command may have
                # parked the last leader.  Paused until etcd says otherwise.
                m.hold(True)
                m.log(f"cannot read the pause flag at takeover ({exc}): paused until"
                      f" etcd answers")
            return
        want = bool(doc and doc.get("paused"))
        at = doc.get("at") if doc else None
        changed = want != m.paused
        if changed:
            m.hold(want)
            by = (doc or {}).get("by", "?")
            m.log(f"{'paused' if want else 'resumed'} through etcd ({by})"
                  + (": no new group until resume" if want else ""))
            m.events.emit("pause" if want else "resume", by=by)
        if changed or at != self.pause_seen:
            self.pause_seen = at
            self.publisher.status_now()

    # ---- a new term

    def took_over(self) -> None:
        """Read what the last leader published; the pause flag at once."""
        try:
            st = cluster.read_state(self.etcd, self.name)
        except CgmirrorError:
            st = {}
        self._hist = st.get("history")
        self._hardened = st.get("hardened")
        self._dir = self._lin = None            # published again by this leader
        self._pause_read = float("-inf")
        self.sync_pause(force=True)
        self.publisher.status_now()

    def cut_of(self, n: int) -> float | None:
        """The cut time of group ``n`` if it is the hardened group published."""
        h = self._hardened
        return h.get("cut") if isinstance(h, dict) and h.get("n") == n else None

    # ---- state

    def direction(self, d: dict) -> None:
        rec = {k: v for k, v in d.items() if k != "answered"}
        if rec != self._dir:
            self._dir = rec
            self.publisher.state("direction", rec)

    def lineage(self, primaries: dict, secondaries: dict) -> None:
        """{node: {volume: current generation}} of both sides."""
        lin: dict[str, dict[str, str]] = {}
        for name, st in list(primaries.items()) + list(secondaries.items()):
            if not isinstance(st, dict):
                continue
            for v, vs in st.get("volumes", {}).items():
                g = vs.get("lineage") if isinstance(vs, dict) else None
                if isinstance(g, dict) and g.get("current"):
                    lin.setdefault(name, {})[v] = g["current"]
        if lin != self._lin:
            self._lin = lin
            self.publisher.state("lineage", lin)

    def group(self, res, now: float) -> None:
        """Group ``res`` ended: the history summary, the hardened group,
        the status document."""
        self._hist = cluster.history_summary(self._hist, res)
        self.publisher.state("history", self._hist)
        if res.outcome == "hardened":
            self._hardened = {"n": res.n, "cut": round(res.cut, 3), "at": round(now, 3),
                              "epoch": self.mirror.epoch}
            self.publisher.state("hardened", self._hardened)
        self.publisher.status_now()

    def document(self) -> dict:
        """The ``cluster`` part of the status document."""
        m, lead = self.mirror, self.leadership
        short = (lambda d: None if d is None else
                 {k: d.get(k) for k in ("host", "pid", "id", "epoch", "since")})
        # "campaigning": not yet seen who leads (the first try).
        return {"role": ("leader" if m.epoch is not None else
                         "no-quorum" if m.cluster_error else
                         "standby" if m.leader is not None else "campaigning"),
                "epoch": m.epoch, "leader": short(m.leader),
                "me": {k: lead.me[k] for k in ("host", "pid", "id")},
                "ttl_s": lead.ttl, "pause_seen": self.pause_seen,
                "etcd_error": m.cluster_error or self.publisher.failed,
                "published_at": round(time.time(), 3)}


__all__ = ["Cluster"]
