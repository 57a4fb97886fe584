"""Failover, failback, resync and switchover (DESIGN.md "Failover, failback,
resync"): the Python API behind ``cgmirror failover|failback|resync|
switchover`` (coordinator/failover_cmds.py); tests drive ``RoleSwitch``.

Design
======

A role switch is an op the node serves itself (``role``, over its
authenticated control channel): it checkpoints its maps, records the new
role in its state directory, answers, and exits with
``protocol.RESTART_STATUS``; its service manager (the unit
``cgmirror-node@NAME``, or the foreground ``cgmirror node run NAME``)
starts it again in the recorded role on the same volumes and state
directory, and ``become`` waits (bounded) until it answers in it.  No
command needs a process, a file or a shell on the node's host.
Both roles keep the same three change maps per volume (``cr``, ``oos``,
``tgt``), and each role folds the maps at start (nbdplugin/secondary.py
``fold_maps``):

- promoted (now primary): ``tgt`` -> ``cr``.  Its host writes from then on
  go through the primary's write path, so they are in ``cr`` with the
  write-intent guarantee (invariant C1: no under-marking after kill -9).
- demoted (now secondary): ``cr | oos`` -> ``tgt``.  Its own writes that
  never reached the other site become target indicators.

So the target indicators T of a node are exactly what it would send as a
primary, and a resync from X to Y sends the union S | T of X's ``cr | oos``
and Y's ``tgt`` by the ordinary machinery: the mirror's recovery
returns Y's ``tgt`` into X's ``cr`` (``mark``, then ``clear_tgt``: a crash
between resends, never loses), and one ordinary group (cut, drain to Y's
replication export, prepare, commit) hardens it.  Y's undo store keeps
Y at its last consistent image until that commit; a kill -9 of either side
or a cut link mid-drain leaves Y's undo store covering what was written,
and the next run continues on top of it: X cleared the bits Y confirmed,
so they are not sent again (X's own kill -9 resends at most what was
confirmed since its last checkpoint: its map on disk still has them).

Baseline.  A resync gives X a baseline on Y without a copy (``adopt``,
coordinator/roles/resync.py says why that is sound).

After a failover either site may win: ``resync --from a --to b`` demotes
the failover site instead and sends the old primary's data over its writes
(which ``--keep-overwritten`` can keep).

Failover settles the surviving site first with the mirror's recovery rule
(a group any node committed or prepared rolls forward: prepare is sent only
once every drain of the group finished; then every node with undo blocks
of a drain that never finished rolls back: the blocks it restored land in
its ``tgt``), so all stand at one hardened group h, recorded in
the direction record on the nodes (coordinator/direction.py) before any node switches:
the command run again after a crash resumes.  Failover needs no call to
the old primary's site (its nodes take the record if they answer, and a
healthy one stays a primary: its role is its own record).

Lineage.  ``resync``, ``failback`` and ``switchover`` compare every pair's
lineage before they change anything (``check_join``, coordinator/mirror/
joins.py), and every group they form does again (``Mirror.run_once``).
Only ``resync --from X --to Y`` names a winner: over a split it proceeds,
logs each split pair's two generations and how many blocks of Y it
overwrites, and ``--keep-overwritten`` keeps them.  ``failback`` never
does: an old primary that holds writes the other site never got (split
brain) refuses it in one line naming both resyncs.

A running mirror (its control socket answers) is parked first, by
``failover`` and ``failover --test`` alike: paused, and waited for (at
most MIRROR_IDLE_TIMEOUT_S) until its group in flight hardened or was
abandoned and it waits paused.  Settling while its drain still wrote into
the site being promoted left that site half promoted with "holds group N
in flight" (issue 16 item 6).  A mirror whose group does not end in time
makes the command refuse before it changed anything.  ``failback``,
``resync`` and ``switchover`` form groups themselves and so refuse (BUSY)
beside a running mirror, before any change (cluster mode: below); coordinator/lock.py has the
rule for every command.  Waiting for the mirror rather than refusing is
for ``failover`` only: its site may be lost, and the operator must not
have to find the mirror's host first.

Cluster mode (``[cluster]``).  ``mirror run`` units run on every
coordinator host (one leads), so "a mirror runs here" says nothing about
who forms groups, and the session lock guards one host only.  Every role
command first takes the etcd role lock (``cluster.RoleLock``: ``P/role``
under a lease, renewed while it runs; a second command anywhere is refused
BUSY in one line naming the holder's host, pid and command).  ``failover``
then parks the leader as above.  ``failback``, ``resync`` and
``switchover`` park it too (``_park_leader``: the flag set, then wait,
bounded, until the leader's published status says it acted on that flag
and is paused and idle, or no leader), and form their groups beside any
local ``mirror run`` (``lock.standing_in``: the parked leader plus the
role lock are the guard).  A leader that takes over meanwhile reads the
flag before its first group and stays paused (a flag it cannot read at
that moment counts as set).  A command that ends with the sites joined
(state mirroring) clears the flag -- unless an operator's ``mirror
pause`` set it before -- with a line and a ``resume`` event, and the
leader goes on in the recorded direction (it follows a new source by
itself: coordinator/mirror/cycle.py ``_follow``).  A command that fails
leaves the flag set (nothing forms groups over a half-done role change)
and its line says ``cgmirror mirror resume`` once fixed.  A rerun that
finds its command done clears a flag the killed run left.

Reruns.  Every direction record says which command wrote it
(``by``; a failback also ``back_to``), so a rerun tells "half done" from
"done": half done, it goes on from the recorded step (a failback killed in
its switchover finishes the swap); done, it says "... nothing to do" and
changes nothing (``switchover`` run twice does not swap back; ``--to``
names the site wanted; ``resync --full`` copies again: that is asked for).  Test-only crash points (wire/failpoints.py):
``role:failover-recorded``, ``role:failover-first-promoted``,
``role:end-test-first-demoted``, ``role:failback-resynced``,
``role:switching``, ``role:switching-first-demoted``,
``role:switching-promoted``, ``role:parked`` (cluster mode: the leader
parked, the etcd role lock held).

DR test: ``failover --test`` parks a running mirror (above) so that the
primary keeps recording in ``cr`` and nothing is drained, then promotes
the secondaries as above.  ``--end-test`` demotes them again (their
test writes fold into ``tgt``), returns ``tgt`` to the primaries, and
resumes the mirror: its next group overwrites every test block with the
primary's data, so the secondary equals the primary's hardened group.

Switchover: fence the primaries (``fence``: host writes refused, those in
flight finished), form groups until one hardens with nothing left dirty,
record "switching", demote the primaries (``assume h``: the whole image is
group h), promote the secondaries, adopt baselines, record the new source.

``--keep-overwritten DIR``: coordinator/roles/resync.py.

Write leases (``[cluster] fence = "lease"``, nbdplugin/writelease.py): a
primary takes host writes only while its site holds a lease in etcd, and
only the site named by ``P/writer`` can take one.  Every command that makes
a site the source (``failover``, ``resync``, ``failback``, ``switchover``)
first makes it the writer (``take_writer``): put ``P/writer``, then wait
until no lease key of the other site is left (at most ``lease_ttl_s`` +
WRITER_GRACE_S: a key lives until its holder's last renewal plus the ttl,
and no renewal passes the writer guard once the writer moved), and only
then promotes.  So no moment has both sites taking writes, whether the old
site is gone, cut off (its lease lapses) or alive (it sees the writer move
at its next round and lets its lease go).  A key still there after the
bound is refused in one line before any node changed, and ``P/writer`` is
put back.  ``failover --test`` takes no writer: a DR test's primaries keep
no lease (their writes are thrown away at its end).

Rejected alternatives:

- Switching the role inside the running process (an op turning a
  ``Secondary`` into a ``Slave``): host connections would survive, but two
  object graphs, the gate and the undo store would have to hand over under
  live I/O; a restart reuses the start-up recovery that is tested already.
- Recording target writes in the ``tgt`` map directly, on the secondary's
  host export: an extra map is durable only at a checkpoint (the intent
  path protects ``cr`` only), so a kill -9 could lose target writes.
- A resync that compares checksums of both sides (reads everything; the
  benchmark's ``ratio_vs_delta`` is its measure).
- A fresh full copy after every failover (what ``--full`` does on request).
"""

