"""Failover, failback, resync and switchover (DESIGN.md "Failover, failback,
resync"): the Python API behind ``cgmirror failover|failback|resync|
switchover`` (coordinator/failover_cmds.py); tests drive ``RoleSwitch``.

Design
======

A role switch restarts a node's nbdkit process in the other role on the
same volumes and the same state directory (``role=primary`` or
``role=secondary``, ``Launcher``); the NBD socket and control socket stay.
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

Baseline.  X's copier sends incrementally only to a target it has a
baseline record for.  A resync gives X one without a copy (``adopt``):
X and Y held the same hardened group h at the split (failover settles every
secondary at one group first; a switchover hardens a last group with the
primary fenced), and every block written since on either side is in X's
``cr | oos`` (X's own writes, its rollback blocks) or Y's ``tgt`` (Y's
writes as a primary, rolled-back or unsent blocks), which recovery has put
into X's ``cr`` before ``adopt`` runs.  It relies on (1) both change maps
being complete (C1, and the fold at start); (2) nobody writing Y's images
but its nbdkit (as for any baseline); (3) the session file naming the same
images.  ``adopt`` samples X's own clean blocks, and the mirror's
``verify`` reads them back at Y before the first group, so a wrong target
(a recreated image, a wrong path) is still caught.  ``--full`` drops the
record instead, so the group copies every block.

After a failover either site may win: ``resync --from a --to b`` demotes
the failover site instead and sends the old primary's data over its writes
(which ``--keep-overwritten`` can keep).

Failover settles the surviving site first with the mirror's recovery rule
(a group any node committed or prepared rolls forward: prepare is sent only
once every drain of the group finished; then every node with undo blocks
of a drain that never finished rolls back: the blocks it restored land in
its ``tgt``), so all stand at one hardened group h, recorded in
``direction.json`` (coordinator/direction.py) before any node switches:
the command run again after a crash resumes.  No call goes to the old
primary's site.

DR test: ``failover --test`` pauses a running mirror (its control socket)
so that the primary keeps recording in ``cr`` and nothing is drained, then
promotes the secondaries as above.  ``--end-test`` demotes them again (their
test writes fold into ``tgt``), returns ``tgt`` to the primaries, and
resumes the mirror: its next group overwrites every test block with the
primary's data, so the secondary equals the primary's hardened group.

Switchover: fence the primaries (``fence``: host writes refused, those in
flight finished), form groups until one hardens with nothing left dirty,
record "switching", demote the primaries (``assume h``: the whole image is
group h), promote the secondaries, adopt baselines, record the new source.

``--keep-overwritten DIR``: before the first group of a resync, every block
of S | T is read from the target's host export (its image as of before the
resync: the undo store keeps it even after a partial drain) and written
into ``DIR/<node>-<volume>.img`` (sparse, the volume's size) with the runs
in ``DIR/<node>-<volume>.runs.json``.

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

import dataclasses
import json
import os
import sys
import time
from typing import Callable

import nbd

from wire import files, tls

from . import direction as dirn
from . import group, launch
from .direction import DirectionError
from .errors import CgmirrorError, LocalError
from .link import SlaveLink
from .mirror import Mirror, MirrorNotRunning, call as mirror_call
from .session import Session

MIRROR_IDLE_TIMEOUT_S = 120.0
GROUP_TRIES = 5


class FailoverError(CgmirrorError):
    """A role switch cannot go on (the message says what to do)."""


class Launcher:
    """How a node changes role: stop it (SIGTERM: its maps are checkpointed)
    and start it again detached.  Tests pass one that keeps the new process
    as their child, so that it is killed and reaped with the test."""

    def stop(self, spec: launch.SlaveSpec) -> None:
        launch.stop(spec)

    def start(self, spec: launch.SlaveSpec) -> None:
        launch.start(spec, detach=True)


@dataclasses.dataclass(frozen=True)
class Node:
    """One nbdkit process of a site, whichever role it runs."""

    site: str
    cfg: object             # SlaveConfig (site a) or SecondaryConfig (site b)

    @property
    def name(self) -> str:
        return self.cfg.name

    def spec(self, role: str) -> launch.SlaveSpec:
        return dataclasses.replace(self.cfg.spec(), role=role)


class RoleSwitch:
    """The role-switch commands of one session (the file's, not oriented)."""

    def __init__(self, session: Session, launcher: Launcher | None = None,
                 log: Callable[[str], None] | None = None):
        if session.mirror is None or not session.pairs():
            raise FailoverError(f"session {session.name} mirrors no volume: nothing to"
                                f" fail over")
        self.session = session
        self.launcher = launcher or Launcher()
        self.log = log or (lambda line: print(f"cgmirror: {line}", file=sys.stderr,
                                              flush=True))

    # ------------------------------------------------------------ nodes

    def nodes(self, site: str) -> list[Node]:
        return [Node(site, c) for c in dirn.nodes(self.session, site)]

    def status(self, node: Node) -> dict | None:
        """The node's status, None if it does not answer."""
        try:
            with SlaveLink.from_spec(node.cfg.spec(), timeout=10) as lk:
                return lk.status()
        except CgmirrorError:
            return None

    def call(self, node: Node, op: str, **args) -> dict:
        with SlaveLink.from_spec(node.cfg.spec(), timeout=60) as lk:
            return lk.call(op, **args)

    def become(self, node: Node, role: str) -> dict:
        """Restart ``node`` in ``role`` unless it runs so already; its status."""
        st = self.status(node)
        if st is not None and st.get("role", "primary") == role:
            return st
        if st is not None and role == "primary":
            undo = {v: s["undo_blocks"] for v, s in st["volumes"].items() if s["undo_blocks"]}
            if st["prepared"] is not None or undo:
                raise FailoverError(f"{node.name} holds group {st['prepared']} in flight"
                                    f" ({undo}): settle it before promoting")
        try:
            if st is not None:
                self.launcher.stop(node.spec(st.get("role", "primary")))
            self.launcher.start(node.spec(role))
        except (launch.LaunchError, OSError) as exc:
            raise FailoverError(f"cannot restart {node.name} as a {role}: {exc}; fix"
                                f" that and run the command again (it resumes)") from exc
        st = self.status(node)
        if st is None or st.get("role", "primary") != role:
            raise FailoverError(f"{node.name} did not come back as a {role}: see"
                                f" {node.spec(role).logfile}")
        self.log(f"{node.name} (site {node.site}) now runs as a {role}")
        return st

    def settle(self, site: str) -> int:
        """Bring every secondary of ``site`` to one hardened group and return
        it: the mirror's recovery rule (``Mirror.settle``: a committed group
        rolls forward, so does a group some secondary prepared, since prepare
        follows every drain), then whatever is still in flight (a drain that
        never finished) rolls back into ``tgt``.  Only ``site`` is called:
        the other site may be gone."""
        for node in self.nodes(site):
            st = self.status(node)
            if st is None:
                raise FailoverError(f"{node.name} (site {site}) does not answer on"
                                    f" {node.cfg.control}: start it (`cgmirror secondary"
                                    f" start`) and run the command again")
            if st.get("role") != "secondary":
                role = st.get("role", "primary")
                raise FailoverError(f"{node.name} (site {site}) is a {role}, not a"
                                    f" secondary")
        m = Mirror(dirn.oriented(self.session, dirn.other(site)), log=self.log,
                   serve_control=False)
        try:
            # unfinished: no primary will ever finish a drain in flight.
            top = max(r["hardened"] for r in m.settle(unfinished=True).values())
        finally:
            m.close()
        if top == 0:
            raise FailoverError(f"site {site} holds no hardened group yet (the first"
                                f" copy never completed): nothing consistent to take over")
        return top

    # ------------------------------------------------------------ the mirror

    def _running_mirror(self, op: str) -> dict | None:
        try:
            return mirror_call(self.session.mirror.control, op)
        except MirrorNotRunning:
            return None

    def park_mirror(self) -> bool:
        """Pause a running mirror and wait until its group is over; False if
        none runs."""
        doc = self._running_mirror("pause")
        if doc is None:
            return False
        deadline = time.monotonic() + MIRROR_IDLE_TIMEOUT_S
        while doc["phase"] != "idle":
            if time.monotonic() > deadline:
                raise FailoverError(f"the mirror did not finish its group within"
                                    f" {MIRROR_IDLE_TIMEOUT_S:g} s")
            time.sleep(0.05)
            doc = self._running_mirror("status")
        self.log("mirror parked: the primaries keep recording, nothing is drained")
        return True

    def mirror(self, source: str) -> Mirror:
        """An opened mirror of ``source`` (takes the session lock)."""
        return Mirror(dirn.oriented(self.session, source), log=self.log,
                      serve_control=False).open()

    # ------------------------------------------------------------ commands

    def failover(self, test: bool = False) -> dict:
        """Make the secondaries writable primaries (see the module doc)."""
        d = dirn.load(self.session)
        src = d["source"]
        if d["state"] == ("dr-test" if test else "failed-over"):
            h, new = d["hardened"], (dirn.other(src) if test else src)  # resume
        elif d["state"] != "mirroring":
            raise DirectionError(f"cannot fail over: {dirn._why(d)}")
        else:
            new = dirn.other(src)
            if test:
                self.park_mirror()
            elif self._running_mirror("pause") is not None:
                self.log("the running mirror is paused: its primaries are gone")
            h = self.settle(new)
            if test:
                dirn.save(self.session, source=src, state="dr-test", hardened=h)
            else:
                dirn.save(self.session, source=new, state="failed-over", hardened=h,
                          **{"from": src})
        for node in self.nodes(new):
            st = self.status(node) if test else None
            if st is not None and st.get("role") == "secondary":
                self.call(node, "dr_test", n=h)     # keeps group h for --end-test
            self.become(node, "primary")
        self.log(f"site {new} is writable at group {h}"
                 + (" (DR test: `cgmirror failover --end-test` throws its writes away)"
                    if test else f"; site {dirn.other(new)} is out of the session until"
                                 f" `cgmirror failback`"))
        return {"site": new, "hardened": h, "test": test}

    def end_test(self) -> dict:
        """Throw a DR test's writes away: demote, return tgt, resume."""
        d = dirn.load(self.session)
        if d["state"] != "dr-test":
            raise DirectionError("no DR test is running (`cgmirror failover --test`"
                                 " starts one)")
        src, h = d["source"], d["hardened"]
        for node in self.nodes(dirn.other(src)):
            st = self.become(node, "secondary")
            if st["hardened"] < h or st.get("test") is not None:   # never promoted
                self.call(node, "assume", n=h)
        m = Mirror(dirn.oriented(self.session, src), log=self.log, serve_control=False)
        try:
            m.return_tgt(m.secondary_statuses())
        finally:
            m.close()
        dirn.save(self.session, source=src, state="mirroring")
        if self._running_mirror("resume") is not None:
            self.log("mirror resumed: its next group overwrites the test's blocks")
        return {"site": dirn.other(src), "hardened": h}

    def resync(self, source: str, target: str, full: bool = False,
               keep: str | None = None) -> dict:
        """Send S | T from ``source`` to ``target`` and harden it as one group."""
        if {source, target} != set(dirn.SITES):
            raise DirectionError(f"--from and --to must name the two sites,"
                                 f" {' and '.join(dirn.SITES)} (got {source}, {target})")
        d = dirn.load(self.session)
        # Split (after a failover): either site may win.  Otherwise only the
        # source, to catch up (the mirror's own cycle does the same).
        split = d["state"] in ("failed-over", "resync")
        if not split and (d["source"] != source or d["state"] != "mirroring"):
            raise DirectionError(f"cannot resync from site {source}: site {d['source']}"
                                 f" is the source (state {d['state']})")
        h = d.get("hardened")
        if split and (d["state"] != "resync" or d["source"] != source):
            dirn.save(self.session, source=source, state="resync", hardened=h)
        for node in self.nodes(target):
            st = self.become(node, "secondary")
            if h is not None and st["hardened"] < h:
                self.call(node, "assume", n=h)
        for node in self.nodes(source):
            self.become(node, "primary")
        m = self.mirror(source)
        try:
            m.recover()                 # settles the target, returns its tgt
            if keep:
                self.keep_overwritten(m.session, keep)
            self._adopt(m, forget=full)
            res = self._harden(m)
        finally:
            m.close()
        dirn.save(self.session, source=source, state="mirroring")
        self.log(f"resync from site {source} to site {target} hardened as group"
                 f" {res['n']}: {res['bytes']} bytes")
        return res

    def failback(self, full: bool = False, keep: str | None = None) -> dict:
        """After a failover: resync back to the old primary site, then swap
        roles so that it is the primary again."""
        d = dirn.load(self.session)
        if d["state"] not in ("failed-over", "resync"):
            raise DirectionError(f"nothing to fail back: site {d['source']} is the"
                                 f" source (state {d['state']})")
        res = self.resync(d["source"], dirn.other(d["source"]), full, keep)
        return {"resync": res, "switchover": self.switchover()}

    def switchover(self) -> dict:
        """Planned role swap with nothing lost (module doc)."""
        d = dirn.load(self.session)
        src = d["source"]
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
                          to=dirn.other(src), hardened=h)
        elif d["state"] != "switching":
            raise DirectionError(f"cannot switch over: {dirn._why(d)}")
        new, h = d["to"], d["hardened"]
        for node in self.nodes(src):
            st = self.become(node, "secondary")
            if st["hardened"] < h:
                self.call(node, "assume", n=h)
        for node in self.nodes(new):
            self.become(node, "primary")
        m = Mirror(dirn.oriented(self.session, new), log=self.log, serve_control=False)
        try:
            self._adopt(m)
        finally:
            m.close()
        dirn.save(self.session, source=new, state="mirroring")
        self.log(f"switchover done: site {new} is the source at group {h}")
        return {"source": new, "hardened": h}

    # ------------------------------------------------------------ parts

    def _adopt(self, m: Mirror, forget: bool = False) -> None:
        """Give every source volume a fresh baseline on its target (module
        doc).  Always fresh: a record of an earlier era (this node was a
        primary before) has samples of blocks the other site wrote since.
        ``forget`` (``--full``): drop every record, so the group copies whole."""
        group.preflight(m.slaves, abort_leftover=True, warn=self.log)
        st = m.secondary_statuses()
        for lk in m.slaves:
            for v, uri in m.targets(st)[lk.name].items():
                lk.call("adopt", volume=v, target=uri, forget=forget)
                if forget:
                    self.log(f"{lk.name}/{v}: copied whole to {uri} (--full)")
                    continue
                self.log(f"{lk.name}/{v}: baseline on {uri} adopted (both held the"
                         f" same group; every difference is in S | T)")

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

    def keep_overwritten(self, oriented: Session, out: str) -> dict:
        """Save the target blocks the resync will overwrite (module doc)."""
        os.makedirs(out, exist_ok=True)
        kept = {}
        for s, v, r, rv in oriented.pairs():
            src, tgt = oriented.slave(s), oriented.secondary(r)
            runs, start = [], 0
            with SlaveLink.from_spec(src.spec()) as lk:
                while start is not None:
                    page = lk.call("dirty", volume=v, start=start)
                    g = page["granularity"]
                    runs += [[b * g, n * g] for b, n in page["runs"]]
                    start = page["next"]
            base = os.path.join(out, f"{r}-{rv}")
            h = nbd.NBD()
            try:
                if tgt.nbd is not None:
                    # Mutual TLS: the coordinator's certificate if it has one
                    # (TCP control), else the node's own (one session PKI).
                    tls.libnbd_setup(h, tgt.client_tls or tgt.tls)
                h.connect_uri(tgt.spec().uri(rv))
                size = h.get_size()
                fd = os.open(base + ".img", os.O_WRONLY | os.O_CREAT, 0o600)
                try:
                    os.ftruncate(fd, size)
                    for off, length in runs:
                        length = min(length, size - off)
                        for o in range(off, off + length, 1 << 20):
                            n = min(1 << 20, off + length - o)
                            files.pwrite_all(fd, h.pread(n, o), o)
                    os.fsync(fd)
                finally:
                    os.close(fd)
            except nbd.Error as exc:
                raise FailoverError(f"cannot read {r}/{rv} to keep its overwritten"
                                    f" blocks: {exc.string}") from exc
            except OSError as exc:
                raise LocalError(f"cannot write {base}.img: {exc.strerror or exc}") from exc
            finally:
                try:
                    h.shutdown()
                except nbd.Error:
                    pass                # never connected
            with open(base + ".runs.json", "w") as f:
                json.dump({"bytes": [[o, min(n, size - o)] for o, n in runs]}, f)
            kept[f"{r}/{rv}"] = sum(min(n, size - o) for o, n in runs)
            self.log(f"{r}/{rv}: {kept[f'{r}/{rv}']} bytes about to be overwritten kept"
                     f" in {base}.img")
        return kept


__all__ = ["FailoverError", "Launcher", "Node", "RoleSwitch"]
