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

Prepare or commit failures.  The recovery rule (``recover``) can always
finish the job, so every harden failure simply marks the mirror "needs
recovery" and the next group starts with it:

* any secondary committed n -> commit n on every one prepared n (forward);
* else, if some prepared n: prepare n on the others and commit n on all
  (forward too).  DESIGN.md says roll back here; forward is as sound,
  because prepare is only ever sent once every drain of n has finished
  (each primary cleared its bits only after its secondary flushed them),
  so every secondary holds all of n.  Rolling back would resend every
  block of the group; before main's 0bffd00 it also broke the primaries'
  baseline proof (samples read after the drain, blocks rewritten by the
  rollback: the next copy was a full one -- tests/test_mirror.py's
  kill -9 after prepare found it).
* only if that is refused: every secondary prepared n is rolled back to the
  common hardened group; the blocks it restored land in its ``tgt`` map;
* then for each secondary volume with ``tgt`` blocks: ``mark`` them on the
  primary volume it mirrors (durable in ``cr``: resent by the next group),
  and only then ``clear_tgt`` them (a crash between the two resends a block
  twice, never loses one).

Crash points of the coordinator (kill -9): mid-establish -- the slave aborts
a cut whose connection went away; mid-drain -- the next start's preflight
aborts the leftover cut (unconfirmed bits back to ``cr``); mid-prepare or
mid-commit -- ``recover`` at the next start.  No case needs a full copy.

