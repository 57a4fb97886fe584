"""Continuous consistency-group mirroring (DESIGN.md "The cycle", "The secondary").

``Mirror`` is the long-running coordinator behind ``cgmirror mirror run``.
One group n is::

    establish n (freeze/cut on every primary, thaw)       group.establish
    drain n: COPY(n) to every secondary's replication     group.copy
             export; a bit is cleared only once the secondary flushed it
    prepare n on every secondary (durable "prepared n")
    commit n on every secondary, only once all are prepared
    record (history row), wait interval_ms, next

Drain timer.  A drain longer than ``max_drain_ms`` is abandoned: ABORT(n)
on the primaries puts the bits they have not confirmed back into ``cr`` (the
confirmed ones are not resent), the secondaries keep their undo store, and
the next group continues on top of it; nothing is rolled back.  After
``LIFT_AFTER`` (5) drain-time failures in a row the timer is lifted for one
group, as Global Mirror does: under sustained overload the drain of an
unbounded group then ends, because the primary preserves only the cut's
blocks and every confirmed block stays confirmed, so the RPO stays bounded
by about five timers plus one drain.

The first full copy of a pair (the primary has no completed copy on the
replication export: ``group.full_volumes``) is never abandoned by the timer:
a full copy that is aborted drops the primary's baseline, so the next group
would start the full copy again from block 0, and a timer shorter than one
full copy would never let it finish.  The secondary stays at "hardened 0"
until it completes.

Adoption.  A pair whose primary already holds a completed copy on the
replication export (``cgmirror copy`` to that URI, spelled as
``session.replication_uri`` spells it) is drained incrementally from the
first group; at start every such baseline is checked with the slave's
``verify`` op (sampled digests, nbdplugin/copier.py) and a pair that fails
is copied whole, with one warning line.

Prepare or commit failures mark the mirror "needs recovery": the next
group starts with the recovery rule (coordinator/mirror/recovery.py), which
can always finish the job.

Crash points of the coordinator (kill -9): mid-establish -- the slave aborts
a cut whose connection went away; mid-drain -- the next start's preflight
aborts the leftover cut (unconfirmed bits back to ``cr``); mid-prepare or
mid-commit -- ``recover`` at the next start.  No case needs a full copy.

Cluster mode (``[cluster]``, coordinator/cluster.py).  Any number of
``mirror run`` for one session, one per host (each takes its host's session
lock).  Each campaigns for ``P/leader``; the others stand by (state
"standby", "no-quorum" while etcd does not answer) and their status names
the leader.  The winner sets its epoch on every link (the nodes fence
older ones), recovers (``need_recovery``), publishes the direction it
reads, and forms groups as above while ``held()``: checked before the
recovery, before the establish and before the commit; lost, the group is
abandoned (never committed: the next leader's recovery settles a prepared
one), and it stands by and campaigns again.  ``mirror pause|resume`` go
through ``P/control/paused``, read before each group.  No group forms
without the lease, so a quorum lost holds no host write: nothing is frozen.

The rest of the mirror: recovery.py (the recovery rule, also run by the role
commands), status.py (the status document), control.py (the control socket),
client.py (its clients), events.py, metrics.py, verify.py, failures.py (the
last failure of each pair and node, for status), log.py (time stamps, empty
groups summarized), sessionfile.py (the session file edited under the mirror).
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from wire import failpoints

from .. import cluster as cluster_mod, direction, group, output
from ..errors import CgmirrorError, CopyFailed, EstablishAborted, MirrorError, describe
from ..history import History
from ..link import SlaveLink
from ..lock import SessionLock
from ..session import Session, replication_uri
from . import events, recovery, status, verify
from .failures import Failures
from .log import Quiet, stderr_log
from . import joins
from .sessionfile import SessionFile
from .control import ControlServer
from .clustered import Cluster as _Cluster

# Test-only crash points of the coordinator: wire/failpoints.py (mirror:*).
_hit = failpoints.hit


LIFT_AFTER = 5                  # drain-time failures in a row before the timer lifts
HOLD_WINDOW = 1000              # hold times kept for p50/p99

class _DrainTimeout(Exception):
    pass


class _Stopping(Exception):
    pass


class _Lost(Exception):
    """Cluster mode: the leadership was lost (why: str(exc))."""


@dataclass
class GroupResult:
    """How one group ended; ``outcome`` is the history's word."""

    n: int
    outcome: str                # hardened, drain-timeout, aborted, failed
    error: str | None = None
    bytes: int = 0
    cut: float = 0.0            # unix time
    measures: dict = field(default_factory=dict)