from __future__ import annotations

import contextlib
import dataclasses
import sys
import time
from typing import Callable

from wire import failpoints
from wire import protocol
from wire.protocol import Kind

from .. import direction as dirn
from ..errors import (BusyError, CgmirrorError, DirectionError, FailoverError,
                      MirrorError, MirrorNotRunning)
from ..link import SlaveLink
from ..lock import ROLE_LOCK, SessionLock, mirror_runs, standing_in
from .. import cluster
from ..mirror import Links, Mirror, call as mirror_call, joins, recovery
from ..session import NodeConfig, Session
from . import resync

# Test-only crash points (wire/failpoints.py): role:*, listed in the module doc.
_hit = failpoints.hit

MIRROR_IDLE_TIMEOUT_S = 120.0
# A node's restart into its new role (checkpoint, exit, its supervisor starts
# it, start-up recovery): seconds on a loaded machine.
ROLE_RESTART_TIMEOUT_S = 120.0
GROUP_TRIES = 5
# take_writer waits for the old site's lease keys at most lease_ttl_s plus
# this: etcd removes an expired lease's keys within about half a second.
WRITER_GRACE_S = 2.0


@dataclasses.dataclass(frozen=True)
class Node:
    """One nbdkit process of a site, whichever role it runs."""

    site: str
    cfg: NodeConfig         # as the session file has it (site a: [[slave]], b: [[secondary]])

    @property
    def name(self) -> str:
        return self.cfg.name