Rejected: rolling back a secondary after an abandoned drain (it would resend
every block the drain had confirmed, and a group under overload would never
form); committing when every secondary is prepared but none committed (safe
too, but DESIGN.md's rule is simpler to check: roll back).
"""

from __future__ import annotations

import math
import os
import socket
import sys
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

from wire import address as wire_address, failpoints, protocol
from wire.protocol import Kind

from .. import direction, group, output
from . import events, verify
from ..errors import (CgmirrorError, CopyFailed, EstablishAborted, ExitCode, LocalError,
                     SlaveError, describe)
from ..history import History
from ..link import SlaveLink
from ..lock import SessionLock
from ..session import Session, replication_uri

# Test-only crash points of the coordinator: wire/failpoints.py (mirror:*).
_hit = failpoints.hit


LIFT_AFTER = 5                  # drain-time failures in a row before the timer lifts
HOLD_WINDOW = 1000              # hold times kept for p50/p99
CONTROL_TIMEOUT_S = 5.0
VERIFY_TIMEOUT_S = 3600.0       # a verify waits for a hardened group, then reads it all


class MirrorError(CgmirrorError):
    """The mirror could not do what was asked (the message says why)."""


class MirrorNotRunning(CgmirrorError):
    """No ``cgmirror mirror run`` answers on the session's control socket."""

    exit_code = ExitCode.UNREACHABLE


class _DrainTimeout(Exception):
    pass


class _Stopping(Exception):
    pass


@dataclass
class GroupResult:
    """How one group ended; ``outcome`` is the history's word."""

    n: int
    outcome: str                # hardened, drain-timeout, aborted, failed
    error: str | None = None
    bytes: int = 0
    cut: float = 0.0            # unix time
    measures: dict = field(default_factory=dict)


def percentile(values, p: float) -> float | None:
    """The p-th percentile (nearest rank) of ``values``, None if empty."""
    v = sorted(values)
    if not v:
        return None
    return v[min(len(v) - 1, max(0, math.ceil(p / 100 * len(v)) - 1))]


def map_runs(runs, from_g: int, to_g: int, to_blocks: int) -> list[list[int]]:
    """Runs of blocks of ``from_g`` bytes as runs of blocks of ``to_g`` bytes
    covering the same bytes (a partial block counts whole), clipped to
    ``to_blocks``: a secondary's tgt runs on its primary volume."""
    out: list[list[int]] = []
    for start, count in runs:
        lo = start * from_g // to_g
        hi = min(to_blocks, -(-(start + count) * from_g // to_g))
        if hi <= lo:
            continue
        if out and out[-1][0] + out[-1][1] >= lo:
            out[-1][1] = max(out[-1][0] + out[-1][1], hi) - out[-1][0]
        else:
            out.append([lo, hi - lo])
    return out


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
        self.log = log or (lambda line: print(f"cgmirror mirror: {line}", file=sys.stderr,
                                              flush=True))
        self.serve_control = serve_control
        # from_spec: the spec knows a TCP control channel's TLS context.
        self.slaves = [SlaveLink.from_spec(s.spec()) for s in session.slaves]
        used = {r for _, _, r, _ in session.pairs()}
        self.secondaries = [SlaveLink.from_spec(r.spec()) for r in session.secondaries
                            if r.name in used]
        self.lock: SessionLock | None = None
        self.history: History | None = None
        self._server: _ControlServer | None = None
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
            if self.serve_control:
                self._server = _ControlServer(self.settings.control, self)
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
        hardened (coordinator/verify.py says why it must have); running,
        the next hardened group serves them; paused, they are refused."""
        if not self.verifies.pending():
            return
        if self.last is not None and self.last.outcome == "hardened" \
                and not self.need_recovery:
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
        if self.metrics:
            self.metrics.close()
            self.metrics = None
        if self.peers:
            self.peers.close()
            self.peers = None
        if self._server:
            self._server.close()
            self._server = None
        for lk in self.slaves + self.secondaries:
            lk.close()
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
        """No new group after the current one, until ``resume``."""
        with self._resume:
            self.paused = True
        self.events.emit("pause")

    def resume(self) -> None:
        with self._resume:
            self.paused = False
            self._resume.notify_all()
        self.events.emit("resume")

    def run(self) -> None:
        """Form groups until ``stop()``; a failed group is logged and counted,
        and the next one is tried after the interval (at least 1 s after a
        failure that formed nothing, so a dead peer is not hammered)."""
        self.state = "running"
        while not self._stop.is_set():
            with self._resume:
                while self.paused and not self._stop.is_set() \
                        and not self.verifies.pending():
                    self.state = "paused"
                    self._resume.wait()
            self._serve_verifies()
            if self._stop.is_set():
                break
            if self.paused:
                continue
            self.state = "running"
            try:
                result = self.run_once()
                quiet = result.outcome == "hardened" or result.outcome == "drain-timeout"
            except CgmirrorError as exc:
                self.failed += 1
                self.log(f"cannot form a group: {exc}")
                self.events.emit("group-failed", n=None, outcome="failed", error=str(exc))
                quiet = False
            wait = self.settings.interval_ms / 1000
            self._stop.wait(wait if quiet else max(wait, 1.0))
        self.verifies.refuse(MirrorError("the mirror stopped before verify ran"))
        self.log("stopped")

    # ------------------------------------------------------------ recovery

    def secondary_statuses(self) -> dict[str, dict]:
        """{name: status} of every secondary; raises if one does not answer
        or is not a secondary."""
        replies = group.statuses(self.secondaries)
        for name, r in replies.items():
            if isinstance(r, Exception):
                raise r
            if r.get("role") != "secondary":
                raise MirrorError(f"{name} at {self.session.secondary(name).control} is"
                                  f" not a secondary (role {r.get('role', 'primary')})")
        return replies

    def recover(self) -> int:
        """Bring every secondary to one hardened group and hand the blocks a
        rollback restored back to the primaries (see the module doc); return
        that group's number."""
        self.phase = "recover"
        st = self.settle()
        self.return_tgt(st)
        top = max(r["hardened"] for r in st.values())
        self.hardened = top
        self.hardened_cut = self.history.group_cut_time(top) if top else None
        self.need_recovery = False
        self.phase = "idle"
        return top

    def settle(self, unfinished: bool = False) -> dict[str, dict]:
        """Bring every secondary to one hardened group by the module doc's
        recovery rule and return their statuses after; the blocks a rollback
        restored stay in their ``tgt`` maps (``return_tgt`` hands them on).
        ``unfinished`` (failover, whose primaries are gone) also rolls back
        the undo blocks of a drain that never reached prepare: the mirror
        keeps them, since its next group continues on top of them."""
        st = self.secondary_statuses()
        top = max(r["hardened"] for r in st.values())
        if any(r["hardened"] < top for r in st.values()):
            for name, r in st.items():
                if r["hardened"] == top:
                    continue
                if r["prepared"] != top:
                    raise MirrorError(
                        f"secondary {name} is at group {r['hardened']} (prepared"
                        f" {r['prepared']}), others committed {top}: it cannot roll"
                        f" forward; was it replaced? restore its state directory")
                self._link(name).call("commit", n=top)
                self.log(f"recovery: {name} rolled forward to group {top}")
            st = self.secondary_statuses()
        pending = {r["prepared"] for r in st.values() if r["prepared"] is not None}
        # One prepared group (the normal case) rolls forward; anything else
        # (refused, or two numbers: never made by this coordinator) rolls back.
        if pending and not (len(pending) == 1 and self._roll_forward(st, pending.pop())):
            self._roll_back(st)
        st = self.secondary_statuses()
        if unfinished and any(r["prepared"] is not None
                              or any(v["undo_blocks"] for v in r["volumes"].values())
                              for r in st.values()):
            self._roll_back(st, unfinished=True)
            st = self.secondary_statuses()
        return st

    def _roll_forward(self, st: dict[str, dict], n: int) -> bool:
        """Some secondary prepared n, none committed it: prepare n on the
        others and commit it on all.  Sound because prepare is only ever sent
        once every drain of n finished (the primaries cleared their bits
        after each secondary flushed), so every secondary holds all of n.
        False (and a log line) if a secondary refuses."""
        try:
            for name, r in st.items():
                if r["prepared"] != n:
                    self._link(name).call("prepare", n=n)
            for name in st:
                self._link(name).call("commit", n=n)
        except SlaveError as exc:
            self.log(f"recovery: cannot roll group {n} forward ({exc}); rolling back")
            return False
        self.log(f"recovery: group {n} was prepared; rolled forward on every secondary")
        return True

    def _roll_back(self, st: dict[str, dict], unfinished: bool = False) -> None:
        """Every secondary that prepared a group (``unfinished``: or holds
        undo blocks of a drain) goes back to the common hardened group; the
        blocks it restored land in its tgt map (resent by ``return_tgt``)."""
        for name, r in st.items():
            undo = any(v["undo_blocks"] for v in r["volumes"].values())
            if r["prepared"] is None and not (unfinished and undo):
                continue
            back = self._link(name).call("rollback")
            blocks = sum(back["rolled_back"].values())
            what = (f"group {r['prepared']}" if r["prepared"] is not None
                    else "an unfinished drain")
            self.log(f"recovery: {name} rolled back {what} to {back['hardened']}"
                     f" ({blocks} blocks into its tgt map)")

    def _link(self, name: str) -> SlaveLink:
        return next(lk for lk in self.slaves + self.secondaries if lk.name == name)

    def return_tgt(self, st: dict[str, dict]) -> None:
        """Mark every secondary volume's tgt blocks on its primary, then clear
        them on the secondary (that order: a crash between resends, never loses)."""
        by_remote = {(r, rv): (s, v) for s, v, r, rv in self.session.pairs()}
        prim: dict[str, dict] = {}
        for r, rst in st.items():
            for rv, vs in rst["volumes"].items():
                if not vs["tgt_blocks"]:
                    continue
                if (r, rv) not in by_remote:
                    self.log(f"warning: {r}/{rv} has {vs['tgt_blocks']} target-side"
                             f" blocks but mirrors no volume of this session")
                    continue
                s, v = by_remote[(r, rv)]
                if s not in prim:
                    prim[s] = self._link(s).status()
                pv = prim[s]["volumes"][v]
                pg, nblocks = pv["granularity"], -(-pv["size"] // pv["granularity"])
                rlink, plink = self._link(r), self._link(s)
                start, total = 0, 0
                while start is not None:
                    page = rlink.call("tgt", volume=rv, start=start)
                    runs = page["runs"]
                    if runs:
                        plink.call("mark", volume=v,
                                   runs=map_runs(runs, page["granularity"], pg, nblocks))
                        rlink.call("clear_tgt", volume=rv, runs=runs)
                        total += sum(c for _, c in runs)
                    start = page["next"]
                self.log(f"recovery: {total} target-side blocks of {r}/{rv} marked for"
                         f" resend on {s}/{v}")

    # ------------------------------------------------------------ one group

    def targets(self, st: dict[str, dict]) -> dict[str, dict[str, str]]:
        """{slave: {volume: replication URI}} from the secondaries' statuses."""
        out: dict[str, dict[str, str]] = {}
        for s, v, r, rv in self.session.pairs():
            vols = st[r]["volumes"]
            if rv not in vols:
                raise MirrorError(f"secondary {r} does not serve {rv!r} (it serves:"
                                  f" {', '.join(vols) or 'none'}); fix the session file"
                                  f" or restart it")
            out.setdefault(s, {})[v] = replication_uri(self.session.secondary(r),
                                                       vols[rv]["export"])
        return out

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
        direction.check_mirror(self.session)    # not after a failover, nor reversed
        if self.need_recovery:
            self.recover()
        replies = group.preflight(self.slaves, abort_leftover=True, warn=self.log)
        st = self.secondary_statuses()
        targets = self.targets(st)
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
        self.phase = "establish"
        try:
            est = group.establish(self.slaves, n, s.lease_ms, s.max_coordination_ms,
                                  full={k: v for k, v in full.items() if v})
        except EstablishAborted as exc:
            res.outcome, res.error = "aborted", str(exc)
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

        def watch(progress: dict) -> None:
            nonlocal sent_rate
            _hit("mirror:mid-drain")
            sent_rate = self._pass_rate(sent_rate)
            done = sum(p.get("state") == "done" for vols in progress["slaves"].values()
                       for p in vols.values())
            if done == volumes:
                return          # the last poll: the drain is over, nothing to abandon
            if self._stop.is_set():
                raise _Stopping()
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
            return
        except _Stopping:
            res.outcome, res.error = "aborted", "stopped during the drain"
            return
        except CopyFailed as exc:
            m["drain_ms"] = group.fanout.ms(time.monotonic() - t0)
            res.outcome, res.error = "failed", str(exc)
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
        t1 = time.monotonic()

        def commit(lk: SlaveLink) -> dict:
            reply = lk.call("commit", n=n)
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
        return bool(bad)

    def _record(self, res: GroupResult, lifted: bool, first_copy: bool) -> None:
        now = time.time()
        if res.outcome == "hardened":
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
        self._announce(res)
        self.history.finish_group(res.n, res.outcome, res.error,
                                  now if res.outcome == "hardened" else None,
                                  bytes=res.bytes, **res.measures)
        m = res.measures
        extra = (" (drain timer lifted after"
                 f" {LIFT_AFTER} drain-time failures)") if lifted else (
                 " (first full copy: no drain timer)" if first_copy else "")
        if res.outcome == "hardened":
            self.log(f"group {res.n} hardened{extra}: {res.bytes} bytes, hold"
                     f" {m.get('hold_ms', 0):.1f} ms, drain {m.get('drain_ms', 0):.0f} ms,"
                     f" prepare {m.get('prepare_ms', 0):.0f} ms, commit"
                     f" {m.get('commit_ms', 0):.0f} ms")
        else:
            self.log(f"group {res.n} {res.outcome}{extra}: {res.error}")

    # ------------------------------------------------------------ status

    def rpo(self, now: float | None = None) -> float | None:
        """Age of the last hardened group (its cut time to now), seconds."""
        now = time.time() if now is None else now
        if self.hardened_cut is None:
            return None
        return max(0.0, now - self.hardened_cut)

    def severity(self, now: float | None = None) -> str | None:
        """Why the session is "severe" (one line), or None."""
        now = time.time() if now is None else now
        limit = self.settings.rpo_threshold_s
        rpo = self.rpo(now)
        if rpo is not None and rpo > limit:
            return (f"the last hardened group {self.hardened} is {rpo:.1f} s old, past"
                    f" rpo_threshold_s {limit:g}")
        if rpo is None and now - self.started > limit:
            return (f"no group hardened in the {now - self.started:.0f} s since the"
                    f" mirror started (rpo_threshold_s {limit:g})")
        return None

    def status(self) -> dict:
        """The running mirror's status document (``mirror status --json``)."""
        now = time.time()
        why = self.severity(now)
        state = "severe" if why and self.state in ("running", "paused") else self.state
        holds = list(self.holds)
        vols: dict[str, dict] = {}
        replies = group.statuses(self.slaves)
        for s_ in self.session.slaves:
            r = replies.get(s_.name)
            for v in s_.volumes:
                d = {"secondary": f"{v.secondary}/{v.remote_volume}", "phase": self.phase,
                     "dirty_bytes": None, "behind_bytes": None, "error": None}
                if isinstance(r, Exception):
                    d["error"] = str(r)
                elif v.name in r["volumes"]:
                    vs = r["volumes"][v.name]
                    g = vs["granularity"]
                    d["dirty_bytes"] = vs.get("cr_blocks", 0) * g
                    d["behind_bytes"] = vs.get("dirty_blocks", 0) * g
                vols.setdefault(s_.name, {})[v.name] = d
        last = self.last
        return {"ok": True, "session": self.session.name, "pid": os.getpid(),
                "state": state, "why": why, "paused": self.paused, "phase": self.phase,
                "hardened": self.hardened or None, "rpo_s": _round(self.rpo(now)),
                "rpo_threshold_s": self.settings.rpo_threshold_s,
                "groups_formed": self.formed, "groups_failed": self.failed,
                "drain_failures_in_a_row": self.consecutive_drain_failures,
                "timer_lifted": self.timer_lifted,
                "hold_ms": {"last": holds[-1] if holds else None,
                            "p50": percentile(holds, 50), "p99": percentile(holds, 99)},
                "drain_mb_s": (round(self.drain_bytes / 1e6 / self.drain_seconds, 1)
                               if self.drain_seconds > 0 else None),
                "drain_bytes_s": (round(self.drain_bytes / self.drain_seconds)
                                  if self.drain_seconds > 0 else None),
                "rate_bytes_s": self.rate or None,
                "last_group": None if last is None else {
                    "n": last.n, "outcome": last.outcome, "error": last.error,
                    "bytes": last.bytes},
                "volumes": vols}


def _round(v: float | None) -> float | None:
    return None if v is None else round(v, 3)


# ------------------------------------------------------------ control channel
#
# The running mirror answers ``cgmirror mirror pause|resume|status`` on a
# unix socket (0600, in the session's state directory unless [mirror]
# control says otherwise) with the slaves' line codec (wire.protocol's
# Framer, encode, parse) and its own small schema.

MIRROR_OPS = {"status": protocol.Obj({}, {}), "pause": protocol.Obj({}, {}),
              "resume": protocol.Obj({}, {}),
              "rate": protocol.Obj({"rate": protocol.Int(0, protocol.MAX_RATE)}, {}),
              "verify": protocol.Obj({}, {"repair": protocol.Bool()}),
              # keeps the connection: events, one a line (coordinator/events.py)
              "subscribe": protocol.Obj({}, {})}


def handle(mirror: Mirror, line: bytes) -> dict:
    """One request line to one reply (never raises)."""
    try:
        msg = protocol.parse(line)
        op = msg.pop("op", None)
        if op not in MIRROR_OPS:
            raise protocol.ProtocolError(f"unknown op {str(op)[:80]!r} (known:"
                                         f" {', '.join(MIRROR_OPS)})")
        MIRROR_OPS[op].check(msg, "")
        if op == "pause":
            mirror.pause()
            mirror.log("paused by the operator: no new group until resume")
        elif op == "resume":
            mirror.resume()
            mirror.log("resumed by the operator")
        elif op == "rate":
            mirror.set_rate(msg["rate"])
        elif op == "verify":
            return mirror.verifies.ask(msg.get("repair", False), VERIFY_TIMEOUT_S)
        return mirror.status()
    except protocol.ProtocolError as exc:
        return protocol.error(str(exc), exc.kind)
    except CgmirrorError as exc:
        return protocol.error(str(exc), Kind.LOCAL)
    except Exception as exc:    # reported to the client; the mirror keeps running
        return protocol.error(f"mirror failed: {describe(exc)}", Kind.LOCAL)


class _ControlServer:
    """Accepts connections on a unix socket; one thread per connection."""

    def __init__(self, path: str, mirror: Mirror):
        self.path, self.mirror = path, mirror
        self.sock: socket.socket | None = None
        self._threads: list[threading.Thread] = []

    def start(self) -> None:
        # We hold the session lock: a socket file left here is a dead mirror's.
        try:
            os.unlink(self.path)
        except FileNotFoundError:
            pass
        except OSError as exc:
            raise LocalError(f"cannot remove {self.path}: {exc.strerror or exc}") from exc
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # 0600 from the start: umask applies at bind (chmod after would leave
        # a window); we are still single-threaded here.
        old = os.umask(0o177)
        try:
            os.makedirs(os.path.dirname(self.path), exist_ok=True)
            s.bind(self.path)
        except OSError as exc:
            s.close()
            raise LocalError(f"cannot listen on {self.path}: {exc.strerror or exc}") \
                from exc
        finally:
            os.umask(old)
        s.listen(16)
        self.sock = s
        t = threading.Thread(target=self._accept, name="mirror-control", daemon=True)
        t.start()
        self._threads.append(t)

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return                  # closed
            # Only our own user (or root) may pause the mirror.
            if _peer_uid(conn) not in (0, os.getuid()):
                conn.close()
                continue
            threading.Thread(target=self._serve, args=(conn,), daemon=True,
                             name="mirror-control-conn").start()

    def _serve(self, conn: socket.socket) -> None:
        framer = protocol.Framer()
        conn.settimeout(60)
        with conn:
            while True:
                try:
                    data = conn.recv(1 << 16)
                    if not data:
                        return
                    for line in framer.feed(data):
                        if _is_subscribe(line):
                            conn.settimeout(None)
                            self.mirror.events.stream(conn, lambda: self.sock is None)
                            return
                        conn.sendall(protocol.encode(handle(self.mirror, line)))
                except (OSError, protocol.ProtocolError):
                    return

    def close(self) -> None:
        if self.sock:
            self.sock.close()
            self.sock = None
            try:
                os.unlink(self.path)
            except OSError:
                pass


def _is_subscribe(line: bytes) -> bool:
    """A ``subscribe`` request: the connection becomes an event stream."""
    try:
        return protocol.parse(line) == {"op": "subscribe"}
    except protocol.ProtocolError:
        return False


def _peer_uid(conn: socket.socket) -> int:
    return wire_address.peer_credentials(conn)[1]


def connect(path: str, timeout: float) -> socket.socket:
    """A connection to the running mirror's control socket ``path``; raise
    MirrorNotRunning (one line saying what to do) if none answers."""
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(timeout)
    try:
        s.connect(path)
    except OSError as exc:
        s.close()
        raise MirrorNotRunning(f"no mirror is running (nothing answers on {path}:"
                               f" {exc.strerror or exc}); start one with"
                               f" `cgmirror mirror run`") from exc
    return s


def call(path: str, op: str, timeout: float = CONTROL_TIMEOUT_S + 10, **args) -> dict:
    """One request to a running mirror; raise MirrorNotRunning if none answers."""
    s = connect(path, timeout)
    try:
        framer, lines = protocol.Framer(), []
        try:
            s.sendall(protocol.encode({"op": op, **args}))
            while not lines:
                data = s.recv(1 << 16)
                if not data:
                    raise MirrorNotRunning(f"the mirror on {path} closed the connection")
                lines = framer.feed(data)
            reply = protocol.parse(lines[0])
        except (OSError, protocol.ProtocolError) as exc:
            raise MirrorError(f"the mirror on {path} did not answer: {exc}") from exc
    finally:
        s.close()
    if not reply.get("ok"):
        raise MirrorError(f"the mirror refused {op}: {reply.get('error')}")
    return reply


__all__ = ["GroupResult", "LIFT_AFTER", "Mirror", "MirrorError", "MirrorNotRunning", "connect",
           "call", "handle", "map_runs", "percentile"]