class Mirror:
    """The cycle of one session.  ``run_once()`` forms one group (tests drive
    it step by step); ``run()`` loops until ``stop()``.  Use ``open()`` first
    (session lock, history, control socket) and ``close()`` at the end."""

    def __init__(self, session: Session, log: Callable[[str], None] | None = None,
                 serve_control: bool = True):
        if session.mirror is None or not session.pairs():
            raise MirrorError(f"session {session.name} mirrors no volume: give volumes a"
                              f" 'secondary' (see the session file format)")
        unmirrored = [f"{s.name}/{v.name}" for s in session.slaves for v in s.volumes
                      if not v.secondary]
        if unmirrored:
            raise MirrorError(f"volume {unmirrored[0]} has a fixed target, not a"
                              f" secondary: a mirrored session mirrors every volume")
        self.session = session
        self.settings = session.mirror
        # Time-stamped unless the journal stamps it; empty groups summarized.
        self.log = Quiet(log or stderr_log())
        self.serve_control = serve_control
        self.links = recovery.Links.of(session)
        self.slaves, self.secondaries = self.links.slaves, self.links.secondaries
        self.lock: SessionLock | None = None
        self.history: History | None = None
        self._server: ControlServer | None = None
        self._stop = threading.Event()
        self._resume = threading.Condition()
        self.paused = False
        self.state = "starting"
        self.phase = "idle"                 # idle, establish, drain, harden, recover
        self.need_recovery = True
        self.verified = False
        self.hardened = 0
        self.hardened_cut: float | None = None   # unix time of its cut
        self.started = time.time()
        self.formed = 0
        self.failed = 0
        self.consecutive_drain_failures = 0
        self.timer_lifted = 0               # groups formed with the timer lifted
        self.holds: deque[float] = deque(maxlen=HOLD_WINDOW)
        self.last: GroupResult | None = None
        self.drain_bytes = 0
        self.drain_seconds = 0.0
        self.events = events.EventBus(session.name)     # cgmirror events
        self.peers: events.PeerWatch | None = None      # slave up/down, dirty bytes
        self.metrics = None                             # metrics.Metrics if [mirror] metrics
        self.rate = session.mirror.rate or 0            # drain bytes/s per volume; 0: none
        self.verifies = verify.Requests(self._wake)     # cgmirror verify, between groups
        self.failures = Failures(session)               # last failure per pair and node
        self.session_file = SessionFile(session.path)   # edited under us? (sessionfile.py)
        self._cannot_last: tuple[str | None, float, int] = (None, 0.0, 0)
        self._failed_before = False         # the last attempt failed
        # Lineage (joins.py): ``winner``, the operator named this source the
        # winner (``resync --from``); ``full``, a full copy was asked for.
        self.winner = False
        self.full = False
        self.gens: dict[str, dict[str, str]] = {}   # {secondary: {volume: generation}}
        # Cluster mode (coordinator/cluster.py): None without [cluster].
        self.cluster: _Cluster | None = None
        self.epoch: int | None = None           # ours while we lead
        self.leader: dict | None = None         # the leader we last saw (standby)
        # The last leader seen at all: the "previous" of our takeover event
        # (``leader`` turns None when a try reads the key just expired).
        self._seen_leader: dict | None = None
        self.cluster_error: str | None = None   # etcd's last refusal (no-quorum)

    # ------------------------------------------------------------ life cycle

    def open(self) -> "Mirror":
        """Take the session (BUSY if another coordinator has it), open the
        history and the control socket."""
        s = self.session
        self.lock = SessionLock(s.name, s.state_dir).acquire()
        try:
            self.history = History(s.state_dir)
            self.history.mark_interrupted()
            self.history.mark_groups_interrupted()
            # Cluster mode is ``mirror run``'s (it serves control); a role
            # command's Mirror forms its groups under the session lock as
            # without [cluster] (its requests carry no epoch).
            if getattr(s, "cluster", None) is not None and self.serve_control:
                self.cluster = _Cluster(self)
            if self.serve_control:
                self._server = ControlServer(self.settings.control, self)
                self._server.start()
                self._start_operations()
        except BaseException:
            self.close()
            raise
        return self

    def _start_operations(self) -> None:
        """The peer watch (events, metrics) and the metrics endpoint, with
        links of their own: the cycle's links belong to the cycle's thread."""
        self.peers = events.PeerWatch(
            self.events, [SlaveLink.from_spec(s.spec()) for s in self.session.slaves],
            [SlaveLink.from_spec(self.session.secondary(lk.name).spec())
             for lk in self.secondaries]).start()
        if self.settings.metrics:
            from .metrics import Metrics        # prometheus_client only when asked
            self.metrics = Metrics(self).start(self.settings.metrics)

    def _wake(self) -> None:
        with self._resume:
            self._resume.notify_all()

    def _serve_verifies(self) -> None:
        """Run asked-for verifies now, between groups, if the last group
        hardened (coordinator/mirror/verify.py says why it must have); running,
        the next hardened group serves them; paused, they are refused."""
        if not self.verifies.pending():
            return
        if self.last is not None and self.last.outcome == "hardened" \
                and not self.need_recovery and not self._cannot_last[0]:
            self.verifies.serve(self._verify_now)
        elif self.paused:
            self.verifies.refuse(MirrorError(
                "verify needs a hardened last group and the mirror is paused after"
                f" group {self.last.n if self.last else '-'} did not harden (or none"
                f" since start): resume it"))

    def _verify_now(self, repair: bool) -> dict:
        self.phase = "verify"
        try:
            report = verify.verify(self.session, {lk.name: lk for lk in self.slaves},
                                   {lk.name: lk for lk in self.secondaries},
                                   self.hardened, repair)
        finally:
            self.phase = "idle"
        n = report["differing_blocks"]
        self.log(f"verify against group {self.hardened}: {n} differing blocks"
                 + (" marked for the next group" if report["repaired"] else ""))
        self.events.emit("verify", group=self.hardened, differing_blocks=n,
                         repaired=report["repaired"])
        return report

    def set_rate(self, rate: int) -> None:
        """The drain's limit from now on (bytes/s per volume, 0: none); the
        cycle's thread passes it to a running drain at its next poll."""
        self.rate = rate
        self.log(f"drain rate limit {output.rate(rate)} per volume")

    def _pass_rate(self, sent: int) -> int:
        """Tell the primaries a rate changed since ``sent`` (cycle thread:
        its links are not shared); return the rate they now have."""
        rate = self.rate
        if rate != sent:
            group.fanout.parallel(self.slaves, lambda lk: lk.call("rate", rate=rate))
        return rate

    def _announce(self, res: "GroupResult") -> None:
        """A group ended: an event, and the metrics' histograms."""
        m = res.measures
        if res.outcome == "hardened":
            self.events.emit("group-formed", n=res.n, bytes=res.bytes,
                             hold_ms=m.get("hold_ms"), drain_ms=m.get("drain_ms"))
        else:
            self.events.emit("group-failed", n=res.n, outcome=res.outcome,
                             error=res.error)
        if self.metrics:
            self.metrics.observe(m)

    def close(self) -> None:
        self.log.flush()
        if self.cluster:
            self.cluster.close()
            self.cluster = None
        if self.metrics:
            self.metrics.close()
            self.metrics = None
        if self.peers:
            self.peers.close()
            self.peers = None
        if self._server:
            self._server.close()
            self._server = None
        self.links.close()
        if self.history:
            self.history.close()
            self.history = None
        if self.lock:
            self.lock.release()
            self.lock = None
        self.state = "stopped"

    def __enter__(self) -> "Mirror":
        return self.open()

    def __exit__(self, *exc) -> None:
        self.close()

    def stop(self) -> None:
        """Finish or abandon the current group, then ``run`` returns (safe from
        a signal handler: it only sets events)."""
        self._stop.set()
        with self._resume:
            self._resume.notify_all()

    def pause(self) -> None:
        """No new group after the current one, until ``resume`` (cluster
        mode: of the session, whichever coordinator leads)."""
        if self.cluster:
            self.cluster.set_paused(True, "mirror pause")
        self.hold(True)
        self.events.emit("pause")

    def resume(self) -> None:
        if self.cluster:
            self.cluster.set_paused(False, "mirror resume")
        self.hold(False)
        self.events.emit("resume")

    def hold(self, paused: bool) -> None:
        """This coordinator's own pause flag, and wake the cycle (``pause``
        and ``resume`` also tell etcd; cluster mode follows etcd's flag with
        this)."""
        with self._resume:
            self.paused = paused
            self._resume.notify_all()

    def run(self) -> None:
        """Form groups until ``stop()``; a failed group is logged and counted,
        and the next one is tried after the interval (at least 1 s after a
        failure that formed nothing, so a dead peer is not hammered).  In
        cluster mode only while this coordinator leads (``_run_cluster``)."""
        if self.cluster:
            self._run_cluster()
        else:
            self.state = "running"
            self._groups()
        self.verifies.refuse(MirrorError("the mirror stopped before verify ran"))
        self.log("stopped")         # says the empty groups counted first

    def _groups(self) -> str | None:
        """The loop of groups until ``stop()`` (return None) or, in cluster
        mode, until the leadership is lost (return why)."""
        while not self._stop.is_set():
            if self.cluster:
                lost = self._lost()
                if lost:
                    return lost
                self.cluster.sync_pause()
            with self._resume:
                while self.paused and not self._stop.is_set() \
                        and not self.verifies.pending():
                    self.state = "paused"
                    if not self.cluster:
                        self._resume.wait()
                        continue
                    self._resume.wait(self.cluster.poll)
                    if self._lost():
                        break
                    self.cluster.sync_pause()
            if self.cluster and self._lost():
                continue                        # said at the top of the loop
            self._serve_verifies()
            if self._stop.is_set():
                break
            if self.paused:
                continue
            self.state = "running"
            try:
                result = self.run_once()
                self._cannot_last = (None, 0.0, 0)      # a group began
                quiet = result.outcome == "hardened" or result.outcome == "drain-timeout"
                self.verifies.group_ended(result.n, self.hardened,
                                          result.outcome == "hardened",
                                          result.outcome != "drain-timeout", result.error)
                if self.cluster and result.outcome != "hardened" \
                        and self._check_fenced(result.error):
                    continue                    # the top of the loop stands down
            except _Lost as exc:
                return str(exc)
            except CgmirrorError as exc:
                self.failed += 1
                self.failures.note(exc, None)
                self._failed_before = True
                self._cannot(str(exc))
                self.events.emit("group-failed", n=None, outcome="failed", error=str(exc))
                self.verifies.group_ended(None, self.hardened, False, True, str(exc))
                quiet = False
                if self.cluster and self._check_fenced(str(exc)):
                    continue
            wait = self.settings.interval_ms / 1000
            self._stop.wait(wait if quiet else max(wait, 1.0))
        return None

    # ------------------------------------------------------------ cluster mode

    def _run_cluster(self) -> None:
        """Stand by, lead, stand by again... until ``stop()`` (module doc)."""
        c = self.cluster
        while not self._stop.is_set():
            self.state = "no-quorum" if self.cluster_error else "standby"
            self.phase = "idle"
            epoch = c.leadership.campaign(self._stop, self._standing_by)
            if epoch is None:
                break
            self._lead(epoch)
            why = self._groups()
            if why is None:
                break                           # stopped while leading
            self._step_down(why)
        c.leadership.resign()
        c.publisher.lead(None)

    def _standing_by(self, leader: dict | None, error: Exception | None) -> None:
        """A campaign's try did not win: say who leads (once a leader), or
        that etcd does not answer (once until it does)."""
        if error is not None:
            self.state = "no-quorum"
            if self.cluster_error is None:
                self.log(f"no quorum: {error}; no group forms until etcd answers")
                self.events.emit("no-quorum", error=str(error))
            self.cluster_error = str(error)
            return
        if self.cluster_error is not None:
            self.log("etcd answers again")
        self.cluster_error = None
        self.state = "standby"
        short = None if leader is None else {k: leader.get(k)
                                             for k in ("host", "pid", "epoch")}
        prev = None if self.leader is None else {k: self.leader.get(k)
                                                 for k in ("host", "pid", "epoch")}
        if short is not None and short != prev:
            self.log(f"standby: session {self.session.name} is led by {short['host']}"
                     f" pid {short['pid']} (epoch {short['epoch']})")
            self.events.emit("standby", leader=short)
        self.leader = leader
        if leader is not None:
            self._seen_leader = leader

    def _lead(self, epoch: int) -> None:
        """This coordinator won: fence with ``epoch``, recover first, publish."""
        c = self.cluster
        seen = self.leader or self._seen_leader
        prev = None if seen is None else {k: seen.get(k) for k in ("host", "pid", "epoch")}
        self.epoch = epoch
        self.leader = self._seen_leader = {**c.leadership.me, "epoch": epoch}
        self.cluster_error = None
        self.links.set_epoch(epoch)
        self.need_recovery = True
        self.state = "running"
        c.publisher.lead(c.leadership.record)
        c.took_over()
        self.log(f"leader of session {self.session.name} (epoch {epoch}"
                 + (f", after {prev['host']} pid {prev['pid']} epoch {prev['epoch']}"
                    if prev else "") + "): recovering, then groups")
        self.events.emit("leader", epoch=epoch, host=c.leadership.me["host"],
                         previous=prev)

    def _lost(self) -> str | None:
        """Why this leader may not go on (None: it still holds the lease)."""
        lead = self.cluster.leadership
        if lead.held():
            return None
        return lead.lost_why or (f"the lease was not renewed within ttl_s"
                                 f" {lead.ttl} (etcd slow or unreachable)")

    def _check_lead(self, before: str) -> None:
        """Raise _Lost unless this coordinator still leads (cluster mode)."""
        if self.cluster:
            why = self._lost()
            if why:
                raise _Lost(f"{why} (checked before {before})")

    def _check_fenced(self, error: str | None) -> bool:
        """A node refused us as deposed (its line says "deposed",
        wire/protocol.py's fenced_message): say so and end the term (the
        loop stands down at its top); says whether."""
        if not (error and "deposed" in error):
            return False
        self.log(f"fenced: {error}")
        self.events.emit("fenced", epoch=self.epoch, error=error)
        self.cluster.leadership.depose(error)
        return True

    def _step_down(self, why: str) -> None:
        self.log(f"lost the leadership of session {self.session.name} (epoch"
                 f" {self.epoch}): {why}; no group is committed, standing by")
        self.events.emit("leader-lost", epoch=self.epoch, why=why)
        self.cluster.publisher.lead(None)
        self.links.set_epoch(None)
        self.epoch = None
        self.leader = None
        self.paused = False
        unreachable = self.cluster.leadership.unreachable
        if unreachable:                     # no quorum: said now, not at the next try
            self._standing_by(None, cluster_mod.ClusterError(unreachable))

    def _follow(self, d: dict) -> None:
        """Cluster mode: a role command run beside this coordinator (it
        parked the mirror, then resumed it) made the other site the source:
        go on in that direction -- links to the new primaries and
        secondaries, recovery and the baselines' check first -- rather
        than refuse every group until someone restarts every unit."""
        base = self.session_file.started
        if base is None or d["state"] not in direction.MIRRORS \
                or direction.sending(self.session, d) == d["source"]:
            return
        self.session = direction.oriented(base, d["source"])
        old, self.links = self.links, recovery.Links.of(self.session)
        self.links.set_epoch(self.epoch)
        self.slaves, self.secondaries = self.links.slaves, self.links.secondaries
        old.close()
        self.need_recovery, self.verified = True, False
        self.log(f"site {d['source']} is the source now ({d.get('by') or d['state']}):"
                 f" groups from site {d['source']} to site {direction.other(d['source'])}")
        self.events.emit("direction", source=d["source"], by=d.get("by"))

    def _cannot(self, why: str) -> None:
        """Log that no group could begin; the same reason again (a peer
        down, a changed session file: once a second) at most once a minute."""
        now = time.monotonic()
        same, at, count = self._cannot_last
        if why == same and now - at < 60:
            self._cannot_last = (same, at, count + 1)
            return
        again = f" (again, {count + 1} times in the last minute)" if why == same else ""
        self.log(f"cannot form a group{again}: {why}")
        self._cannot_last = (why, now, 0)

    # ------------------------------------------------------------ recovery

    def secondary_statuses(self) -> dict[str, dict]:
        """{name: status} of every secondary (recovery.secondary_statuses)."""
        return recovery.secondary_statuses(self.links)

    def recover(self) -> int:
        """Bring every secondary to one hardened group and hand the blocks a
        rollback restored back to the primaries (coordinator/mirror/
        recovery.py); return that group's number."""
        self._check_lead("the recovery")
        self.phase = "recover"
        st = recovery.settle(self.links, self.log)
        recovery.return_tgt(self.links, st, self.log)
        top = max(r["hardened"] for r in st.values())
        self.hardened = top
        self.hardened_cut = self.history.group_cut_time(top) if top else None
        if top and self.hardened_cut is None and self.cluster:
            self.hardened_cut = self.cluster.cut_of(top)  # formed by another leader
        self.need_recovery = False
        self.phase = "idle"
        return top

    # ------------------------------------------------------------ one group

    def _adopt(self, targets, full) -> None:
        """At start: a pair to be drained incrementally must still hold its
        baseline on the replication export; one that does not is copied whole."""
        for lk in self.slaves:
            inc = {v: uri for v, uri in targets[lk.name].items()
                   if v not in full.get(lk.name, ())}
            if not inc:
                continue
            failed = lk.call("verify", targets=inc,
                             timeout_ms=min(self.session.copy_timeout_ms,
                                            int(lk.timeout * 500)))["failed"]
            for v, line in failed.items():
                self.log(f"warning: {lk.name}/{v}: {line}; copying it whole instead")
                full.setdefault(lk.name, []).append(v)
            for v in inc:
                if v not in failed:
                    self.log(f"{lk.name}/{v}: the replication export holds its last copy;"
                             f" adopted, sending only the changes")

    def run_once(self) -> GroupResult:
        """Form one group (recovering first if needed); record and return how
        it ended.  Raises CgmirrorError only when no group could be begun."""
        self.session_file.check()               # the file still says what runs
        # The direction the nodes hold (not after a failover, nor reversed),
        # read with the file's session: it names every node as the nodes do.
        d = direction.load(self.session_file.started or self.session)
        if self.cluster:
            self._follow(d)
            self.cluster.direction(d)
        direction.check_mirror(self.session, d)
        if self.need_recovery:
            self.recover()
        replies = group.preflight(self.slaves, abort_leftover=True, warn=self.log)
        st = self.secondary_statuses()
        # Lineage (coordinator/mirror/joins.py): never over newer or split data.
        joins.check(self.session, replies, st, source=direction.sending(self.session, d),
                    winner=self.winner, full=self.full)
        self.gens = joins.gens(self.session, replies)
        if self.cluster:
            self.cluster.lineage(replies, st)
        targets = replication_targets(self.session, st)
        full = group.full_volumes(replies, targets, "auto")
        if not self.verified:
            self._adopt(targets, full)
            self.verified = True
        floor = max([self.history.max_n()] + [r["hardened"] for r in st.values()]
                    + [r["prepared"] or 0 for r in st.values()])
        n = group.next_n(replies, floor)
        first_copy = any(full.values())
        lifted = self.consecutive_drain_failures >= LIFT_AFTER
        res = GroupResult(n=n, outcome="running", cut=time.time())
        self.history.begin_group(n, self.session.name, res.cut)
        try:
            self._form(res, targets, full, timer=not (first_copy or lifted))
        except CgmirrorError as exc:        # recorded as this group's failure
            res.outcome, res.error = "failed", describe(exc)
            self.failures.note(exc, n)
        except _Lost as exc:                # abandoned: never committed
            res.outcome, res.error = "aborted", f"leadership lost: {exc}"
            raise
        except BaseException as exc:
            res.outcome, res.error = "failed", describe(exc)
            raise
        finally:
            self.phase = "idle"
            self._record(res, lifted, first_copy)
        return res

    def _form(self, res: GroupResult, targets, full, timer: bool) -> None:
        n, s = res.n, self.session
        m = res.measures
        self._check_lead("the establish")
        _hit("mirror:leader-checked")
        self.phase = "establish"
        try:
            est = group.establish(self.slaves, n, s.lease_ms, s.max_coordination_ms,
                                  full={k: v for k, v in full.items() if v})
        except EstablishAborted as exc:
            res.outcome, res.error = "aborted", str(exc)
            self.failures.note(exc, n)
            return
        m["coordination_ms"] = est.coordination_ms
        m["hold_ms"] = est.max_held_ms
        self.holds.append(est.max_held_ms)
        _hit("mirror:after-cut")
        self.phase = "drain"
        t0 = time.monotonic()
        deadline = t0 + self.settings.max_drain_ms / 1000 if timer else None
        volumes = sum(len(v) for v in targets.values())

        sent_rate = self.rate
        # An empty cut (the idle groups between writes) is drained at once
        # and hardened even when a stop comes: abandoning it would leave the
        # primaries' lineage one cut past the secondaries' hardened group,
        # and after a failover the pair would look written on both sides
        # (wire/lineage.py, "cut").
        empty = not any(b for t in est.slaves.values() for b in t.blocks.values())

        def watch(progress: dict) -> None:
            nonlocal sent_rate
            _hit("mirror:mid-drain")
            sent_rate = self._pass_rate(sent_rate)
            done = sum(p.get("state") == "done" for vols in progress["slaves"].values()
                       for p in vols.values())
            if done == volumes:
                return          # the last poll: the drain is over, nothing to abandon
            if self._stop.is_set() and not empty:
                raise _Stopping()
            if self.cluster and self._lost():
                raise _Stopping()           # a lost leader drains nothing more
            if deadline is not None and time.monotonic() > deadline:
                raise _DrainTimeout()

        try:
            report = group.copy(self.slaves, n, targets, "auto", watch,
                                timeout_ms=s.copy_timeout_ms, rate=sent_rate)
        except _DrainTimeout:
            # group.copy told every slave ABORT(n): unconfirmed bits are in cr.
            m["drain_ms"] = group.fanout.ms(time.monotonic() - t0)
            res.outcome = "drain-timeout"
            res.error = (f"the drain took longer than max_drain_ms"
                         f" ({self.settings.max_drain_ms}); its unsent blocks go into"
                         f" the next group")
            self.failures.mirror(res.error, n)
            return
        except _Stopping:
            if self.cluster and self._lost():
                raise _Lost(f"{self._lost()} (during the drain of group {n})") from None
            res.outcome, res.error = "aborted", "stopped during the drain"
            return
        except CopyFailed as exc:
            m["drain_ms"] = group.fanout.ms(time.monotonic() - t0)
            res.outcome, res.error = "failed", str(exc)
            self.failures.note(exc, n)
            return
        m["drain_ms"] = group.fanout.ms(time.monotonic() - t0)
        res.bytes = report.bytes
        self.drain_bytes += report.bytes
        self.drain_seconds += report.seconds
        self._harden(res)

    def _harden(self, res: GroupResult) -> None:
        """prepare n on all; commit n on each only once every one is prepared.
        Any failure leaves the rest to ``recover`` before the next group."""
        n, m = res.n, res.measures
        self.phase = "harden"
        t0 = time.monotonic()
        prepared = group.fanout.parallel(self.secondaries,
                                         lambda lk: lk.call("prepare", n=n))
        m["prepare_ms"] = group.fanout.ms(time.monotonic() - t0)
        if self._failed(res, "prepare", prepared):
            return
        _hit("mirror:after-prepare")
        self._check_lead(f"the commit of group {n}")
        _hit("mirror:commit-checked")
        t1 = time.monotonic()

        def commit(lk: SlaveLink) -> dict:
            # gens: the primaries' generations the group belongs to (the
            # secondary records them with the commit: wire/lineage.py event 4).
            g = self.gens.get(lk.name)
            reply = lk.call("commit", n=n, **({"gens": g} if g else {}))
            _hit("mirror:mid-commit")
            return reply

        # One after the other: a crash point between two commits must exist.
        committed = {}
        for lk in self.secondaries:
            try:
                committed[lk.name] = commit(lk)
            except CgmirrorError as exc:
                committed[lk.name] = exc
        m["commit_ms"] = group.fanout.ms(time.monotonic() - t1)
        # Some may have committed: recovery rolls the others forward.
        if not self._failed(res, "commit", committed):
            res.outcome = "hardened"

    def _failed(self, res: GroupResult, step: str, replies: dict) -> bool:
        """If a secondary's ``step`` failed (its reply is the error), the
        group failed and the mirror needs recovery; says whether."""
        bad = [(name, r) for name, r in replies.items() if isinstance(r, Exception)]
        if bad:
            self.need_recovery = True
            name, exc = bad[0]
            res.outcome, res.error = "failed", f"{step} {res.n} failed on {name}: {exc}"
            for name, exc in bad:
                self.failures.node(name, f"{step} {res.n} failed: {exc}", res.n)
        return bool(bad)

    def _record(self, res: GroupResult, lifted: bool, first_copy: bool) -> None:
        now = time.time()
        if res.outcome == "hardened":
            self.failures.clear()           # first: status never shows it formed and failed
            self.formed += 1
            self.hardened, self.hardened_cut = res.n, res.cut
            if lifted:
                self.timer_lifted += 1
            self.consecutive_drain_failures = 0
        else:
            self.failed += 1
            if res.outcome == "drain-timeout":
                self.consecutive_drain_failures += 1
        self.last = res
        after_failure, self._failed_before = self._failed_before, res.outcome != "hardened"
        self._announce(res)
        self.history.finish_group(res.n, res.outcome, res.error,
                                  now if res.outcome == "hardened" else None,
                                  bytes=res.bytes, **res.measures)
        if self.cluster:
            self.cluster.group(res, now)
        m = res.measures
        extra = (" (drain timer lifted after"
                 f" {LIFT_AFTER} drain-time failures)") if lifted else (
                 " (first full copy: no drain timer)" if first_copy else "")
        if res.outcome == "hardened" and not res.bytes and not extra \
                and not after_failure:
            self.log.empty(res.n)           # idle: summarized (log.py); not the first
                                            # to form after failures: that one is said
        elif res.outcome == "hardened":
            self.log(f"group {res.n} hardened{extra}: {res.bytes} bytes, hold"
                     f" {m.get('hold_ms', 0):.1f} ms, drain {m.get('drain_ms', 0):.0f} ms,"
                     f" prepare {m.get('prepare_ms', 0):.0f} ms, commit"
                     f" {m.get('commit_ms', 0):.0f} ms")
        else:
            self.log(f"group {res.n} {res.outcome}{extra}: {res.error}")

    # ------------------------------------------------------------ status

    def rpo(self, now: float | None = None) -> float | None:
        """Age of the last hardened group (its cut time to now), seconds."""
        return status.rpo(self, now)

    def severity(self, now: float | None = None) -> str | None:
        """Why the session is "severe" (one line), or None."""
        return status.severity(self, now)

    def status(self) -> dict:
        """The running mirror's status document (``mirror status --json``)."""
        return status.document(self)


def replication_targets(session: Session, st: dict[str, dict]) -> dict[str, dict[str, str]]:
    """{slave: {volume: replication URI}} of ``session`` from its secondaries'
    statuses ``st``."""
    out: dict[str, dict[str, str]] = {}
    for s, v, r, rv in session.pairs():
        vols = st[r]["volumes"]
        if rv not in vols:
            raise MirrorError(f"secondary {r} does not serve {rv!r} (it serves:"
                              f" {', '.join(vols) or 'none'}); fix the session file"
                              f" or restart it")
        out.setdefault(s, {})[v] = replication_uri(session.secondary(r), vols[rv]["export"])
    return out


__all__ = ["GroupResult", "LIFT_AFTER", "Mirror", "replication_targets"]