class RoleSwitch:
    """The role-switch commands of one session (the file's, not oriented)."""

    def __init__(self, session: Session, log: Callable[[str], None] | None = None):
        if session.mirror is None or not session.pairs():
            raise FailoverError(f"session {session.name} mirrors no volume: nothing to"
                                f" fail over")
        self.session = session
        self.log = log or (lambda line: print(f"cgmirror: {line}", file=sys.stderr,
                                              flush=True))

    # ------------------------------------------------------------ nodes

    def nodes(self, site: str) -> list[Node]:
        return [Node(site, c) for c in dirn.nodes(self.session, site)]

    def status(self, node: Node, timeout: float = 10) -> dict | None:
        """The node's status, None if it does not answer."""
        try:
            with SlaveLink.from_spec(node.cfg.spec(), timeout=timeout) as lk:
                return lk.status()
        except CgmirrorError as exc:
            if getattr(exc, "kind", None) == Kind.SESSION:
                raise                   # it answers, for another session
            return None

    def call(self, node: Node, op: str, **args) -> dict:
        with SlaveLink.from_spec(node.cfg.spec(), timeout=60) as lk:
            return lk.call(op, **args)

    def become(self, node: Node, role: str) -> dict:
        """Switch ``node`` to ``role`` through its own ``role`` op unless it
        runs so already; its status in the new role.  The node records the
        role, answers, and exits with RESTART_STATUS; its service manager
        (``cgmirror-node@NAME``, or ``cgmirror node run NAME``) starts it
        again in the recorded role, which this waits for (at most
        ROLE_RESTART_TIMEOUT_S).  No process, file or shell of the node's
        host is touched from here."""
        st = self.status(node)
        if st is not None and "role_seq" not in st:
            raise FailoverError(f"node {node.name} predates the role op: upgrade it")
        if st is None:
            noun = "secondary" if node.site == "b" else "slave"
            raise FailoverError(
                f"{node.name} (site {node.site}) does not answer on {node.cfg.control}:"
                f" start it on its host under its supervisor (`cgmirror {noun} start"
                f" {node.name}`, or its unit cgmirror-node@{node.name}) and run the"
                f" command again (it resumes)")
        if st.get("role", "primary") == role:
            return st
        if role == "primary":
            undo = {v: s["undo_blocks"] for v, s in st["volumes"].items() if s["undo_blocks"]}
            if st["prepared"] is not None or undo:
                raise FailoverError(f"{node.name} holds group {st['prepared']} in flight"
                                    f" ({undo}), drained after the failover settled"
                                    f" it: run `cgmirror failover` again (it settles"
                                    f" what is not promoted yet)")
        try:
            reply = self.call(node, "role", to=role)
        except CgmirrorError as exc:
            raise FailoverError(f"{node.name} did not switch to {role}: {exc}; run the"
                                f" command again once that is settled (it resumes)") from exc
        if reply.get("restarting"):
            st = self.await_role(node, role, reply.get("role_seq"))
        else:
            st = self.status(node) or {}
        if st.get("role", "primary") != role:
            raise FailoverError(f"{node.name} answers as a {st.get('role')} after its"
                                f" switch to {role}: run the command again")
        self.log(f"{node.name} (site {node.site}) now runs as a {role}")
        return st

    def await_role(self, node: Node, role: str, seq: int | None) -> dict:
        """Poll ``node`` until it answers in ``role`` (its ``role_seq`` at
        least ``seq``); bounded by ROLE_RESTART_TIMEOUT_S."""
        deadline = time.monotonic() + ROLE_RESTART_TIMEOUT_S
        while True:
            st = self.status(node, timeout=2)
            if st is not None and st.get("role", "primary") == role \
                    and (seq is None or st.get("role_seq", seq) >= seq):
                return st
            if time.monotonic() > deadline:
                raise FailoverError(
                    f"{node.name} (site {node.site}) recorded the role {role}"
                    f" (role_seq {seq}) but has not answered on {node.cfg.control} in it"
                    f" within {ROLE_RESTART_TIMEOUT_S:g} s: its supervisor starts it again"
                    f" on exit {protocol.RESTART_STATUS} (`systemctl status cgmirror-node@{node.name}`,"
                    f" or the `cgmirror node run {node.name}` that runs it, on its host);"
                    f" run the command again once it answers (it resumes)")
            time.sleep(0.1)

    def settle(self, site: str) -> int:
        """Bring every secondary of ``site`` to one hardened group and return
        it: the mirror's recovery rule (``recovery.settle``: a committed group
        rolls forward, so does a group some secondary prepared, since prepare
        follows every drain), then whatever is still in flight (a drain that
        never finished) rolls back into ``tgt``.  Only ``site`` is called:
        the other site may be gone."""
        for node in self.nodes(site):
            st = self.status(node)
            if st is None:
                noun = "secondary" if site == "b" else "slave"
                raise FailoverError(f"{node.name} (site {site}) does not answer on"
                                    f" {node.cfg.control}: start it on its host (`cgmirror"
                                    f" {noun} start`, or its unit cgmirror-node@{node.name})"
                                    f" and run the command again")
            if st.get("role") != "secondary":
                role = st.get("role", "primary")
                raise FailoverError(f"{node.name} (site {site}) is a {role}, not a"
                                    f" secondary")
        with Links.of(dirn.oriented(self.session, dirn.other(site))) as links:
            # unfinished: no primary will ever finish a drain in flight.
            st = recovery.settle(links, self.log, unfinished=True)
        top = max(r["hardened"] for r in st.values())
        if top == 0:
            raise FailoverError(f"site {site} holds no hardened group yet (the first"
                                f" copy never completed): nothing consistent to take over")
        return top

    # ------------------------------------------------------------ write leases

    def take_writer(self, new: str, command: str) -> None:
        """Lease mode: make ``new`` the writer and wait until the other
        site holds no write lease (module doc, "Write leases"); refuse in
        one line, the writer put back, if it still does after the bound.
        Nothing without ``[cluster] fence = "lease"``."""
        c = getattr(self.session, "cluster", None)
        if c is None or c.fence != "lease":
            return
        from nbdplugin import writelease as wl
        from wire.etcd import Etcd, EtcdError
        from wire.tls import TLSConfigError

        old = dirn.other(new)
        try:
            etcd = Etcd.for_cluster(c, c.coordinator_tls)
        except (ValueError, OSError, TLSConfigError) as exc:
            raise FailoverError(f"cannot set up the etcd client for the write leases: {exc}") from exc
        try:
            t0 = self._take_writer(etcd, wl, new, old, command, c.lease_ttl_s)
        except EtcdError as exc:
            raise FailoverError(f"cannot make site {new} the writer in etcd: {exc}; nothing"
                                f" was promoted; `cgmirror {command}` again once etcd"
                                f" answers") from exc
        finally:
            etcd.close()
        if time.monotonic() - t0 > 0.2:
            self.log(f"site {old} holds no write lease after {time.monotonic() - t0:.1f} s:"
                     f" site {new} may take writes")

    def _take_writer(self, etcd, wl, new: str, old: str, command: str, ttl: int) -> float:
        """take_writer's steps; the monotonic time the wait began."""
        name = self.session.name
        wkey = wl.writer_key(etcd, name)
        prev = etcd.get(wkey)
        rev = None
        if prev is None or wl.parse_writer(prev.value) != new:
            rev = etcd.put(wkey, wl.writer_value(new))
            self.log(f"site {new} is the writer now ({wkey}): site {old}'s primaries"
                     f" refuse host writes from their next lease round")
        prefix = wl.leases_prefix(etcd, name, old)
        bound = ttl + WRITER_GRACE_S
        t0 = time.monotonic()
        held = etcd.get_prefix(prefix)
        if held:
            self.log(f"waiting (at most {bound:g} s) for the write leases of site"
                     f" {old} to end: {', '.join(k.key.rsplit('/', 1)[-1] for k in held)}")
        while held:
            if time.monotonic() - t0 > bound:
                back = ""
                if rev is not None and prev is not None \
                        and etcd.put_if(wkey, prev.value, rev):
                    back = f"; {wkey} is site {old} again"
                raise FailoverError(
                    f"site {old} still holds write leases ({', '.join(k.key for k in held)})"
                    f" {bound:g} s after site {new} became the writer: its primaries"
                    f" renew them still (a clock or an etcd far off?); nothing was"
                    f" promoted{back}; `cgmirror {command}` again once they are gone")
            time.sleep(0.1)
            held = etcd.get_prefix(prefix)
        return t0

    # ------------------------------------------------------------ the mirror

    def _running_mirror(self, op: str, **args) -> dict | None:
        try:
            return mirror_call(self.session.mirror.control, op, **args)
        except MirrorNotRunning:
            return None

    def announce(self, action: str, site: str, hardened: int) -> None:
        """The failover event (coordinator/mirror/events.py) to a running
        mirror's subscribers.  None running: nobody can be subscribed.  A
        mirror that refuses it gets a warning line: the role switch is done
        either way."""
        try:
            self._running_mirror("role", action=action, site=site, hardened=hardened)
        except MirrorError as exc:
            self.log(f"warning: the running mirror did not take the {action} event: {exc}")

    def park_mirror(self, command: str) -> bool:
        """Pause a running mirror and wait until its group is over (hardened
        or abandoned) and it waits paused; False if none runs.  If that
        takes longer than MIRROR_IDLE_TIMEOUT_S, raise before the command
        changed anything (the mirror stays paused).  Cluster mode: the
        leader, on whichever host, through etcd (``park_leader``)."""
        if self.session.cluster is not None:
            return park_leader(self.session, command, self.log)
        doc = self._running_mirror("pause")
        if doc is None:
            return False
        deadline = time.monotonic() + MIRROR_IDLE_TIMEOUT_S
        # "running" is the loop between two groups (the interval, a preflight
        # with the phase still idle); it says "paused" only once it waits.
        while not (doc["paused"] and doc["phase"] == "idle"
                   and doc.get("state") != "running"):
            if time.monotonic() > deadline:
                raise FailoverError(
                    f"the running mirror (pid {doc.get('pid', '?')}) did not end its"
                    f" group in flight within {MIRROR_IDLE_TIMEOUT_S:g} s (phase"
                    f" {doc['phase']}); nothing was changed and it stays paused: stop it"
                    f" (`systemctl stop cgmirror-mirror@{self.session.name}`) and run"
                    f" `cgmirror {command}` again")
            time.sleep(0.05)
            doc = self._running_mirror("status")
            if doc is None:
                return False                # it stopped: nothing in flight
        self.log(f"mirror parked after group {doc.get('hardened')}: the primaries keep"
                 f" recording, nothing is drained")
        return True

    def mirror(self, source: str) -> Mirror:
        """An opened mirror of ``source`` (takes the session lock)."""
        return Mirror(dirn.oriented(self.session, source), log=self.log,
                      serve_control=False).open()

    # ------------------------------------------------------------ locks

    @contextlib.contextmanager
    def _command(self, command: str, beside_mirror: bool = False):
        """The locks of one role command (coordinator/lock.py has the rule):
        ``role.lock`` always; then, if a mirror runs, nothing more for a
        command that may run beside it (``beside_mirror``: it yields the
        mirror's status) and BUSY for any other, before any change; if none
        runs, the session lock, lent to the Mirror the command forms its
        groups with.  Cluster mode: ``_cluster_command``."""
        s = self.session
        role = SessionLock(s.name, s.state_dir, ROLE_LOCK).acquire()
        try:
            if s.cluster is not None:
                with self._cluster_command(command, beside_mirror) as running:
                    yield running
                return
            running = self._running_mirror("status")
            if running is not None:
                if not beside_mirror:
                    raise mirror_runs(s.name, running.get("pid", "?"), command)
                yield running
                return
            with SessionLock(s.name, s.state_dir) as lk, lk.lend():
                yield None
        finally:
            role.release()

    @contextlib.contextmanager
    def _cluster_command(self, command: str, beside_mirror: bool):
        """Cluster mode's locks (module doc, "Cluster mode"): the etcd role
        lock (BUSY naming the holder); a command that forms groups parks
        the leader and forms them beside any local ``mirror run``; at the
        end, the sites joined, the pause flag is cleared."""
        s = self.session
        with cluster.client(s) as etcd:
            lock = _role_lock(etcd, s, command)
            try:
                running = self._running_mirror("status")    # for announce (events)
                prev = cluster.paused(etcd, s.name)
                if beside_mirror:
                    yield running
                else:
                    # Parked already (a failover's flag): no line for it.
                    quiet = (prev or {}).get("paused")
                    _park_leader(etcd, s, command, (lambda line: None) if quiet else self.log)
                    _hit("role:parked")
                    try:
                        with standing_in(s.name, s.state_dir):
                            yield None
                    except CgmirrorError as exc:
                        raise _parked(exc) from exc.__cause__
                try:
                    if not lock.still_held():
                        # Stopped past its lease: another command may have
                        # parked the leader since, for its own work.
                        raise FailoverError(f"`cgmirror {command}` lost the role lock"
                                            f" ({lock.lost}) while it ran; it is done, but"
                                            f" another role command may run now")
                    self._resume_if_joined(etcd, command, prev)
                except CgmirrorError as exc:
                    raise _parked(exc) from exc
            finally:
                lock.release()

    def _resume_if_joined(self, etcd, command: str, prev: dict | None) -> None:
        """The sites joined (state mirroring): clear the pause flag a role
        command left (this one's park, a failover's), so that the leader,
        wherever it runs, forms groups in the recorded direction; a pause
        an operator set (``mirror pause``) before the command stays."""
        d = dirn.load(self.session)
        flag = cluster.paused(etcd, self.session.name)
        if d["state"] != "mirroring" or not (flag or {}).get("paused"):
            return
        if (prev or {}).get("paused") and prev.get("by") == "mirror pause":
            self.log("the mirror stays paused as `cgmirror mirror pause` left it:"
                     " `cgmirror mirror resume` when wanted")
            return
        src = d["source"]
        cluster.set_paused(etcd, self.session.name, False, command,
                           f"`cgmirror {command}` joined the sites: site {src} is the source")
        cluster.put_event(etcd, self.session.name, "resume", by=command, source=src,
                          hardened=d.get("hardened"))
        self.log(f"mirror resumed (etcd): the leader forms groups from site {src} to"
                 f" site {dirn.other(src)}")

    def _unpark_done(self, command: str) -> None:
        """A rerun that finds its command done (``_done``): a run killed
        between its last record and ``_resume_if_joined`` left the flag
        set; clear it now (cluster mode; a role command running elsewhere
        owns the flag: then nothing)."""
        s = self.session
        if s.cluster is None:
            return
        try:
            with cluster.client(s) as etcd:
                try:
                    lock = _role_lock(etcd, s, command)
                except BusyError:
                    return
                try:
                    flag = cluster.paused(etcd, s.name) or {}
                    if flag.get("by") != "mirror pause":
                        self._resume_if_joined(etcd, command, None)
                finally:
                    lock.release()
        except CgmirrorError as exc:        # the command itself is done
            self.log(f"warning: cannot check the pause flag in etcd ({exc}): if the"
                     f" leader stays parked, `cgmirror mirror resume`")

    def _done(self, line: str, **result) -> dict:
        """A rerun after success: say so (the CLI prints ``line``); exit 0."""
        return {"nothing_to_do": line, **result}

    def _all_role(self, site: str, role: str) -> bool:
        """Every node of ``site`` answers in ``role``."""
        for node in self.nodes(site):
            st = self.status(node)
            if st is None or st.get("role", "primary") != role:
                return False
        return True

    # ------------------------------------------------------------ commands

    def failover(self, test: bool = False) -> dict:
        """Make the secondaries writable primaries (see the module doc).  A
        running mirror is paused first and its group in flight allowed to
        end (``park_mirror``), so that nothing is drained into the site
        being promoted after it settled."""
        with self._command("failover --test" if test else "failover",
                           beside_mirror=True) as running:
            return self._failover(test, running is not None)

    def _failover(self, test: bool, mirror_runs_: bool) -> dict:
        d = dirn.load(self.session)
        src = d["source"]
        if d["state"] == ("dr-test" if test else "failed-over"):
            h, new = d["hardened"], (dirn.other(src) if test else src)  # resume
            if not test:
                self.take_writer(new, "failover")
            if not test and self._all_role(new, "secondary"):
                # Nothing promoted yet: settle again (a group that ended
                # since the record rolls forward or back like any other).
                h = self.settle(new)
                dirn.save(self.session, sites=(new,), **{**d, "hardened": h})
            if self._all_role(new, "primary"):
                return self._done(
                    (f"a DR test already runs on site {new} (writable at group {h}):"
                     f" nothing to do; `cgmirror failover --end-test` ends it") if test
                    else (f"site {new} is already the source (failed over at group {h}):"
                          f" nothing to do; `cgmirror failback` once site"
                          f" {dirn.other(new)} is back"),
                    site=new, hardened=h, test=test)
        elif d["state"] != "mirroring":
            raise DirectionError(f"cannot fail over: {dirn.why(d)}")
        else:
            new = dirn.other(src)
            if mirror_runs_ or self.session.cluster is not None:     # a leader elsewhere
                self.park_mirror("failover --test" if test else "failover")
            if not test:
                self.take_writer(new, "failover")
            h = self.settle(new)
            # Only the site taking over must hold the record: the other may
            # be gone (its nodes learn it when they answer again).
            if test:
                dirn.save(self.session, sites=(new,), source=src, state="dr-test",
                          hardened=h, by="failover --test")
            else:
                dirn.save(self.session, sites=(new,), source=new, state="failed-over",
                          hardened=h, by="failover", **{"from": src})
            _hit("role:failover-recorded")
        for i, node in enumerate(self.nodes(new)):
            st = self.status(node) if test else None
            if st is not None and st.get("role") == "secondary":
                self.call(node, "dr_test", n=h)     # keeps group h for --end-test
            self.become(node, "primary")
            if i == 0:
                _hit("role:failover-first-promoted")
        self.announce("dr-test" if test else "failover", new, h)
        self.log(f"site {new} is writable at group {h}"
                 + (" (DR test: `cgmirror failover --end-test` throws its writes away)"
                    if test else f"; site {dirn.other(new)} is out of the session until"
                                 f" `cgmirror failback`"))
        return {"site": new, "hardened": h, "test": test}

    def end_test(self) -> dict:
        """Throw a DR test's writes away: demote, return tgt, resume."""
        with self._command("failover --end-test", beside_mirror=True):
            d = dirn.load(self.session)
            if d["state"] == "mirroring" and d.get("by") == "failover --end-test":
                site = dirn.other(d["source"])
                return self._done(f"the DR test already ended (site {site} is a secondary"
                                  f" at group {d.get('hardened')}): nothing to do",
                                  site=site, hardened=d.get("hardened"))
            if d["state"] != "dr-test":
                raise DirectionError("no DR test is running (`cgmirror failover --test`"
                                     " starts one)")
            src, h = d["source"], d["hardened"]
            gens = self.gens(src)       # the test's generation ends: back to the source's
            for i, node in enumerate(self.nodes(dirn.other(src))):
                st = self.become(node, "secondary")
                g = gens.get(node.name)
                if st["hardened"] < h or st.get("test") is not None or g:
                    self.call(node, "assume", n=h, **({"gens": g} if g else {}))
                if i == 0:
                    _hit("role:end-test-first-demoted")
            with Links.of(dirn.oriented(self.session, src)) as links:
                recovery.return_tgt(links, recovery.secondary_statuses(links), self.log)
            dirn.save(self.session, sites=(dirn.other(src),), source=src,
                      state="mirroring", hardened=h, by="failover --end-test")
            self.announce("end-test", dirn.other(src), h)
            if self.session.cluster is not None:
                with cluster.client(self.session) as etcd:
                    cluster.set_paused(etcd, self.session.name, False,
                                       "failover --end-test", "the DR test ended")
                self.log("mirror resumed (etcd): the leader's next group overwrites the"
                         " test's blocks")
            elif self._running_mirror("resume") is not None:
                self.log("mirror resumed: its next group overwrites the test's blocks")
            return {"site": dirn.other(src), "hardened": h}

    def resync(self, source: str, target: str, full: bool = False,
               keep: str | None = None) -> dict:
        """Send S | T from ``source`` to ``target`` and harden it as one group."""
        if {source, target} != set(dirn.SITES):
            raise DirectionError(f"--from and --to must name the two sites,"
                                 f" {' and '.join(dirn.SITES)} (got {source}, {target})")
        d = dirn.load(self.session)
        # ``--full`` asks for a copy of every block (a replaced image file,
        # the benchmark's full copy after its resync): never "nothing to do".
        if not full and self._resynced(source, d):
            self._unpark_done(f"resync --from {source} --to {target}")
            return self._done(f"site {source} is already the source and site {target}"
                              f" was resynced from it (group {d.get('hardened')}):"
                              f" nothing to do; the mirror (`cgmirror mirror run`)"
                              f" sends what changes from here",
                              n=d.get("hardened"), bytes=0)
        with self._command(f"resync --from {source} --to {target}"):
            return self._resync(dirn.load(self.session), source, target, full, keep,
                                by="resync")

    @staticmethod
    def _resynced(source: str, d: dict) -> bool:
        return d["state"] == "mirroring" and d["source"] == source \
            and d.get("by") == "resync"

    def _resync(self, d: dict, source: str, target: str, full: bool, keep: str | None,
                **record) -> dict:
        # Split (after a failover): either site may win.  Otherwise only the
        # source, to catch up (the mirror's own cycle does the same).
        split = d["state"] in ("failed-over", "resync")
        if not split and (d["source"] != source or d["state"] != "mirroring"):
            raise DirectionError(f"cannot resync from site {source}: site {d['source']}"
                                 f" is the source (state {d['state']})")
        h = d.get("hardened")
        # Lineage first, before any change: only ``resync`` names a winner.
        winner = record.get("by") == "resync"
        pairs = self.check_join(source, target, winner=winner, full=full)
        self.take_writer(source, record.get("by", "resync"))
        if split and (d["state"] != "resync" or d["source"] != source):
            dirn.save(self.session, source=source, state="resync", hardened=h, **record)
        for node in self.nodes(target):
            st = self.become(node, "secondary")
            if h is not None and st["hardened"] < h:
                self.call(node, "assume", n=h)
        for node in self.nodes(source):
            self.become(node, "primary")
        m = self.mirror(source)
        m.winner, m.full = winner, full
        try:
            m.recover()                 # settles the target, returns its tgt
            if joins.split(pairs) or keep:
                lost = resync.overwritten(m.session)
                blocks = sum(b for b, _ in lost.values())
                total = sum(n for _, n in lost.values())
                self.log(f"site {source} named the winner: the resync overwrites"
                         f" {blocks} blocks ({total} bytes) of site {target}, its writes"
                         f" since the split among them: "
                         + (f"kept in {keep}" if keep else
                            "not kept (`--keep-overwritten DIR` keeps them)"))
            if keep:
                resync.keep_overwritten(m.session, keep, self.log)
            resync.adopt(m.links, self.log, forget=full)
            res = self._harden(m)
        finally:
            m.close()
        dirn.save(self.session, source=source, state="mirroring", hardened=res["n"],
                  **record)
        self.log(f"resync from site {source} to site {target} hardened as group"
                 f" {res['n']}: {res['bytes']} bytes")
        return res

    def failback(self, full: bool = False, keep: str | None = None) -> dict:
        """After a failover: resync back to the old primary site, then swap
        roles so that it is the primary again.  Each step is recorded
        (``by: failback``, ``back_to``), so that a rerun after a crash at
        any step goes on from it, and a rerun after success says so."""
        d = dirn.load(self.session)
        if d["state"] == "mirroring" and not self._failback_half_done(d):
            self._unpark_done("failback")
            return self._failed_back(d)
        with self._command("failback"):
            d = dirn.load(self.session)
            if d["state"] == "mirroring" and not self._failback_half_done(d):
                return self._failed_back(d)     # another one finished it meanwhile
            if d["state"] == "dr-test":
                raise DirectionError(f"cannot fail back: {dirn.why(d)}")
            if d["state"] == "switching" and d.get("by") not in (None, "failback"):
                raise DirectionError(f"cannot fail back: {dirn.why(d)}")
            res = None
            if d["state"] in ("failed-over", "resync"):
                back = d.get("back_to") or d.get("from") or dirn.other(d["source"])
                res = self._resync(d, dirn.other(back), back, full, keep,
                                   by="failback", back_to=back)
                _hit("role:failback-resynced")
            return {"resync": res, "switchover": self._switchover(by="failback")}

    def _failed_back(self, d: dict) -> dict:
        return self._done(f"site {d['source']} is already the source and mirrors to"
                          f" site {dirn.other(d['source'])}: nothing to do",
                          resync=None, switchover=None)

    @staticmethod
    def _failback_half_done(d: dict) -> bool:
        """Recorded by a failback that resynced but has not swapped yet."""
        return d.get("by") == "failback" and d.get("back_to") not in (None, d["source"])

    def switchover(self, to: str | None = None) -> dict:
        """Planned role swap with nothing lost (module doc).  ``to``: only if
        that site is not the source already; none: swap, unless the last
        thing recorded is a switchover that finished (a rerun)."""
        d = dirn.load(self.session)
        if d["state"] == "mirroring" and (d["source"] == to if to else
                                          d.get("by") == "switchover"):
            self._unpark_done("switchover" + (f" --to {to}" if to else ""))
            return self._done(
                f"site {d['source']} is already the source (state mirroring, group"
                f" {d.get('hardened')}): nothing to do"
                + ("" if to else f"; `cgmirror switchover --to {dirn.other(d['source'])}`"
                                 f" swaps back"),
                source=d["source"], hardened=d.get("hardened"))
        with self._command("switchover" + (f" --to {to}" if to else "")):
            return self._switchover(by="switchover")

    def _switchover(self, by: str) -> dict:
        d = dirn.load(self.session)
        src = d["source"]
        keys = {k: d[k] for k in ("back_to",) if k in d}
        if d["state"] == "mirroring":
            m = self.mirror(src)
            try:
                for node in self.nodes(src):
                    self.call(node, "fence", on=True)
                try:
                    res = self._harden(m, until_clean=True)
                except BaseException:
                    for node in self.nodes(src):
                        self.call(node, "fence", on=False)
                    raise
            finally:
                m.close()
            h = res["n"]
            d = dirn.save(self.session, source=src, state="switching",
                          to=dirn.other(src), hardened=h, by=by, **keys)
            _hit("role:switching")
        elif d["state"] != "switching":
            raise DirectionError(f"cannot switch over: {dirn.why(d)}")
        new, h = d["to"], d["hardened"]
        self.take_writer(new, by)
        for i, node in enumerate(self.nodes(src)):
            st = self.become(node, "secondary")
            if st["hardened"] < h:
                self.call(node, "assume", n=h)
            if i == 0:
                _hit("role:switching-first-demoted")
        for node in self.nodes(new):
            self.become(node, "primary")
        _hit("role:switching-promoted")
        with Links.of(dirn.oriented(self.session, new)) as links:
            resync.adopt(links, self.log)
        dirn.save(self.session, source=new, state="mirroring", hardened=h, by=by, **keys)
        self.log(f"switchover done: site {new} is the source at group {h}")
        return {"source": new, "hardened": h}

    # ------------------------------------------------------------ lineage

    def site_statuses(self, site: str) -> dict[str, dict]:
        """{name: status} of the nodes of ``site`` that answer."""
        out = {}
        for node in self.nodes(site):
            st = self.status(node)
            if st is not None:
                out[node.name] = st
        return out

    def check_join(self, source: str, target: str, winner: bool = False,
                   full: bool = False) -> list:
        """Compare the lineage of every pair from ``source`` to ``target``
        (coordinator/mirror/joins.py) and refuse (one line) what may not be
        joined; a named ``winner`` overrides a split, said in one line per
        pair.  The pairs."""
        pairs = joins.check(dirn.oriented(self.session, source), self.site_statuses(source),
                            self.site_statuses(target), source=source, winner=winner,
                            full=full)
        for p in joins.split(pairs):
            self.log(f"{p.verdict.line()}: split ({p.kind}); site {source} named the"
                     f" winner by `cgmirror resync --from {source} --to {target}`")
        return pairs

    def gens(self, source: str) -> dict[str, dict[str, str]]:
        """{node of the other site: {volume: the generation of the volume of
        ``source`` it mirrors}}, from ``source``'s nodes."""
        return joins.gens(dirn.oriented(self.session, source), self.site_statuses(source))

    # ------------------------------------------------------------ parts

    def _harden(self, m: Mirror, until_clean: bool = False) -> dict:
        """Form groups until one hardens (``until_clean``: and the primaries
        have nothing left to send); its number and the bytes sent."""
        sent, last = 0, None
        for _ in range(GROUP_TRIES):
            res = m.run_once()
            sent += res.bytes
            last = res
            if res.outcome == "hardened" and not (until_clean and any(
                    v["dirty_blocks"] for lk in m.slaves
                    for v in lk.status()["volumes"].values())):
                return {"n": res.n, "bytes": sent}
        raise FailoverError(f"no group hardened in {GROUP_TRIES} tries (last: group"
                            f" {last.n} {last.outcome}: {last.error}); the target is"
                            f" still consistent; run the command again to resume")


def _role_lock(etcd, session, command: str) -> "cluster.RoleLock":
    """The etcd role lock for ``command`` (BusyError if another holds it)."""
    ttl = max(session.cluster.ttl_s, cluster.ROLE_LOCK_TTL_S)
    return cluster.RoleLock(etcd, session.name, command, ttl).acquire()


def _parked(exc: CgmirrorError) -> CgmirrorError:
    """``exc`` with what a failed role command left in cluster mode: the
    leader parked (safe: no group forms over a half-done role change)."""
    if "mirror resume" not in str(exc):
        exc.args = (f"{exc}; the leader stays parked: `cgmirror mirror resume` once"
                    f" that is fixed (or the command run again)",) + exc.args[1:]
    return exc


def park_leader(session, command: str, log) -> bool:
    """Cluster mode's ``park_mirror``: ``P/control/paused`` set, then wait
    (bounded, MIRROR_IDLE_TIMEOUT_S) until the leader's published status
    says it acted on that very flag, is paused and idle; False if no
    coordinator leads (nothing in flight: whoever leads next reads the
    flag before its first group)."""
    with cluster.client(session) as etcd:
        return _park_leader(etcd, session, command, log)


def _park_leader(etcd, session, command: str, log) -> bool:
    flag = cluster.set_paused(etcd, session.name, True, command,
                              f"`cgmirror {command}` parks the mirror")
    deadline = time.monotonic() + MIRROR_IDLE_TIMEOUT_S
    while True:
        st = cluster.read_state(etcd, session.name)
        lead, doc = st["leader"], st["status"] or {}
        if lead is None:
            log("no mirror leads the session: nothing in flight; the flag keeps the"
                " next leader paused")
            return False
        c = doc.get("cluster") or {}
        if c.get("epoch") == lead["epoch"] and c.get("pause_seen") == flag["at"] \
                and doc.get("paused") and doc.get("phase") == "idle" \
                and doc.get("state") != "running":
            log(f"mirror parked after group {doc.get('hardened')} (leader"
                f" {lead['host']} pid {lead['pid']}): the primaries keep recording,"
                f" nothing is drained")
            return True
        if time.monotonic() > deadline:
            raise FailoverError(
                f"the leading mirror ({lead['host']} pid {lead['pid']}) did not end its"
                f" group in flight within {MIRROR_IDLE_TIMEOUT_S:g} s (phase"
                f" {doc.get('phase')}); nothing was changed and it stays paused: stop it"
                f" and run `cgmirror {command}` again")
        time.sleep(0.1)


__all__ = ["FailoverError", "Node", "RoleSwitch"]

